"""Evaluation is one path over any map source: the eager ensemble and the bundle give the same maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tilead.trainer.components import run_grid
from tilead.trainer.data import discover
from tilead.trainer.evaluation import BundleMaps, EagerMaps, MapSource, eval_samples, infer_maps
from tilead.trainer.images import ImageLoader
from tilead.trainer.run_dir import open_run


@pytest.mark.integration
def test_eager_and_bundle_sources_give_the_same_maps(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    paths, cfg = open_run(run)
    test = eval_samples(cfg, discover(cfg.data))
    assert not test.good_only
    assert test.held == set()
    grid = run_grid(cfg, ImageLoader(cfg.data), test.samples)
    outputs = []
    sources: list[MapSource] = [EagerMaps(cfg, paths, grid), BundleMaps(bundle, cfg, grid)]
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
def test_bundle_source_refuses_another_run_and_use_outside_with(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    _, cfg = open_run(run)
    grid = run_grid(cfg, ImageLoader(cfg.data), list(discover(cfg.data).test))
    source = BundleMaps(bundle, cfg, grid)
    images = np.zeros((1, *grid.image_size, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="use it inside 'with'"):
        source.location_outputs(images)
    other = cfg.model_copy(update={"seed": cfg.seed + 1})  # another fit key
    with pytest.raises(ValueError, match="exported from another run"), BundleMaps(bundle, other, grid):
        pass
    with source:
        maps, scores = source.location_outputs(images)
    assert maps.shape[:2] == (grid.rows * grid.cols, 1)
    assert scores is None
    with pytest.raises(RuntimeError, match="use it inside 'with'"):  # closed again on exit
        source.location_outputs(images)
