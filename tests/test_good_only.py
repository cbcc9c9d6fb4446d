"""Good images only (#17): datasets without defects, synthetic validation, guard rails, false-alarm reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.config import ConfigError, RunConfig, load_config, parse_config
from tilead.trainer.evaluation import good_only_metrics
from tilead.trainer.pipeline import train
from tilead.trainer.validation import check_validation_count, compute_stats, false_alarm_estimate


def _good_only_data(root: Path, train_good: int, size: int = 128) -> Path:
    """Demo data with its test set removed: ``train/good`` only."""
    data = generate(root, SyntheticSpec(image_size=size, train_good=train_good, test_good=1, test_per_defect=1, seed=5))
    shutil.rmtree(data / "test")
    shutil.rmtree(data / "ground_truth")
    return data


def _config(tmp: Path, data: Path, **validation: Any) -> Path:
    cfg = {
        "name": "good_only",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 80, "stride": 48},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "eval": {"batch_size": 4, "overlays": 0},
        "validation": validation,
    }
    path = tmp / "good_only.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- guard rails (no fitting) -------------------------------------------------------------------------


def test_too_few_held_out_images_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    data = _good_only_data(tmp_path / "data", train_good=12)  # holds out round(12 * 0.34) = 4
    cfg = load_config(_config(tmp_path, data, split="synthetic", holdout_fraction=0.34))
    with pytest.raises(ValueError, match=r"thresholds would come from 4 good validation images, fewer than") as err:
        train(cfg, tmp_path / "run", progress=False)
    assert "validation.min_images (10)" in str(err.value)
    assert "validation.force: true" in str(err.value)
    assert "holdout_fraction" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_same_as_test_without_a_test_set_says_what_to_use(tmp_path: Path) -> None:
    data = _good_only_data(tmp_path / "data", train_good=6)
    cfg = load_config(_config(tmp_path, data, split="same_as_test"))
    with pytest.raises(ValueError, match=r"no test images .* use validation\.split: synthetic"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_check_validation_count() -> None:
    assert check_validation_count(10, "holdout", 10, False) == ""
    with pytest.raises(ValueError, match=r"from 9 validation images, fewer than validation.min_images \(10\)"):
        check_validation_count(9, "holdout", 10, False)
    with pytest.raises(ValueError, match="add test images"):
        check_validation_count(3, "same_as_test", 5, False)
    assert "only 2 validation images (min_images 10)" in check_validation_count(2, "synthetic", 10, True)


def test_false_alarm_estimate_counts_strictly_above_the_threshold() -> None:
    scores = np.array([0.1, 0.5, 0.6, 0.9, 0.5, 0.2])
    labels = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    est = false_alarm_estimate(scores, labels, 0.5)
    assert (est["good_images"], est["false_alarms"], est["false_alarm_rate"]) == (4, 2, 0.5)
    assert (est["anomalous_images"], est["misses"], est["miss_rate"]) == (2, 2, 1.0)
    assert est["in_sample"] is True
    only_good = false_alarm_estimate(scores[:4], labels[:4], 0.95)
    assert (only_good["false_alarms"], only_good["miss_rate"]) == (0, None)
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        false_alarm_estimate(scores[:3], labels[:2], 0.5)


def test_compute_stats_records_the_false_alarm_estimate() -> None:
    from tilead.runtime import PostProcessor, TileGrid

    grid = TileGrid((8, 8), (8, 8))
    maps = np.zeros((1, 4, 8, 8), dtype=np.float32)
    maps[0, :, 0, 0] = [1.0, 2.0, 3.0, 9.0]  # image maxima; images 2 and 3 are anomalous
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2:, 0, 0] = True
    labels = np.array([0, 0, 1, 1], dtype=bool)
    _, info = compute_stats(maps, masks, labels, PostProcessor(grid), stage="image", good_quantile=0.99)
    est = info["false_alarm_estimate"]
    assert (est["good_images"], est["anomalous_images"], est["false_alarms"], est["misses"]) == (2, 2, 0, 0)


def test_good_only_metrics() -> None:
    predicted = np.array([True, False, False, True, False])
    masks = np.zeros((5, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    in_holdout = np.array([False, False, True, True, True])
    m = good_only_metrics(predicted, masks, in_holdout)
    assert (m["false_alarms"], m["good_images"], m["false_alarm_rate"]) == (2, 5, 0.4)
    assert (m["false_alarms_test_good"], m["good_images_test_good"]) == (1, 2)
    assert m["false_alarm_rate_holdout"] == pytest.approx(1 / 3)
    assert m["pixel_false_alarm_rate"] == pytest.approx(1 / 20)
    assert "good_images_test_good" not in good_only_metrics(predicted, masks, np.ones(5, dtype=bool))


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"synthetic_kinds": ["crack"]}, "unknown kind(s) ['crack']"),
        ({"synthetic_kinds": []}, "expected at least one of"),
        ({"synthetic_kinds": ["spot", "spot"]}, "lists a kind twice"),
        ({"synthetic_per_image": 0}, "validation.synthetic_per_image"),
        ({"min_images": 0}, "validation.min_images"),
        ({"split": "synth"}, "'same_as_test', 'holdout' or 'synthetic'"),
    ],
)
def test_bad_validation_keys_are_named(tmp_path: Path, validation: dict[str, Any], message: str) -> None:
    data = {"data": {"format": "mvtec", "root": "x"}, "grid": {"tile_size": 32}, "validation": validation}
    with pytest.raises(ConfigError) as err:
        parse_config(data, base_dir=tmp_path)
    assert message in str(err.value)


def test_holdout_and_synthetic_share_the_fit() -> None:
    base = {"data": {"format": "mvtec", "root": "/x"}, "grid": {"tile_size": 32}}
    keys = {
        split: RunConfig.model_validate({**base, "validation": {"split": split}}).fit_key()
        for split in ("holdout", "synthetic", "same_as_test")
    }
    assert keys["holdout"] == keys["synthetic"] != keys["same_as_test"]


# -- end to end -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_good_only_synthetic_validation_end_to_end(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tilead.cli.evaluate import main as eval_main
    from tilead.cli.train import main as train_main
    from tilead.exporter.bundle import export_bundle

    data = _good_only_data(tmp_path / "data", train_good=30)  # 10 held out, 20 fitted
    config = _config(tmp_path, data, split="synthetic", holdout_fraction=0.34, synthetic_examples=4)
    run = tmp_path / "run"
    res = CliRunner().invoke(train_main, ["--config", str(config), "--output", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "validation: synthetic: 10 good + 20 anomalous images" in res.output
    assert "in-sample estimate" in res.output

    stats = json.loads((run / "stats.json").read_text())
    split = stats["validation"]["split"]
    assert (split["fit_images"], split["validation_good"], split["validation_anomalous"]) == (20, 10, 20)
    syn = split["synthetic"]
    assert sum(syn["kinds"].values()) == syn["defects"] == 20
    assert set(syn["kinds"]) == {"perlin_texture", "cutpaste", "scar", "scratch", "spot", "blotch"}
    assert syn["area_px"]["min"] <= syn["area_px"]["median"] <= syn["area_px"]["max"]
    assert len(syn["examples"]) == 4
    for example in syn["examples"]:
        assert (run / example).is_file()
        assert (run / example.replace(".png", "_mask.png")).is_file()
    image_rule = stats["validation"]["image_threshold_rule"]
    pixel_rule = stats["validation"]["pixel_threshold_rule"]
    assert image_rule["rule"] == "max(f1_adaptive, good bound)"
    assert stats["normalization"]["image_threshold"] == max(image_rule["f1_adaptive"], image_rule["good_bound"])
    assert image_rule["false_alarm_bound"] == pytest.approx(1 / 11)  # 10 held-out images: their largest score
    assert pixel_rule["rule"].startswith("min(f1_adaptive, good pixel quantile) when f1_adaptive is pinned")
    pinned = pixel_rule["f1_adaptive"] <= pixel_rule["pinned_below"]
    capped = min(pixel_rule["f1_adaptive"], pixel_rule["good_pixel_quantile"])
    assert stats["normalization"]["pixel_threshold"] == (capped if pinned else pixel_rule["f1_adaptive"])
    assert split["false_alarm_estimate"]["good_images"] == 10
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["splits"] == split

    # Good-only evaluation: false alarms on the held-out (never fitted) good images.
    res = CliRunner().invoke(eval_main, [str(run), "--quiet", "--report"])
    assert res.exit_code == 0, res.output
    assert "good images only" in res.output
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert report["good_only"] is True
    assert report["metrics"]["good_images_holdout"] == 10
    assert 0 <= report["metrics"]["false_alarm_rate"] <= 1
    # The HTML report is the false-alarm view: no curves, no misses, the held-out images as their own group.
    page = (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "Only good images: ROC and precision-recall curves need defective images." in page
    assert "No defective image in this data set: no miss to show." in page
    assert "<td class='l'>good (held out)</td><td>10</td>" in page
    assert "false_alarm_rate" in page
    assert page.count('<img src="data:image/png;base64,') == 4  # the 4 highest-scoring good images

    # The manifest carries the split record, false-alarm estimate included.
    bundle = export_bundle(run, tmp_path / "bundle", progress=False).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["validation"]["false_alarm_estimate"] == split["false_alarm_estimate"]

    # Re-validate the fitted run with the quantile rule: nothing is refitted.
    again = train(load_config(config, {"validation.split": "holdout"}), run, resume=True, progress=False)
    assert again.fitted_now == 0
    requant = json.loads((run / "stats.json").read_text())["validation"]
    assert requant["image_threshold_rule"]["rule"].startswith("quantile")
    assert "synthetic" not in requant["split"]


# -- every image decoded before fitting (#16 item 7) -------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    from tilead.trainer.data import DatasetError

    data = _good_only_data(tmp_path / "data", train_good=8)
    victim = sorted((data / "train" / "good").glob("*.png"))[5]
    _truncate(victim)
    cfg = load_config(_config(tmp_path, data, split="holdout", holdout_fraction=0.25, force=True))
    with pytest.raises(DatasetError, match=victim.name):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_skipped_files_are_listed_once_and_counts_agree(tmp_path: Path) -> None:
    data = _good_only_data(tmp_path / "data", train_good=12)
    cfg = load_config(_config(tmp_path, data, split="holdout", holdout_fraction=0.34, force=True))
    from tilead.trainer.data import discover
    from tilead.trainer.splits import make_splits

    splits = make_splits(cfg, discover(cfg.data))
    bad = [splits.fit[0].path, splits.validation[0].path]
    for path in bad:
        _truncate(path)
    cfg = load_config(
        _config(tmp_path, data, split="holdout", holdout_fraction=0.34, force=True), {"data.skip_bad_files": True}
    )
    result = train(cfg, tmp_path / "run", progress=False)
    run_json = json.loads((result.paths.run_json).read_text())
    stats = json.loads(result.paths.stats.read_text())["validation"]
    assert sorted(p for p, _ in run_json["skipped_files"]) == sorted(str(p) for p in bad)
    assert run_json["splits"] == stats["split"]
    assert stats["split"]["skipped_files"] == 2
    assert (stats["split"]["fit_images"], stats["split"]["validation_images"]) == (
        len(splits.fit) - 1,
        len(splits.validation) - 1,
    )
    assert stats["images"] == len(splits.validation) - 1
    assert run_json["status"] == "trained"
