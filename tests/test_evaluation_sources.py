"""Evaluation is one path over any map source: the eager ensemble and the bundle give the same maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tilead.trainer.data import discover
from tilead.trainer.evaluation import BundleMaps, EagerMaps, MapSource, eval_samples, infer_maps
from tilead.trainer.run import Run


@pytest.mark.integration
def test_eager_and_bundle_sources_give_the_same_maps(tiny_trained: tuple[Path, Path]) -> None:
    root, bundle = tiny_trained
    run = Run.open(root)
    cfg, grid = run.config, run.grid
    test = eval_samples(cfg, discover(cfg.data))
    assert not test.good_only
    assert test.held == set()
    outputs = []
    sources: list[MapSource] = [EagerMaps(cfg, run), BundleMaps(bundle, run, cfg)]
    for source in sources:
        with source:
            outputs.append(infer_maps(cfg, test.samples, source, progress=False))
    eager, runtime = outputs
    assert [s.path for s in eager.kept] == [s.path for s in runtime.kept] == [s.path for s in test.samples]
    assert eager.maps.shape == runtime.maps.shape == (grid.rows * grid.cols, len(test.samples), *eager.maps.shape[2:])
    span = float(eager.maps.max() - eager.maps.min())
    assert np.abs(eager.maps - runtime.maps).max() <= 1e-4 * span
    np.testing.assert_array_equal(eager.masks, runtime.masks)
    assert eager.tile_scores is None
    assert runtime.tile_scores is None
    assert sources[1].description == f"runtime.Predictor on bundle {bundle}"


@pytest.mark.integration
def test_bundle_source_refuses_another_run_and_use_outside_with(
    tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bundle = tiny_trained
    run = Run.open(root)
    cfg, grid = run.config, run.grid
    source = BundleMaps(bundle, run, cfg)
    images = np.zeros((1, *grid.image_size, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="use it inside 'with'"):
        source.location_outputs(images)
    other = tmp_path / "other"  # the same run, validated again since: its statistics differ from the bundle's
    shutil.copytree(root, other)
    stats = json.loads((other / "stats.json").read_text())
    stats["normalization"]["pixel_threshold"] += 1e-3
    (other / "stats.json").write_text(json.dumps(stats))
    refused = r"not exported from the run .* normalization statistics differ"
    with pytest.raises(ValueError, match=refused), BundleMaps(bundle, Run.open(other), cfg):
        pass
    with source:
        maps, scores, thumbnail = source.location_outputs(images)
    assert maps.shape[:2] == (grid.rows * grid.cols, 1)
    assert scores is None
    assert thumbnail is None
    with pytest.raises(RuntimeError, match="use it inside 'with'"):  # closed again on exit
        source.location_outputs(images)


@pytest.mark.integration
def test_bundle_source_passes_predictor_options(tiny_trained: tuple[Path, Path]) -> None:
    """``predictor_options`` reach the Predictor: OpenVINO's maps equal ONNX Runtime's; a bad option is refused."""
    root, bundle = tiny_trained
    run = Run.open(root)
    cfg = run.config
    samples = eval_samples(cfg, discover(cfg.data)).samples[:3]
    default, openvino = BundleMaps(bundle, run, cfg), BundleMaps(bundle, run, cfg, {"backend": "openvino"})
    with default:
        want = infer_maps(cfg, samples, default, progress=False)
    with openvino:
        assert openvino._predictor is not None
        assert openvino._predictor.backend == "openvino"
        got = infer_maps(cfg, samples, openvino, progress=False)
    span = float(want.maps.max() - want.maps.min())
    assert np.abs(got.maps - want.maps).max() <= 1e-4 * span
    with pytest.raises(ValueError, match="backend: expected one of"), BundleMaps(bundle, run, cfg, {"backend": "x"}):
        pass
