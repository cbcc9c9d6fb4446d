"""A detector's own image score through the runtime: tile scores to image scores, normalization, statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import normalize as ref_normalize

from tilead.runtime import NormalizationStats, TileGrid, image_scores_of_tiles, postprocess_maps, score_images
from tilead.runtime.bundle import BundleError, parse_manifest, sha256_file, write_manifest
from tilead.runtime.postprocessor import PostProcessor, TileStats
from tilead.trainer.metrics import f1_adaptive_threshold
from tilead.trainer.validation import compute_stats

GRID = TileGrid((64, 64), 40, 24)  # 2x2 locations


def _maps(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 1.0, size=(GRID.num_locations, n, 5, 5)).astype(np.float32)


STATS = [
    NormalizationStats("image", 2.0, 5.0, pixel_range=(0.1, 7.0), image_range=(3.0, 9.0)),
    NormalizationStats(
        "tile",
        0.5,
        5.0,
        pixel_range=(0.0, 1.0),
        image_range=(3.0, 9.0),
        tile_stats=TileStats((1.0, 1.5, 2.0, 2.5), (0.0, 0.1, 0.2, 0.3), (5.0, 6.0, 7.0, 8.0)),
    ),
    NormalizationStats("none", 2.0, 5.0),
]


def test_image_scores_of_tiles_is_the_max_over_locations() -> None:
    scores = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    np.testing.assert_array_equal(image_scores_of_tiles(scores), scores.max(axis=0))
    with pytest.raises(ValueError, match="tile_scores"):
        image_scores_of_tiles(scores.astype(np.float64))
    with pytest.raises(ValueError, match="tile_scores"):
        image_scores_of_tiles(scores[0])


@pytest.mark.parametrize("stats", STATS, ids=lambda s: s.stage)
def test_postprocess_with_tile_scores_replaces_only_the_image_scores(stats: NormalizationStats) -> None:
    maps = _maps(1)
    tile_scores = np.random.default_rng(2).uniform(0.0, 12.0, size=(GRID.num_locations, 5)).astype(np.float32)
    merged, plain = postprocess_maps(maps, GRID, stats, weights="feather")
    merged2, scored = postprocess_maps(maps, GRID, stats, weights="feather", tile_scores=tile_scores)
    np.testing.assert_array_equal(merged, merged2)
    np.testing.assert_array_equal(scored.maps, plain.maps)  # the maps and masks are the map's business
    np.testing.assert_array_equal(scored.masks, plain.masks)
    raw = tile_scores.max(axis=0)
    np.testing.assert_array_equal(scored.raw_scores, raw)
    # The oracle: anomalib's formula on the raw image scores with the image range and threshold.
    _, _, ref_raw, ref_scores = ref_normalize(
        raw.reshape(-1, 1, 1), stats.image_threshold, stats.image_threshold, stats.image_range, stats.image_range
    )
    np.testing.assert_allclose(scored.scores, ref_scores, atol=1e-6)
    expected_labels = ref_scores > 0.5 if stats.image_range is not None else ref_raw > stats.image_threshold
    np.testing.assert_array_equal(scored.labels, expected_labels)
    assert not np.array_equal(scored.raw_scores, plain.raw_scores)


def test_score_images_checks_its_input() -> None:
    _, result = postprocess_maps(_maps(3), GRID, STATS[0])
    with pytest.raises(ValueError, match="expected 5 scores, got 4"):
        score_images(result, np.zeros(4, dtype=np.float32), STATS[0])
    with pytest.raises(ValueError, match="raw_scores"):
        score_images(result, np.zeros(5, dtype=np.float64), STATS[0])


@pytest.mark.parametrize("stage", ["image", "tile", "none"])
def test_validation_statistics_of_the_detector_score(stage: Any) -> None:
    """The image threshold and range come from the given scores; the pixel statistics do not change."""
    rng = np.random.default_rng(4)
    n = 12
    maps = rng.gamma(2.0, 1.0, size=(GRID.num_locations, n, 5, 5)).astype(np.float32)
    labels = np.arange(n) % 3 == 0
    masks = np.zeros((n, 64, 64), dtype=bool)
    masks[labels, 10:30, 10:30] = True
    maps[:, labels] += 2.0  # anomalous images score higher in the maps
    own = np.where(labels, 4.0, 1.0).astype(np.float32) + rng.uniform(0, 2.5, size=n).astype(np.float32)
    kwargs: dict[str, Any] = {"stage": stage, "good_quantile": 0.99}
    post = PostProcessor(GRID, "uniform", None)
    plain, plain_info = compute_stats(maps, masks, labels, post, **kwargs)
    stats, info = compute_stats(maps, masks, labels, post, image_scores=own, **kwargs)
    assert (plain_info["image_score"], info["image_score"]) == ("max", "detector")
    assert stats.pixel_threshold == plain.pixel_threshold
    assert stats.pixel_range == plain.pixel_range
    assert stats.tile_stats == plain.tile_stats
    assert stats.image_threshold == pytest.approx(f1_adaptive_threshold(own, labels).threshold)
    assert stats.image_threshold != plain.image_threshold
    if stage != "none":
        assert stats.image_range == (float(own.min()), float(own.max()))
    with pytest.raises(ValueError, match="expected 12 scores"):
        compute_stats(maps, masks, labels, post, image_scores=own[:5], **kwargs)


def _manifest(**post: Any) -> dict[str, Any]:
    names = ["r0c0", "r0c1", "r1c0", "r1c1"]
    return {
        "schema_version": 2,
        "grid": {"image_size": [64, 64], "tile_size": [40, 40], "stride": [24, 24]},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3, "color_order": "RGB"},
        "model": {"family": "patchcore", "map_size": [5, 5]},
        "locations": [{"name": n, "file": f"tiles/{n}.onnx", "sha256": "0" * 64, "bytes": 1} for n in names],
        "postprocess": {"weights": "uniform", **post},
        "normalization": {"stage": "none", "pixel_threshold": 1.0, "image_threshold": 1.0},
    }


def test_manifest_image_score_and_score_output_go_together() -> None:
    assert parse_manifest(_manifest()).image_score == "max"
    assert parse_manifest(_manifest(image_score="max")).image_score == "max"
    data = _manifest(image_score="detector")
    with pytest.raises(BundleError, match=r"image_score 'detector' and model\.score_output go together"):
        parse_manifest(data)
    data["model"]["score_output"] = "score"
    assert parse_manifest(data).image_score == "detector"
    data["model"]["score_output"] = "scores"
    with pytest.raises(BundleError, match=r"model\.score_output: expected 'score'"):
        parse_manifest(data)
    with pytest.raises(BundleError, match=r"postprocess\.image_score: expected 'max' or 'detector'"):
        parse_manifest(_manifest(image_score="mean"))
    stray = _manifest()
    stray["model"]["score_output"] = "score"
    with pytest.raises(BundleError, match="go together"):
        parse_manifest(stray)


def test_tensorrt_takes_a_bundle_with_a_detector_score(tmp_path: Path) -> None:
    """The native TensorRT path runs the second output (issue #18.8): the bundle is no longer refused.

    Here, without a GPU or the builder, what stops it is the missing GPU / builder, not the bundle.
    """
    from tilead.exporter.engines import build_engines
    from tilead.runtime import Predictor
    from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError

    data = _manifest(image_score="detector")
    data["model"]["score_output"] = "score"
    for loc in data["locations"]:
        path = tmp_path / loc["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"model {loc['name']}".encode())
        loc["sha256"] = sha256_file(path)
        loc["bytes"] = path.stat().st_size
    write_manifest(tmp_path, data)
    with pytest.raises(TensorRTUnavailableError):
        Predictor(tmp_path, device="cuda", backend="tensorrt")
    with pytest.raises(TensorRTUnavailableError):
        build_engines(tmp_path)
