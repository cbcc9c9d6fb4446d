"""The issue's bars on real data: the tiled PaDiM ensemble on MVTec AD bottle at 900x900.

Trains ``configs/padim_bottle.yaml`` from scratch and evaluates it (about five
minutes on a 2-core CPU). The speed and memory figures are measured by
``benchmarks/bench_train_bottle.py``, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BOTTLE, ROOT, assert_bottle_bundle_parity

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"real data not found at {BOTTLE}"),
]


def test_tiled_padim_on_bottle_meets_the_bars(tmp_path: Path) -> None:
    from tilead.trainer.config import load_config
    from tilead.trainer.evaluation import evaluate
    from tilead.trainer.pipeline import train

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
    assert_bottle_bundle_parity(result.paths.root, tmp_path / "bundle")
