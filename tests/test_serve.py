"""The served Predictor on a real local Ray cluster (loopback only, bounded requests, shut down after).

`tilead-serve` runs as a child process on a cluster of its own processes (tests/ray_head.py says why).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from ray_head import RayCluster, ServeProcess, free_port, ray_head

from tilead.runtime import Predictor
from tilead.serve.codec import decode_mask_png_base64

pytestmark = pytest.mark.integration

MAX_BODY = 256 << 10


def post(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


@pytest.fixture(scope="module")
def test_images(tiny_trained: tuple[Path, Path]) -> list[Path]:
    run, _ = tiny_trained
    data = run.parent / "data" / "test"
    files = sorted(data.glob("*/*.png"))
    assert len(files) >= 4
    return files


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A real one-node Ray cluster (``ray start --head``)."""
    with ray_head(tmp_path_factory.mktemp("r"), num_cpus=2) as running:
        yield running


@pytest.fixture(scope="module")
def server(cluster: RayCluster, tiny_trained: tuple[Path, Path]) -> Iterator[str]:
    """``tilead-serve`` on :func:`cluster`, a child process (this one never becomes a Ray driver); its URL."""
    _, bundle = tiny_trained
    args = [str(bundle), "--ray-address", cluster.address, "--port", str(free_port()), "--threads", "1"]
    args += ["--max-batch", "4", "--batch-wait-ms", "100", "--max-body-mb", str(MAX_BODY / 2**20)]
    line = ServeProcess(args, env=cluster.env)
    try:
        yield line.url
        status, err = line.stop()
        assert status == 0, err
    finally:
        line.kill()


def test_results_equal_the_predictor(server: str, tiny_trained: tuple[Path, Path], test_images: list[Path]) -> None:
    _, bundle = tiny_trained
    with Predictor(bundle, threads=1) as predictor:
        for path in test_images[:4]:
            status, out = post(f"{server}/predict?mask=1", path.read_bytes())
            assert status == 200, out
            expected = predictor.predict(cv2.imread(str(path), cv2.IMREAD_COLOR))
            assert not isinstance(expected, list)
            # One request at a time: a batch of one, the same computation as the direct call.
            assert out["score"] == expected.score
            assert out["raw_score"] == expected.raw_score
            assert out["label"] == expected.label
            np.testing.assert_array_equal(decode_mask_png_base64(out["mask_png"]), expected.mask)
            assert out["mask_shape"] == list(expected.mask.shape)
            assert out["batch_size"] == 1
            assert set(out["timings"]) == {"decode_ms", "queue_ms", "predict_ms", "total_ms"}
            status, plain = post(f"{server}/predict", path.read_bytes())
            assert status == 200
            assert "mask_png" not in plain


