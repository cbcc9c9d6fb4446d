"""Trainer building blocks without training: config, statistics, atomic files, overlays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tilead.runtime import SeamSmoothing, TileGrid, merge_maps
from tilead.runtime.postprocessor import NormalizationStats, PostProcessor, TileStats, postprocess_maps
from tilead.trainer.config import ConfigError, load_config, parse_config
from tilead.trainer.detectors.padim.config import PadimConfig
from tilead.trainer.io import atomic_write_bytes, load_tensors, read_metadata, save_tensors
from tilead.trainer.validation import compute_stats
from tilead.viz.overlays import pick_overlays

# -- config -------------------------------------------------------------------------------------


def _minimal(**extra: Any) -> dict[str, Any]:
    return {"data": {"format": "mvtec", "root": "data"}, "grid": {"tile_size": 64}, **extra}


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = parse_config(_minimal(), base_dir=tmp_path)
    assert cfg.data.root == tmp_path / "data"  # relative to the config's folder
    assert isinstance(cfg.model, PadimConfig)  # the default family
    assert cfg.model.backbone.name == "efficientnet_lite0"
    assert cfg.model.backbone.layers == ("blocks.1", "blocks.2", "blocks.3")
    assert cfg.model.feature_stride == 8
    assert cfg.model.n_features == 100
    assert cfg.postprocess.normalization == "image"
    assert cfg.validation.split == "same_as_test"
    assert cfg.postprocess.seam_smoothing() == SeamSmoothing(2.0, 0.1)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"model": {"feature_stride": 5}}, "model.feature_stride"),
        ({"model": {"n_features": 0}}, "model.n_features"),
        ({"model": {"backbone": {"name": "resnet18"}}}, "model.backbone.name"),
        ({"postprocess": {"weights": "gauss"}}, "postprocess.weights"),
        ({"postprocess": {"seam": {"sigma": 99}}}, "seam.sigma"),
        ({"validation": {"split": "val"}}, "'same_as_test', 'holdout' or 'synthetic'"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"trian": {}}, "trian: unknown key; allowed keys here: schema_version, name, seed, data, grid"),
        ({"name": "a b"}, "name"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, patch: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_minimal(**patch), base_dir=tmp_path, source="x.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("x.yaml: invalid configuration")


def test_missing_sections_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grid: Field required"):
        parse_config({"data": {"format": "mvtec", "root": "d"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_overrides_and_fit_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    base = load_config(path)
    more = load_config(path, {"data.max_train_images": 5, "eval.overlays": 0})
    assert more.data.max_train_images == 5
    assert more.eval.overlays == 0
    # Evaluation settings do not change what a location is fitted on; data and model do.
    assert load_config(path, {"eval.overlays": 0}).fit_key() == base.fit_key()
    assert load_config(path, {"postprocess.normalization": "tile"}).fit_key() == base.fit_key()
    assert more.fit_key() != base.fit_key()
    assert load_config(path, {"model.n_features": 50}).fit_key() != base.fit_key()


def test_grid_that_does_not_fit_the_images(tmp_path: Path) -> None:
    cfg = parse_config(_minimal(grid={"tile_size": 512}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"grid: tile_size.*image size 256x256"):
        cfg.grid.build((256, 256))


# -- statistics ---------------------------------------------------------------------------------


def _maps(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, TileGrid]:
    """Random per-location maps with a bright blob in image 1 and its mask."""
    rng = np.random.default_rng(seed)
    grid = TileGrid(64, 32, stride=24)
    maps = rng.uniform(0, 1, size=(grid.num_locations, 3, 8, 8)).astype(np.float32)
    maps[0, 1, 2:5, 2:5] += 5.0  # anomaly in image 1, location r0c0
    masks = np.zeros((3, 64, 64), dtype=bool)
    masks[1, 10:18, 10:18] = True
    labels = np.array([0, 1, 0])
    return maps, masks, labels, grid


def test_image_stage_stats_come_from_merged_maps() -> None:
    maps, masks, labels, grid = _maps()
    seam = SeamSmoothing(2.0, 0.1)
    stats, info = compute_stats(
        maps, masks, labels, PostProcessor(grid, "uniform", seam), stage="image", good_quantile=0.99
    )
    merged = merge_maps(maps, grid, seam=seam)
    scores = merged.reshape(3, -1).max(axis=1)
    assert stats.pixel_range == (float(merged.min()), float(merged.max()))
    assert stats.image_range == (float(scores.min()), float(scores.max()))
    # F1-adaptive image threshold separates the one anomalous image exactly.
    assert scores[0] <= stats.image_threshold < scores[1]
    assert scores[2] <= stats.image_threshold
    assert info["image_threshold_rule"]["rule"] == "f1_adaptive"
    assert info["image_threshold_rule"]["f1"] == 1.0
    _, result = postprocess_maps(maps, grid, stats, seam=seam)
    assert result.labels.tolist() == [False, True, False]
    lo, hi = stats.image_range
    expected = np.clip((scores - stats.image_threshold) / (hi - lo) + 0.5, 0, 1)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5)


def test_none_stage_keeps_raw_values_and_good_only_uses_the_quantile() -> None:
    maps, masks, _, grid = _maps()
    masks[:] = False
    labels = np.zeros(3, dtype=int)
    stats, info = compute_stats(
        maps, masks, labels, PostProcessor(grid, "feather", None), stage="none", good_quantile=0.9
    )
    merged = merge_maps(maps, grid, weights="feather")
    assert stats.pixel_range is None
    assert stats.image_range is None
    assert stats.pixel_threshold == pytest.approx(float(np.quantile(merged.astype(np.float64), 0.9)))
    assert "quantile 0.9" in info["pixel_threshold_rule"]["rule"]


def test_tile_stage_normalizes_each_location() -> None:
    maps, masks, labels, grid = _maps()
    stats, _ = compute_stats(maps, masks, labels, PostProcessor(grid), stage="tile", good_quantile=0.99)
    assert stats.tile_stats is not None
    ts = stats.tile_stats
    # Location r1c1 sees only uniform noise: its range is its own min/max (of the upsampled maps).
    assert ts.mins[3] >= 0.0
    assert ts.maxs[3] <= 1.0
    assert ts.maxs[0] > 5.0  # the anomaly's location has a much larger range
    merged, result = postprocess_maps(maps, grid, stats)
    assert merged.min() >= 0.0
    assert merged.max() <= 1.0
    assert result.labels[1]


def test_stats_roundtrip_and_validation() -> None:
    stats = NormalizationStats("tile", 0.5, 0.7, (0.0, 1.0), (0.2, 0.9), TileStats((1.0, 2.0), (0.0, 0.5), (3.0, 4.0)))
    assert NormalizationStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError, match="needs pixel_range"):
        NormalizationStats("image", 1.0, 1.0)
    with pytest.raises(ValueError, match="tile_stats: required"):
        NormalizationStats("tile", 0.5, 0.5, (0.0, 1.0), (0.0, 1.0))
    with pytest.raises(ValueError, match="min < max"):
        NormalizationStats.from_dict({"stage": "image", "pixel_threshold": 1, "image_threshold": 1,
                                      "pixel_range": [2, 1], "image_range": [0, 1]})  # fmt: skip
    with pytest.raises(ValueError, match="unknown keys"):
        NormalizationStats.from_dict({"stage": "none", "pixel_threshold": 1, "image_threshold": 1, "extra": 0})
    with pytest.raises(ValueError, match="location 0 has min"):
        TileStats((1.0,), (2.0,), (2.0,))


def test_canvas_masks_follow_the_edge_policy() -> None:
    masks = np.zeros((1, 50, 50), dtype=bool)
    masks[0, 40:50, 40:50] = True
    padded = TileGrid(50, 32, edge="pad").image_to_canvas(masks)
    assert padded.shape == (1, 64, 64)
    assert padded.dtype == np.bool_
    assert padded[0, 40:50, 40:50].all()
    assert not padded[0, 50:].any()
    resized = TileGrid(50, 32, edge="resize").image_to_canvas(masks)
    assert resized.shape == (1, 64, 64)
    assert resized.dtype == np.bool_
    assert resized[0, 55, 55]
    assert not resized[0, 10, 10]
    assert TileGrid(50, 32).image_to_canvas(masks) is masks


# -- files --------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def failing_write(path: Path) -> None:
        raise OSError("disk full")

    from tilead import atomic

    with pytest.raises(OSError, match="disk full"):
        atomic._atomic(target, failing_write)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no temporary left behind


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"{}")
    plain = tmp_path / "plain.json"
    plain.write_bytes(b"{}")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_safetensors_roundtrip_and_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "r0c0.safetensors"
    save_tensors(path, {"a": torch.arange(6.0).reshape(2, 3)}, {"fit_key": "k"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
    assert meta == {"fit_key": "k"}
    assert read_metadata(path) == {"fit_key": "k"}
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_tensors(path)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_overlay_selection() -> None:
    # The pictures themselves: tests/test_viz_overlays.py.
    types = ["good"] * 5 + ["crack"] * 2 + ["scratch"] * 3
    picked = pick_overlays(types, 4)
    assert len(picked) == 4
    assert {types[i] for i in picked} == {"good", "crack", "scratch"}
    assert pick_overlays(types, 0) == []
    assert len(pick_overlays(types, 50)) == len(types)


# -- command line -------------------------------------------------------------------------------


def test_overrides_parse_yaml_values_and_reject_garbage() -> None:
    import click

    from tilead.cli._common import parse_overrides

    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=none", "e=text"]) == {
        "a.b": 3,
        "c": [1, 2],
        "d": "none",
        "e": "text",
    }
    with pytest.raises(click.BadParameter, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])


def test_train_cli_reports_bad_config_and_missing_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tilead.cli.evaluate import main as eval_main
    from tilead.cli.train import main as train_main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_minimal(model={"n_features": -1})))
    res = CliRunner().invoke(train_main, ["--config", str(cfg)])
    assert res.exit_code == 1
    assert "model.n_features" in res.output
    assert "greater than or equal to 1" in res.output
    cfg.write_text(yaml.safe_dump(_minimal()))
    res = CliRunner().invoke(train_main, ["--config", str(cfg), "--output", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert "dataset root not found" in res.output
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
    res = CliRunner().invoke(eval_main, [str(tmp_path)])
    assert res.exit_code == 1
    assert "not a tilead run folder" in res.output
