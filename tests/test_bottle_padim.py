"""The issue's bars on real data: the tiled PaDiM ensemble on MVTec AD bottle at 900x900.

Trains ``configs/padim_bottle.yaml`` from scratch and evaluates it (about five
minutes on a 2-core CPU). The speed and memory figures are measured by
``benchmarks/bench_train_bottle.py``, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BOTTLE, ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"real data not found at {BOTTLE}"),
]


def test_tiled_padim_on_bottle_meets_the_bars(tmp_path: Path) -> None:
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import evaluate, train

    cfg = load_config(ROOT / "configs" / "padim_bottle.yaml")
    result = train(cfg, tmp_path / "run", progress=False)
    run = json.loads(result.paths.run_json.read_text())
    assert run["grid_shape"] == [2, 2]
    assert run["splits"]["fit_images"] == 209
    assert run["splits"]["validation_images"] == 83
    # fp16 inverse covariances: 58*58 positions x 100 x 100 x 2 bytes + fp32 means + channel index.
    assert run["model"]["state_bytes_per_location"] == 58 * 58 * (100 * 4 + 100 * 100 * 2) + 100 * 8
    report = evaluate(result.paths.root, progress=False).metrics
    m = report["metrics"]
    assert report["evaluated_at"] == [900, 900]
    assert m["image_auroc"] >= 0.98
    assert m["pixel_auroc"] >= 0.98
    assert m["aupro"] >= 0.93
    # The deployed path on real images: export, then the Predictor against the eager ensemble.
    _assert_bundle_parity(result.paths.root, tmp_path / "bundle")


def _assert_bundle_parity(run: Path, bundle: Path) -> None:
    """Normalized maps within 1e-4 and identical labels on real bottle test images (defective and good)."""
    import cv2
    import numpy as np

    from tilead.exporter.bundle import export_bundle
    from tilead.runtime import Predictor
    from tilead.trainer.eager import load_eager_ensemble

    export_bundle(run, bundle, progress=False)
    paths = [
        p
        for kind in ("good", "broken_large", "contamination")
        for p in sorted((BOTTLE / "test" / kind).glob("*.png"))[:2]
    ]
    decoded = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    assert all(d is not None for d in decoded)
    images = np.stack(decoded)  # type: ignore[arg-type]
    _, eager = load_eager_ensemble(run).predict(images)
    with Predictor(bundle) as predictor:
        results = predictor.predict(images)
    assert isinstance(results, list)
    got = np.stack([r.anomaly_map for r in results])
    assert np.abs(got - eager.maps).max() <= 1e-4
    assert [r.label for r in results] == eager.labels.tolist()
    assert sum(r.label for r in results) >= 3  # the defective images are found