def test_concurrent_requests_are_batched(server: str, tiny_trained: tuple[Path, Path], test_images: list[Path]) -> None:
    _, bundle = tiny_trained
    paths = (test_images * 3)[:12]
    bodies = [p.read_bytes() for p in paths]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(f"{server}/predict", b), bodies))
    assert [status for status, _ in answers] == [200] * len(bodies)
    assert max(out["batch_size"] for _, out in answers) > 1  # 8 clients, a 100 ms window: batches formed
    with Predictor(bundle, threads=1) as predictor:
        expected = predictor.predict([cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths])
    assert isinstance(expected, list)
    # In a batch ONNX Runtime may pick other kernels than for one image: equal to float tolerance.
    np.testing.assert_allclose([o["score"] for _, o in answers], [e.score for e in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        [o["raw_score"] for _, o in answers], [e.raw_score for e in expected], rtol=1e-5, atol=1e-4
    )
    assert [o["label"] for _, o in answers] == [e.label for e in expected]


def test_bad_requests_get_4xx_and_the_replica_survives(server: str, test_images: list[Path]) -> None:
    status, ready = get(f"{server}/readyz")
    assert status == 200
    assert ready["ready"] is True
    pid = ready["pid"]
    good = test_images[0].read_bytes()
    image = cv2.imread(str(test_images[0]), cv2.IMREAD_COLOR)
    assert image is not None
    ok, small = cv2.imencode(".png", image[:100])
    assert ok
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    ok, big = cv2.imencode(".png", noise)  # ~480 KB of incompressible pixels, over the 256 KiB limit
    assert ok
    cases = [
        (f"{server}/predict", b"definitely not an image", 400, "not a decodable image"),
        (f"{server}/predict", b"", 400, "empty body"),
        (f"{server}/predict", good[: len(good) // 3], 400, "image"),
        (f"{server}/predict", small.tobytes(), 422, "100x160"),
        (f"{server}/predict", big.tobytes(), 413, "exceeds the limit"),
        (f"{server}/predict?mask=maybe", good, 400, "mask"),
    ]
    for url, body, code, words in cases:
        status, out = post(url, body)
        assert status == code, out
        assert words in out["error"]
    # Bad and good requests at the same time: the good ones are answered, the bad ones refused.
    mixed = [good, b"garbage", good, small.tobytes(), good, b""]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(f"{server}/predict", b), mixed))
    assert [s for s, _ in answers] == [200, 400, 200, 422, 200, 400]
    status, after = get(f"{server}/readyz")
    assert status == 200
    assert after["pid"] == pid  # the same replica process: nothing restarted it


def test_a_second_line_on_the_same_cluster(
    cluster: RayCluster, server: str, tiny_trained: tuple[Path, Path], test_images: list[Path]
) -> None:
    _, bundle = tiny_trained
    port = int(server.rsplit(":", 1)[1])
    body = test_images[0].read_bytes()
    image = cv2.imread(str(test_images[0]), cv2.IMREAD_COLOR)
    assert image is not None
    ok, small = cv2.imencode(".png", image[:100])
    assert ok
    # The second line resizes other sizes; the first refuses them.
    args = [str(bundle), "--ray-address", cluster.address, "--port", str(port), "--name", "line2"]
    args += ["--route-prefix", "/line2", "--max-batch", "2", "--batch-wait-ms", "5", "--threads", "1", "--resize"]
    line = ServeProcess(args, env=cluster.env)
    try:
        line2 = line.url
        assert line2 == f"{server}/line2"
        first, second = post(f"{server}/predict", body), post(f"{line2}/predict", body)
        assert first[0] == second[0] == 200
        assert first[1]["score"] == second[1]["score"]
        assert get(f"{line2}/readyz")[1]["resize"] is True
        assert post(f"{server}/predict", small.tobytes())[0] == 422
        status, out = post(f"{line2}/predict", small.tobytes())
        assert status == 200, out
        with Predictor(bundle, threads=1) as predictor:
            expected = predictor.predict(image[:100], resize=True)
        assert not isinstance(expected, list)
        assert out["score"] == expected.score
        assert out["raw_score"] == expected.raw_score
        code, err = line.stop()
        assert code == 0, err
    finally:
        line.kill()
    # Only that application was deleted: the first line keeps serving, /line2 is gone.
    assert post(f"{server}/predict", body)[0] == 200
    assert get(f"{line2}/healthz")[0] == 404


def test_health_route(server: str) -> None:
    assert get(f"{server}/healthz") == (200, {"status": "ok"})


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm") or name.startswith("tilead.trainer"):
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import tilead.cli.serve
    import tilead.serve.app
    import tilead.serve.codec
    print("OK")
    """
)


def test_serving_imports_without_torch_or_the_trainer() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_cli_serves_and_stops_on_sigterm(tiny_trained: tuple[Path, Path], test_images: list[Path]) -> None:
    _, bundle = tiny_trained
    port = free_port()
    # No --ray-address: the command starts a local Ray of its own and shuts it down on SIGTERM.
    line = ServeProcess(
        [str(bundle), "--port", str(port), "--threads", "1", "--max-batch", "2", "--batch-wait-ms", "5"]
    )
    try:
        status, out = post(f"{line.url}/predict", test_images[0].read_bytes())
        assert status == 200
        assert 0.0 <= out["score"] <= 1.0
        code, err = line.stop()
        assert code == 0, err
        assert "SIGTERM: shutting down" in err
        assert "stopped" in err
    finally:
        line.kill()
    with pytest.raises(urllib.error.URLError, match="refused"):  # the port is closed: nothing was left serving
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
