"""The thumbnail branch in training (issue #20): config rules, per-branch statistics and the weight choice.

End to end (integration): fit, validate, export; the Predictor and eager evaluation agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tilead.trainer.config import ConfigError, RunConfig, load_config, parse_config
from tilead.trainer.thumbnail import branch_stats, choose_branch, thumbnail_blur


def config(tmp_path: Path, **sections: Any) -> RunConfig:
    data = {"data": {"format": "mvtec", "root": str(tmp_path)}, "grid": {"tile_size": 96, "stride": 64}, **sections}
    return parse_config(data, base_dir=tmp_path)


# -- config -------------------------------------------------------------------------------------------------


def test_thumbnail_is_off_by_default_and_leaves_the_fit_key_alone(tmp_path: Path) -> None:
    plain = config(tmp_path)
    assert plain.model.thumbnail is None
    with_thumb = config(tmp_path, model={"thumbnail": {"size": 256}})
    assert with_thumb.model.thumbnail is not None
    assert with_thumb.model.thumbnail.fusion == "max"
    # Adding a thumbnail to a fitted run fits only the thumbnail: the tile locations keep their key.
    assert with_thumb.fit_key() == plain.fit_key()
    other = config(tmp_path, model={"thumbnail": {"size": 128}})
    assert len({plain.thumbnail_key(), with_thumb.thumbnail_key(), other.thumbnail_key()}) == 3
    assert config(tmp_path, seed=1, model={"thumbnail": {"size": 256}}).thumbnail_key() != with_thumb.thumbnail_key()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"thumbnail": {"size": 16}}}, "model.thumbnail.size"),
        ({"model": {"thumbnail": {"size": 256, "fusion": "mean"}}}, "model.thumbnail.fusion"),
        ({"model": {"thumbnail": {"size": 256, "weights": [0.5, 1.5]}}}, "weights in \\[0, 1\\]"),
        ({"model": {"thumbnail": {"size": 256, "weights": []}}}, "weights in \\[0, 1\\]"),
        ({"model": {"thumbnail": {"size": 256, "blur": -1}}}, "model.thumbnail.blur.*greater than or equal to 0"),
        ({"model": {"thumbnail": {"size": 256, "blur": "wide"}}}, "model.thumbnail.blur.*'model' or 'matched'"),
        (
            {"model": {"thumbnail": {"size": 256, "fusion": "weighted"}}, "validation": {"split": "holdout"}},
            "validation.split 'holdout' has none",
        ),
        (
            {"model": {"family": "patchcore", "thumbnail": {"size": 256}}, "postprocess": {"image_score": "detector"}},
            "image_score 'detector'",
        ),
    ],
)
def test_bad_thumbnail_settings_are_clear_config_errors(tmp_path: Path, sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **sections)


@pytest.mark.parametrize(
    ("blur", "image_size", "want"),
    [("model", (900, 900), 2.0), ("matched", (900, 900), 2.0 * 256 / 900), ("matched", (600, 1200), 2.0 * 256 / 1200),
     (0, (900, 900), 0.0), (0.75, (900, 900), 0.75)],
)  # fmt: skip
def test_thumbnail_blur_is_the_models_the_tiles_in_image_pixels_or_a_sigma(
    tmp_path: Path, blur: str | float, image_size: tuple[int, int], want: float
) -> None:
    cfg = config(tmp_path, model={"blur_sigma": 2.0, "thumbnail": {"size": 256, "blur": blur}})
    assert thumbnail_blur(cfg, image_size) == pytest.approx(want)


def test_a_matched_blur_covers_as_many_image_pixels_as_the_tiles_blur(tmp_path: Path) -> None:
    # A tile-map pixel is feature_stride image pixels; a thumbnail-map pixel is feature_stride * side / size.
    cfg = config(
        tmp_path, model={"blur_sigma": 2.0, "feature_stride": 8, "thumbnail": {"size": 256, "blur": "matched"}}
    )
    thumbnail_map_px = 8 * 900 / 256
    assert thumbnail_blur(cfg, (900, 900)) * thumbnail_map_px == pytest.approx(2.0 * 8)


# -- statistics and the weight choice -------------------------------------------------------------------------


def scene(seed: int = 0, n: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps ``(n, 64, 64)`` with a large defect on every other image: ``(masks, labels, defect)``."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 64, 64), dtype=bool)
    labels = np.arange(n) % 2 == 1
    for i in np.flatnonzero(labels):
        y, x = rng.integers(4, 30, size=2)
        masks[i, y : y + 24, x : x + 24] = True
    return masks, labels, masks.astype(np.float32)


def test_branch_stats_are_the_f1_threshold_and_range() -> None:
    masks, _, defect = scene()
    maps = (defect * 3 + np.random.default_rng(1).normal(0, 0.5, defect.shape)).astype(np.float32)
    stats, rule = branch_stats(maps, masks, 0.99)
    assert rule["rule"] == "f1_adaptive"
    assert stats.min == pytest.approx(float(maps.min()))
    assert stats.max == pytest.approx(float(maps.max()))
    assert float(maps[~masks].mean()) < stats.threshold < float(maps[masks].mean())


@pytest.mark.parametrize("informative", ["thumbnail", "tiled"])
def test_the_weight_follows_the_branch_that_sees_the_defects(tmp_path: Path, informative: str) -> None:
    masks, labels, defect = scene()
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 1, defect.shape).astype(np.float32)
    seen = (defect * 4 + 0.3 * noise).astype(np.float32)
    blind = (rng.normal(0, 1, defect.shape)).astype(np.float32)
    tiled, thumb_full = (blind, seen) if informative == "thumbnail" else (seen, blind)
    thumb = thumb_full[:, ::8, ::8].copy()  # a coarse thumbnail map, upsampled again by choose_branch
    cfg = config(tmp_path, model={"thumbnail": {"size": 64, "fusion": "weighted", "weights": [0.1, 0.5, 0.9]}})
    branch, info = choose_branch(cfg, tiled, thumb, masks, labels)
    assert branch.weight == (0.1 if informative == "thumbnail" else 0.9)
    assert set(info["candidates"]) == {"0.1", "0.5", "0.9"}
    assert branch.map_size == (8, 8)


def test_max_fusion_has_no_weight_and_weighted_needs_anomalies(tmp_path: Path) -> None:
    masks, labels, defect = scene()
    maps = (defect + np.random.default_rng(3).normal(0, 0.2, defect.shape)).astype(np.float32)
    small = maps[:, ::8, ::8].copy()
    branch, info = choose_branch(config(tmp_path, model={"thumbnail": {"size": 64}}), maps, small, masks, labels)
    assert branch.fusion == "max"
    assert branch.weight is None
    assert "candidates" not in info
    assert set(info["validation_quality"]) == {"tiled", "thumbnail", "max"}
    weighted = config(tmp_path, model={"thumbnail": {"size": 64, "fusion": "weighted"}})
    good = ~labels
    with pytest.raises(ValueError, match="needs good and anomalous validation images"):
        choose_branch(weighted, maps[good], small[good], masks[good], labels[good])


# -- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_thumbnail_run_end_to_end(tmp_path: Path) -> None:
    """Train tiny, add the thumbnail with --resume (no location refitted), export, Predictor == eager evaluation."""
    import cv2

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.exporter.bundle import export_bundle
    from tilead.runtime import Predictor
    from tilead.trainer.eager import load_eager_ensemble
    from tilead.trainer.evaluation import evaluate
    from tilead.trainer.pipeline import train

    data = generate(
        tmp_path / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=3)
    )
    cfg: dict[str, Any] = {
        "name": "tiny",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "postprocess": {"weights": "feather"},
        "validation": {"force": True},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(load_config(path), tmp_path / "run", progress=False).paths
    plain_eval = evaluate(run.root, progress=False).metrics["metrics"]
    stamps = {p.name: p.stat().st_mtime_ns for p in run.locations.iterdir()}

    thumb = {"size": 64, "fusion": "weighted", "weights": [0.3, 0.7], "blur": "matched"}
    result = train(load_config(path, {"model.thumbnail": thumb}), run.root, resume=True, progress=False)
    assert result.fitted_now == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.locations.iterdir()} == stamps  # locations not refitted
    stats = json.loads(run.stats.read_text())
    assert stats["thumbnail"]["size"] == 64
    assert stats["thumbnail"]["weight"] in (0.3, 0.7)
    assert stats["validation"]["thumbnail"]["weight"] == stats["thumbnail"]["weight"]
    assert (run.root / "thumbnail" / "size64.safetensors").is_file()
    assert stats["validation"]["thumbnail"]["blur_sigma"] == pytest.approx(1.0 * 64 / 160)  # matched: 0.4 map px

    bundle = export_bundle(run.root, tmp_path / "bundle", progress=False).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["thumbnail"]["file"] == "thumbnail.onnx"
    assert manifest["source"]["parity_onnxruntime_vs_torch"]["thumbnail"] < 1e-5
    with pytest.raises(ValueError, match="thumbnail branch"):
        export_bundle(run.root, tmp_path / "int8", progress=False, precision="int8")

    eager_eval = evaluate(run.root, progress=False).metrics["metrics"]
    bundle_eval = evaluate(run.root, bundle=bundle, progress=False).metrics["metrics"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert bundle_eval[key] == pytest.approx(eager_eval[key], abs=1e-4)
    assert eager_eval != plain_eval  # the thumbnail changed the maps

    files = sorted((data / "test").rglob("*.png"))[:4]
    decoded = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    batch = np.stack([d for d in decoded if d is not None])
    assert len(batch) == len(files)
    _, eager = load_eager_ensemble(run.root).predict(batch)
    for backend in ("onnxruntime", "openvino"):
        with Predictor(bundle, backend=backend) as predictor:
            got = predictor.predict(batch)
        assert isinstance(got, list)
        assert np.abs(np.stack([r.anomaly_map for r in got]) - eager.maps).max() <= 1e-4
        assert [r.label for r in got] == eager.labels.tolist()
