"""``Predictor.close()`` while other threads predict (issue #16 item 8): one clear error, never a pool's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tilead.runtime import Prediction, Predictor

pytestmark = pytest.mark.integration


def _work(predictor: Predictor, image: np.ndarray, started: threading.Barrier, out: list[object]) -> None:
    """Predict until an exception; record every result and the exception."""
    started.wait()
    while True:
        try:
            got = predictor.predict(image)
        except Exception as err:  # every exception is an outcome the test checks
            out.append(err)
            return
        out.append(got)


@pytest.mark.parametrize("location_workers", [1, 2])
def test_close_during_predict_gives_one_clear_error(tiny_trained: tuple[Path, Path], location_workers: int) -> None:
    _, bundle = tiny_trained
    image = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    for _ in range(3):
        predictor = Predictor(bundle, threads=2, location_workers=location_workers)
        want = predictor.predict(image)
        assert isinstance(want, Prediction)
        started = threading.Barrier(5)
        outcomes: list[list[object]] = [[] for _ in range(4)]
        threads = [threading.Thread(target=_work, args=(predictor, image, started, out)) for out in outcomes]
        for t in threads:
            t.start()
        started.wait()
        while sum(len(o) for o in outcomes) < 6:  # some predictions are done, others are running
            threading.Event().wait(0.005)
        predictor.close()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
        for out in outcomes:
            *results, last = out
            assert isinstance(last, RuntimeError)
            assert str(last) == "Predictor is closed"
            for r in results:  # every call that returned, returned the right thing
                assert isinstance(r, Prediction)
                assert r.score == want.score
                np.testing.assert_array_equal(r.anomaly_map, want.anomaly_map)
        predictor.close()  # twice is fine
        with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
            predictor.location_maps(image)
