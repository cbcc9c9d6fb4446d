"""Train / resume / evaluate a tiny tiled ensemble on synthetic data, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.runtime import TileGrid, merge_maps
from tilead.runtime.stats import NormalizationStats
from tilead.trainer.config import ConfigError, load_config
from tilead.trainer.ensemble import make_backbone
from tilead.trainer.io import load_tensors
from tilead.trainer.run import load_location_models
from tilead.trainer.run_dir import RunPaths

pytestmark = pytest.mark.integration


def _config(tmp: Path, data_root: Path, **model: Any) -> Path:
    cfg = {
        "name": "tiny",
        "data": {"format": "mvtec", "root": str(data_root)},
        "grid": {"tile_size": 96, "stride": 80, "edge": "shift"},
        "model": {"feature_stride": 8, "n_features": 24, "blur_sigma": 1.0, **model},
        "train": {"batch_size": 4},
        "eval": {"batch_size": 4, "overlays": 3},
        "validation": {"force": True},  # fewer validation images than validation.min_images
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return generate(root, SyntheticSpec(image_size=176, train_good=8, test_good=3, test_per_defect=2, seed=7))


def test_train_resume_and_evaluate(tmp_path: Path, synthetic: Path) -> None:
    from tilead.cli.evaluate import main as eval_main
    from tilead.cli.train import main as train_main

    config = _config(tmp_path, synthetic)
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(train_main, ["--config", str(config), "--output", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    paths = RunPaths(run)
    grid = TileGrid(176, 96, stride=80)
    names = grid.location_names()
    assert sorted(p.stem for p in paths.locations.glob("*.safetensors")) == sorted(names)
    assert "4 fitted now" in res.output

    # One location's state: fp16 inverse covariances at 12x12 positions, 24 channels.
    tensors, meta = load_tensors(paths.checkpoint("r0c0"))
    assert tensors["inv_cov"].dtype.is_floating_point
    assert tensors["inv_cov"].element_size() == 2
    assert tuple(tensors["mean"].shape) == (144, 24)
    assert meta["images"] == "8"
    assert meta["location"] == "r0c0"

    run_json = json.loads(paths.run_json.read_text())
    assert run_json["status"] == "trained"
    assert run_json["grid_shape"] == [2, 2]
    assert run_json["splits"]["split"] == "same_as_test"
    stats = NormalizationStats.from_dict(json.loads(paths.stats.read_text())["normalization"])
    assert stats.stage == "image"

    # Running again without --resume refuses to overwrite.
    res = runner.invoke(train_main, ["--config", str(config), "--output", str(run), "--quiet"])
    assert res.exit_code != 0
    assert "--resume" in res.output

    # Interrupted run: drop two checkpoints, resume refits exactly those and keeps the others byte-identical.
    kept_bytes = paths.checkpoint("r0c0").read_bytes()
    paths.checkpoint("r1c0").unlink()
    paths.checkpoint("r1c1").unlink()
    res = runner.invoke(train_main, ["--config", str(config), "--output", str(run), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2 fitted now" in res.output
    assert paths.checkpoint("r0c0").read_bytes() == kept_bytes
    assert paths.checkpoint("r1c1").is_file()

    # A resumed run with another model config is refused.
    other = _config(tmp_path, synthetic, n_features=16)
    res = runner.invoke(train_main, ["--config", str(other), "--output", str(run), "--resume", "--quiet"])
    assert res.exit_code != 0
    assert "fit key" in res.output

    res = runner.invoke(eval_main, [str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "eval" / "metrics.json").read_text())
    m = report["metrics"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"):
        assert 0.0 <= m[key] <= 1.0
    # The synthetic defects are easy: a working detector separates them well.
    assert m["image_auroc"] >= 0.9
    assert m["pixel_auroc"] >= 0.9
    overlays = sorted((run / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == 3
    lines = (run / "eval" / "per_image.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + report["test_images"]


def test_eager_maps_merge_like_the_runtime(tmp_path: Path, synthetic: Path) -> None:
    """Validation statistics come from runtime-merged eager maps: recompute min/max independently."""
    import torch

    from tilead.trainer.data import discover
    from tilead.trainer.ensemble import location_maps, make_preprocessing
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.pipeline import train

    cfg = load_config(_config(tmp_path, synthetic))
    result = train(cfg, tmp_path / "run", progress=False)
    grid = TileGrid(176, 96, stride=80)
    extractor = make_backbone(cfg)
    prep = make_preprocessing(cfg, extractor)
    models = load_location_models(cfg, result.paths, grid, extractor)
    test = list(discover(cfg.data).test)
    maps, _, kept = location_maps(cfg, models, test, grid, prep, batch_size=3)
    assert maps.shape == (4, len(test), 12, 12)
    # Location r0c1's map of the first image, by hand: crop, normalize, forward.
    image = ImageLoader(cfg.data).load_image(kept[0])[:, :, ::-1].astype(np.float32) / 255.0  # BGR -> RGB
    crop = image[0:96, 80:176]
    x = torch.from_numpy(((crop - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        by_hand = models[1](x)[0, 0].numpy()
    np.testing.assert_allclose(maps[1, 0], by_hand, rtol=1e-4, atol=1e-4)
    merged = merge_maps(maps, grid, seam=cfg.postprocess.seam_smoothing())
    assert result.stats.pixel_range is not None
    assert result.stats.pixel_range[0] == pytest.approx(float(merged.min()), rel=1e-6)
    assert result.stats.pixel_range[1] == pytest.approx(float(merged.max()), rel=1e-6)


def test_bad_config_names_key_and_allowed_values(tmp_path: Path, synthetic: Path) -> None:
    path = _config(tmp_path, synthetic)
    data = yaml.safe_load(path.read_text())
    data["postprocess"] = {"normalization": "global"}
    data["grid"]["edgee"] = "shift"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "postprocess.normalization" in text
    assert "'image', 'tile' or 'none'" in text
    assert "grid.edgee: unknown key" in text
    assert "tile_size" in text


def test_tile_stage_holdout_split_and_parallel_workers(tmp_path: Path, synthetic: Path) -> None:
    from tilead.trainer.pipeline import evaluate, train

    cfg = load_config(
        _config(tmp_path, synthetic),
        {
            "postprocess.normalization": "tile",
            "postprocess.weights": "feather",
            "validation.split": "holdout",
            "validation.holdout_fraction": 0.25,
            "train.workers": 2,
            "train.threads": 2,
        },
    )
    result = train(cfg, tmp_path / "run", progress=False)
    stats = result.stats
    assert stats.stage == "tile"
    assert stats.tile_stats is not None
    assert len(stats.tile_stats.thresholds) == 4
    assert stats.pixel_threshold == 0.5
    assert stats.pixel_range == (0.0, 1.0)
    saved = json.loads(result.paths.stats.read_text())
    validation = saved["validation"]
    assert validation["split"]["split"] == "holdout"
    assert validation["split"]["fit_images"] == 6
    assert validation["split"]["validation_images"] == 2
    # A good-only validation split cannot fit an F1 threshold: the quantile rule is used and recorded.
    assert all("quantile" in r["rule"] for r in validation["pixel_threshold_rule"])
    for name in result.paths.root.joinpath("locations").glob("*.safetensors"):
        assert load_tensors(name)[1]["images"] == "6"
    report = evaluate(result.paths.root, progress=False).metrics
    assert report["normalization"] == "tile"
    assert report["metrics"]["image_auroc"] >= 0.9


def test_downscaled_config_is_evaluated_at_original_resolution(tmp_path: Path, synthetic: Path) -> None:
    from tilead.trainer.pipeline import evaluate, train

    overrides = {"data.image_size": 96, "grid.tile_size": 96, "grid.stride": 96, "eval.overlays": 1}
    cfg = load_config(_config(tmp_path, synthetic), overrides)
    result = train(cfg, tmp_path / "mono", progress=False)
    assert json.loads(result.paths.run_json.read_text())["grid_shape"] == [1, 1]
    original = evaluate(result.paths.root, tmp_path / "original", progress=False)
    assert original.metrics["evaluated_at"] == [176, 176]
    # The overlay shows the original-size image (two panels side by side, header and footer).
    import cv2

    from tilead.viz.overlays import frame

    picture = cv2.imread(str(original.overlays[0]))
    assert picture is not None
    head, foot = frame(176, 176)
    assert picture.shape == (head + 176 + foot, 352, 3)
    # The same run judged at the model's resolution.
    cfg_path = result.paths.config
    data = yaml.safe_load(cfg_path.read_text())
    data["eval"]["resolution"] = "model"
    cfg_path.write_text(yaml.safe_dump(data))
    model_res = evaluate(result.paths.root, tmp_path / "model", progress=False)
    assert model_res.metrics["evaluated_at"] == [96, 96]


def test_interrupted_fit_keeps_finished_locations(
    tmp_path: Path, synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt during the third location: two checkpoints survive, no partial file, resume finishes."""
    from tilead.trainer.padim import PadimAccumulator
    from tilead.trainer.pipeline import train

    cfg = load_config(_config(tmp_path, synthetic))
    real_update = PadimAccumulator.update
    calls = {"n": 0}

    def interrupting_update(self: PadimAccumulator, emb: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # 2 batches per location: the first batch of the third location
            raise KeyboardInterrupt
        real_update(self, emb)

    monkeypatch.setattr(PadimAccumulator, "update", interrupting_update)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    paths = RunPaths(tmp_path / "run")
    assert sorted(p.name for p in paths.locations.iterdir()) == ["r0c0.safetensors", "r0c1.safetensors"]
    assert not paths.stats.exists()
    assert json.loads(paths.run_json.read_text())["status"] == "fitting"

    monkeypatch.setattr(PadimAccumulator, "update", real_update)
    result = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert result.fitted_now == 2
    assert sorted(p.stem for p in paths.locations.iterdir()) == ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert json.loads(paths.run_json.read_text())["status"] == "trained"


def test_mixed_size_dataset_is_evaluated_at_each_images_own_resolution(tmp_path: Path, synthetic: Path) -> None:
    """Issue #19: images of different sizes, data.image_size set, eval.resolution original (the default)."""
    import shutil

    import cv2

    from tilead.trainer.pipeline import evaluate, train

    root = tmp_path / "mixed"
    shutil.copytree(synthetic, root)
    sizes = {"test/good/001.png": (150, 210), "test/scratch/000.png": (220, 190), "train/good/003.png": (200, 160)}
    for rel, (h, w) in sizes.items():
        path = root / rel
        cv2.imwrite(str(path), cv2.resize(np.asarray(cv2.imread(str(path))), (w, h), interpolation=cv2.INTER_AREA))
        mask = root / "ground_truth" / Path(rel).parent.name / f"{Path(rel).stem}_mask.png"
        if rel.startswith("test/") and mask.exists():
            gt = np.asarray(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))
            cv2.imwrite(str(mask), cv2.resize(gt, (w, h), interpolation=cv2.INTER_NEAREST))
    overrides = {"data.image_size": 96, "grid.tile_size": 96, "grid.stride": 96, "eval.overlays": 9}
    cfg = load_config(_config(tmp_path, root), overrides)
    result = train(cfg, tmp_path / "run", progress=False)
    report = evaluate(result.paths.root, tmp_path / "eval", progress=False, report_page=True)
    assert report.metrics["evaluated_at"] == "original (mixed sizes)"
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1"):
        assert 0.0 <= report.metrics["metrics"][key] <= 1.0
    assert report.metrics["metrics"]["image_auroc"] >= 0.8
    # Overlays at each image's own size (image and map panels side by side).
    from tilead.viz.overlays import frame

    def framed(h: int, w: int) -> tuple[int, int]:
        head, foot = frame(h, w)
        return (head + h + foot, 2 * w)

    shapes = {p.name: np.asarray(cv2.imread(str(p))).shape[:2] for p in report.overlays}
    assert shapes["scratch_000.png"] == framed(220, 190)
    assert shapes["good_000.png"] == framed(176, 176)
    # The HTML report of a mixed-size evaluation: its gallery draws each image at its own size.
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("<img") >= 1
    assert "data:image/png;base64," in page
    # The same run at the model's resolution still works (one size: 96x96).
    model_res = evaluate(result.paths.root, tmp_path / "model", progress=False, overrides={"eval.resolution": "model"})
    assert model_res.metrics["evaluated_at"] == [96, 96]
