"""The issue's bars on real data: the tiled PatchCore ensemble on MVTec AD bottle at 900x900.

Trains ``configs/patchcore_bottle.yaml`` from scratch and evaluates it (about
12 minutes on a 2-core CPU), then checks the bundle against the eager
ensemble on real images; then re-validates the run with the reweighted image
score deployed (``postprocess.image_score: detector``, about 3 more minutes)
and checks that bundle too. Latency, bundle size and the comparison with PaDiM
and STFPM are measured by ``benchmarks/bench_detectors.py``, not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BOTTLE, ROOT, assert_bottle_bundle_parity

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"real data not found at {BOTTLE}"),
]


def test_tiled_patchcore_on_bottle_meets_the_bars(tmp_path: Path) -> None:
    from tilead.runtime import read_manifest
    from tilead.trainer.config import load_config
    from tilead.trainer.evaluation import evaluate
    from tilead.trainer.pipeline import train

    cfg = load_config(ROOT / "configs" / "patchcore_bottle.yaml")
    result = train(cfg, tmp_path / "run", progress=False)
    run = json.loads(result.paths.run_json.read_text())
    assert run["model"]["family"] == "patchcore"
    assert run["model"]["feature_dim"] == 120
    # 1 % of 209 images x 58 x 58 positions per location.
    assert {v["state_bytes"] for v in run["fit_locations"].values()} == {7031 * 120 * 2 + 120 * 4 + 7031 * 9 * 8}
    report = evaluate(result.paths.root, progress=False).metrics
    m = report["metrics"]
    assert report["evaluated_at"] == [900, 900]
    assert m["image_auroc"] >= 0.99
    assert m["pixel_auroc"] >= 0.98
    assert m["image_auroc_detector_score"] >= 0.98  # the paper's reweighted score, not deployed here
    assert_bottle_bundle_parity(result.paths.root, tmp_path / "bundle")
    assert read_manifest(tmp_path / "bundle").model["family"] == "patchcore"
    # The reweighted score deployed: re-validate the fitted run (no refit), export, bundle vs eager on real images.
    shutil.copytree(result.paths.root, tmp_path / "run_score", ignore=shutil.ignore_patterns("eval*"))
    scored = train(
        load_config(ROOT / "configs" / "patchcore_bottle.yaml", {"postprocess.image_score": "detector"}),
        tmp_path / "run_score",
        resume=True,
        progress=False,
    )
    assert scored.fitted_now == 0
    info = json.loads(scored.paths.stats.read_text())["validation"]
    assert info["image_score"] == "detector"
    assert scored.stats.image_range != result.stats.image_range  # measured on the reweighted scores
    assert_bottle_bundle_parity(scored.paths.root, tmp_path / "bundle_score")
    assert read_manifest(tmp_path / "bundle_score").image_score == "detector"
