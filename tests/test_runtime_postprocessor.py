"""Normalization statistics: every range, threshold and key check, at its boundary and with its message.

A bundle's statistics decide every label, so a loosened check here can switch detection off
(issue #16 item 3). Expected values are literals or NumPy one-liners, never the code under test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tilead.runtime import TileGrid
from tilead.runtime.postprocess import NONFINITE_OUTPUT, NormalizedMaps
from tilead.runtime.postprocessor import (
    MIN_WIDTH,
    RAW_LIMIT,
    RELATIVE_WIDTH,
    NormalizationStats,
    TileStats,
    check_range,
    check_threshold_in_range,
    nonfinite_errors,
    normalize_with_stats,
    postprocess_maps,
    score_images,
)


def exactly(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern accepting exactly ``message``."""
    return "^" + re.escape(message) + "$"


def test_documented_constants() -> None:
    assert RAW_LIMIT == 1e12
    assert RELATIVE_WIDTH == 2.0**-20
    assert MIN_WIDTH == 1e-9


# -- check_range ------------------------------------------------------------------------------------


def test_check_range_accepts_and_returns_floats() -> None:
    assert check_range(0, 1, "r") == (0.0, 1.0)
    assert check_range(-RAW_LIMIT, RAW_LIMIT, "r") == (-1e12, 1e12)
    assert check_range(0.0, 1e-9, "r") == (0.0, 1e-9)  # exactly MIN_WIDTH
    assert check_range(-1.0, 1.0 - 1e-3, "r") == (-1.0, 1.0 - 1e-3)


def test_check_range_width_boundaries() -> None:
    with pytest.raises(ValueError, match=exactly("r: expected min < max with max - min >= 1e-09, got [0.0, 5e-10]")):
        check_range(0.0, 5e-10, "r")
    with pytest.raises(ValueError, match=exactly("r: expected min < max with max - min >= 9.54e-07, got [1.0, 1.0]")):
        check_range(1.0, 1.0, "r")
    with pytest.raises(ValueError, match=exactly("r: expected min < max with max - min >= 1.91e-06, got [2.0, 1.0]")):
        check_range(2.0, 1.0, "r")
    # Relative width: 2**20 needs a width of at least 1.0, and the larger magnitude counts (also a negative one).
    big = float(2**20)
    assert check_range(big - 1.0, big, "r") == (big - 1.0, big)
    assert check_range(-big, -big + 1.0, "r") == (-big, -big + 1.0)
    with pytest.raises(ValueError, match=r"^r: expected min < max with max - min >= 1, got "):
        check_range(big - 0.5, big + 0.25, "r")
    with pytest.raises(ValueError, match=r"^r: expected min < max with max - min >= 1, got "):
        check_range(-big - 0.5, -big, "r")
    with pytest.raises(ValueError, match=r"^r: expected min < max with max - min >= 1, got "):
        check_range(big - 0.5, big, "r")


def test_check_range_ends_are_raw_values() -> None:
    with pytest.raises(ValueError, match=exactly("r[0]: expected a number in [-1e+12, 1e+12], got -2e+12")):
        check_range(-2e12, 0.0, "r")
    with pytest.raises(ValueError, match=exactly("r[1]: expected a number in [-1e+12, 1e+12], got 2e+12")):
        check_range(0.0, 2e12, "r")
    with pytest.raises(ValueError, match=exactly("r[1]: expected a finite number, got nan")):
        check_range(0.0, float("nan"), "r")


# -- check_threshold_in_range -----------------------------------------------------------------------


def test_threshold_tolerance_is_a_thousandth_of_the_width_plus_the_relative_width() -> None:
    check_threshold_in_range(0.0, 0.0, 1.0, "t")
    check_threshold_in_range(1.0, 0.0, 1.0, "t")
    check_threshold_in_range(-0.000999, 0.0, 1.0, "t")  # within 1e-3 of the width below
    check_threshold_in_range(1.000999, 0.0, 1.0, "t")
    with pytest.raises(
        ValueError, match=exactly("t: the threshold -0.0011 lies outside its normalization range [0.0, 1.0]")
    ):
        check_threshold_in_range(-0.0011, 0.0, 1.0, "t")
    with pytest.raises(
        ValueError, match=exactly("t: the threshold 1.0011 lies outside its normalization range [0.0, 1.0]")
    ):
        check_threshold_in_range(1.0011, 0.0, 1.0, "t")
    # At magnitude 2**20 the relative part adds 1.0 to the 1e-3 * width part.
    big = float(2**20)
    check_threshold_in_range(big + 10.0 + 1.009, big, big + 10.0, "t")
    check_threshold_in_range(big - 1.009, big, big + 10.0, "t")
    with pytest.raises(ValueError, match=r"^t: the threshold .* lies outside"):
        check_threshold_in_range(big + 10.0 + 1.02, big, big + 10.0, "t")
    with pytest.raises(ValueError, match=r"^t: the threshold .* lies outside"):
        check_threshold_in_range(big - 1.02, big, big + 10.0, "t")
    with pytest.raises(ValueError, match=r"^t: the threshold .* lies outside"):
        check_threshold_in_range(-big - 1.02, -big, -big + 10.0, "t")
    check_threshold_in_range(-big - 1.009, -big, -big + 10.0, "t")


# -- TileStats --------------------------------------------------------------------------------------


def test_tile_stats_round_trip_and_validation() -> None:
    ts = TileStats((0.5, 1.5), (0.0, 1.0), (1.0, 2.0))
    assert ts.to_dict() == {"thresholds": [0.5, 1.5], "mins": [0.0, 1.0], "maxs": [1.0, 2.0]}
    assert ts.as_tuple() == ((0.5, 1.5), (0.0, 1.0), (1.0, 2.0))
    assert TileStats.from_dict({"thresholds": [0.5, 1.5], "mins": [0, 1], "maxs": [1, 2]}) == ts
    lengths = "tile_stats: expected equally long, non-empty thresholds, mins and maxs, got lengths "
    with pytest.raises(ValueError, match=exactly(lengths + "0, 0, 0")):
        TileStats((), (), ())
    with pytest.raises(ValueError, match=exactly(lengths + "1, 2, 1")):
        TileStats((0.5,), (0.0, 0.0), (1.0,))
    with pytest.raises(ValueError, match=exactly(lengths + "1, 1, 2")):
        TileStats((0.5,), (0.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"^tile_stats: location 1 has min, max: expected min < max"):
        TileStats((0.5, 0.5), (0.0, 1.0), (1.0, 1.0))
    with pytest.raises(
        ValueError,
        match=exactly("tile_stats.thresholds[1]: the threshold 3.0 lies outside its normalization range [1.0, 2.0]"),
    ):
        TileStats((0.5, 3.0), (0.0, 1.0), (1.0, 2.0))
    with pytest.raises(ValueError, match=exactly("tile_stats.thresholds[0]: expected a finite number, got nan")):
        TileStats((float("nan"),), (0.0,), (1.0,))
    with pytest.raises(ValueError, match=exactly("tile_stats.mins: expected a list of numbers, got (0, 1)")):
        TileStats.from_dict({"thresholds": [0.5, 1.5], "mins": (0, 1), "maxs": [1, 2]})
    with pytest.raises(ValueError, match=exactly("tile_stats.maxs: expected a number, got '2'")):
        TileStats.from_dict({"thresholds": [0.5, 1.5], "mins": [0, 1], "maxs": [1, "2"]})
    with pytest.raises(ValueError, match=exactly("tile_stats: missing keys ['maxs']")):
        TileStats.from_dict({"thresholds": [0.5], "mins": [0]})


# -- NormalizationStats -----------------------------------------------------------------------------


IMAGE_DICT = {
    "stage": "image",
    "pixel_threshold": 2.0,
    "image_threshold": 3.0,
    "pixel_range": [1.0, 4.0],
    "image_range": [2.0, 5.0],
    "tile_stats": None,
}


def test_normalization_stats_round_trip() -> None:
    s = NormalizationStats.from_dict(IMAGE_DICT)
    assert (s.stage, s.pixel_threshold, s.image_threshold) == ("image", 2.0, 3.0)
    assert (s.pixel_range, s.image_range, s.tile_stats) == ((1.0, 4.0), (2.0, 5.0), None)
    assert s.to_dict() == IMAGE_DICT
    none = NormalizationStats.from_dict({"stage": "none", "pixel_threshold": 7, "image_threshold": 8})
    assert none.to_dict() == {
        "stage": "none",
        "pixel_threshold": 7.0,
        "image_threshold": 8.0,
        "pixel_range": None,
        "image_range": None,
        "tile_stats": None,
    }
    tile = {
        "stage": "tile",
        "pixel_threshold": 0.5,
        "image_threshold": 0.6,
        "pixel_range": [0.0, 1.0],
        "image_range": [0.2, 0.9],
        "tile_stats": {"thresholds": [1.0], "mins": [0.0], "maxs": [2.0]},
    }
    t = NormalizationStats.from_dict(tile)
    assert t.tile_stats == TileStats((1.0,), (0.0,), (2.0,))
    assert t.to_dict() == tile


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "pixel"}, "normalization stage: expected one of image, tile, none, got 'pixel'"),
        ({"stage": 1}, "normalization stage: expected one of image, tile, none, got 1"),
        ({"pixel_threshold": 2e12}, "pixel_threshold: expected a number in [-1e+12, 1e+12], got 2e+12"),
        ({"image_threshold": "3"}, "image_threshold: expected a number, got '3'"),
        ({"pixel_range": None}, "normalization stage 'image' needs pixel_range and image_range"),
        ({"image_range": None}, "normalization stage 'image' needs pixel_range and image_range"),
        ({"pixel_range": [1.0]}, "pixel_range: expected [min, max], got [1.0]"),
        ({"image_range": "ab"}, "image_range: expected [min, max], got 'ab'"),
        ({"image_range": [5.0, 2.0]}, "image_range: expected min < max with max - min >= 4.77e-06, got [5.0, 2.0]"),
        (
            {"pixel_threshold": 5.0},
            "pixel_threshold: the threshold 5.0 lies outside its normalization range [1.0, 4.0]",
        ),
        (
            {"image_threshold": 1.0},
            "image_threshold: the threshold 1.0 lies outside its normalization range [2.0, 5.0]",
        ),
        (
            {"tile_stats": {"thresholds": [1.0], "mins": [0.0], "maxs": [2.0]}},
            "tile_stats: required for stage 'tile' and only for it",
        ),
        (
            {"colour": 1},
            "normalization: unknown keys ['colour']; allowed keys are stage, pixel_threshold, image_threshold, "
            "pixel_range, image_range, tile_stats",
        ),
    ],
)
def test_normalization_stats_refusals(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        NormalizationStats.from_dict(IMAGE_DICT | change)


def test_stage_none_and_tile_refusals() -> None:
    with pytest.raises(ValueError, match=exactly("normalization stage 'none' takes no pixel_range / image_range")):
        NormalizationStats("none", 1.0, 1.0, pixel_range=(0.0, 2.0))
    with pytest.raises(ValueError, match=exactly("normalization stage 'none' takes no pixel_range / image_range")):
        NormalizationStats("none", 1.0, 1.0, image_range=(0.0, 2.0))
    with pytest.raises(ValueError, match=exactly("tile_stats: required for stage 'tile' and only for it")):
        NormalizationStats("tile", 0.5, 0.5, pixel_range=(0.0, 1.0), image_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=exactly("normalization: missing keys ['image_threshold']")):
        NormalizationStats.from_dict({"stage": "none", "pixel_threshold": 1.0})


# -- non-finite errors and scoring ------------------------------------------------------------------


def test_nonfinite_errors_name_each_location_and_output() -> None:
    grid = TileGrid((8, 12), 4, 4)  # 2 rows x 3 cols: r0c0 r0c1 r0c2 r1c0 r1c1 r1c2
    maps = np.zeros((6, 3, 2, 2), np.float32)
    scores = np.zeros((6, 3), np.float32)
    maps[1, 0, 0, 1] = np.nan
    maps[4, 0, 1, 1] = np.inf
    scores[4, 0] = -np.inf
    scores[5, 2] = np.nan
    assert nonfinite_errors(maps, grid, scores) == (
        "non-finite model output (NaN or infinity) at locations r0c1 (map), r1c1 (map and score)",
        None,
        "non-finite model output (NaN or infinity) at location r1c2 (score)",
    )
    assert nonfinite_errors(maps, grid) == (
        "non-finite model output (NaN or infinity) at locations r0c1 (map), r1c1 (map)",
        None,
        None,
    )


def _result(raw: list[float]) -> NormalizedMaps:
    n = len(raw)
    return NormalizedMaps(
        maps=np.zeros((n, 2, 2), np.float32),
        masks=np.zeros((n, 2, 2), bool),
        raw_scores=np.array(raw, np.float32),
        scores=np.zeros(n, np.float32),
        labels=np.zeros(n, bool),
    )


def test_score_images_normalizes_other_scores_and_keeps_nonfinite_images_anomalous() -> None:
    stats = NormalizationStats.from_dict(IMAGE_DICT)  # image range [2, 5], threshold 3
    out = score_images(_result([0.0, 0.0, float("nan"), 0.0]), np.array([3.0, 4.5, 2.0, 2.9], np.float32), stats)
    # clamp((x - 3) / 3 + 0.5, 0, 1)
    np.testing.assert_allclose(out.scores[[0, 1, 3]], [0.5, 1.0, 0.5 - 0.1 / 3], rtol=1e-6)
    assert out.scores[2] == 1.0
    assert np.isnan(out.raw_scores[2])
    assert out.labels.tolist() == [False, True, True, False]  # 0.5 is not above 0.5
    np.testing.assert_array_equal(out.raw_scores[[0, 1, 3]], np.array([3.0, 4.5, 2.9], np.float32))
    assert out.error(2) == NONFINITE_OUTPUT
    assert out.error(0) is None
    with pytest.raises(ValueError, match=exactly("raw_scores: expected 4 scores, got 3")):
        score_images(_result([0.0] * 4), np.zeros(3, np.float32), stats)


def test_normalize_with_stats_uses_the_pixel_range_for_maps_and_the_image_range_for_scores() -> None:
    stats = NormalizationStats.from_dict(IMAGE_DICT)  # pixel [1, 4] t=2; image [2, 5] t=3
    merged = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    out = normalize_with_stats(merged, stats)
    # maps: clamp((x - 2) / 3 + 0.5); score: max 4 -> (4 - 3) / 3 + 0.5
    np.testing.assert_allclose(out.maps[0], [[0.5 - 1 / 3, 0.5], [0.5 + 1 / 3, 1.0]], rtol=1e-6)
    assert out.masks[0].tolist() == [[False, False], [True, True]]
    np.testing.assert_allclose(out.scores, [0.5 + 1 / 3], rtol=1e-6)
    assert out.raw_scores.tolist() == [4.0]
    assert out.labels.tolist() == [True]


@pytest.mark.parametrize(("stage", "score"), [("image", 1.0), ("none", np.inf)])
def test_postprocess_marks_nonfinite_images(stage: str, score: float) -> None:
    grid = TileGrid(4, 4, 4)
    if stage == "image":
        stats = NormalizationStats("image", 0.5, 0.5, pixel_range=(0.0, 1.0), image_range=(0.0, 1.0))
    else:
        stats = NormalizationStats("none", 0.5, 0.5)
    maps = np.full((1, 2, 2, 2), 0.1, np.float32)
    maps[0, 1, 0, 0] = -np.inf
    merged, out = postprocess_maps(maps, grid, stats)
    assert out.labels.tolist() == [False, True]
    assert out.scores[1] == score
    assert np.isnan(out.raw_scores[1])
    assert out.errors == (None, "non-finite model output (NaN or infinity) at location r0c0 (map)")
    assert np.isnan(merged[1]).any()
    assert np.isfinite(merged[0]).all()
    assert out.raw_scores[0] == np.float32(0.1)
    scores = np.array([[0.2, np.nan]], np.float32)
    _, scored = postprocess_maps(np.full((1, 2, 2, 2), 0.1, np.float32), grid, stats, tile_scores=scores)
    assert scored.labels.tolist() == [False, True]
    assert scored.scores[1] == score
    assert scored.errors == (None, "non-finite model output (NaN or infinity) at location r0c0 (score)")
    assert scored.raw_scores[0] == np.float32(0.2)


def test_tile_and_raw_score_inputs_may_be_strided_and_are_named_in_errors() -> None:
    from tilead.runtime.postprocessor import image_scores_of_tiles

    tiles = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # (4, 3), not C-contiguous
    np.testing.assert_array_equal(image_scores_of_tiles(tiles), np.array([18.0, 20.0, 22.0], np.float32))
    with pytest.raises(ValueError, match=exactly("tile_scores: expected dtype float32, got float64")):
        image_scores_of_tiles(np.zeros((2, 2)))
    stats = NormalizationStats.from_dict(IMAGE_DICT)
    strided = np.array([3.0, 0.0, 4.5, 0.0], np.float32)[::2]
    out = score_images(_result([0.0, 0.0]), strided, stats)
    np.testing.assert_allclose(out.scores, [0.5, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match=exactly("raw_scores: expected dtype float32, got float64")):
        score_images(_result([0.0]), np.zeros(1), stats)


def test_finite_maps_carry_no_errors() -> None:
    grid = TileGrid(4, 4, 4)
    stats = NormalizationStats("none", 0.5, 0.5)
    _, out = postprocess_maps(np.full((1, 2, 2, 2), 0.1, np.float32), grid, stats)
    assert out.errors is None
    assert out.error(0) is None
    _, scored = postprocess_maps(
        np.full((1, 2, 2, 2), 0.1, np.float32), grid, stats, tile_scores=np.array([[0.2, 0.3]], np.float32)
    )
    assert scored.errors is None


def test_ort_specs_map_onnx_runtime_types_and_keep_unknown_ones() -> None:
    from types import SimpleNamespace

    from tilead.runtime.bundle import TensorSpec, ort_specs

    nodes = [
        SimpleNamespace(name="tiles", type="tensor(float)", shape=["n", 3, 40, 40]),
        SimpleNamespace(name="x", type="tensor(bool)", shape=None),
    ]
    assert ort_specs(nodes) == [
        TensorSpec("tiles", "float32", ("n", 3, 40, 40)),
        TensorSpec("x", "tensor(bool)", ()),
    ]


@pytest.mark.parametrize("edge", ["shift", "pad"])
def test_merge_and_postprocess_with_seam_smoothing_match_the_reference(edge: str) -> None:
    import reference

    from tilead.runtime import SeamSmoothing, merge_maps
    from tilead.runtime.timing import StageTimes

    size = 64 if edge == "shift" else 60
    grid = TileGrid(size, 40, 24, edge=edge)  # 2x2 locations; pad: a 64 px canvas cropped to 60
    maps = np.random.default_rng(1).normal(size=(4, 2, 5, 5)).astype(np.float32)
    canvas = reference.untile(maps, (size, size), (40, 40), (24, 24), edge, "feather")
    smoothed = reference.smooth_seams(canvas, (size, size), (40, 40), (24, 24), edge, 2.0, 0.2)
    want = smoothed[:, :size, :size]
    timer = StageTimes()
    got = merge_maps(maps, grid, weights="feather", seam=SeamSmoothing(2.0, 0.2), timer=timer)
    assert got.shape == (2, size, size)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert list(timer.seconds) == ["untile", "seam", "crop"]
    plain = merge_maps(maps, grid, weights="feather")
    np.testing.assert_allclose(plain, canvas[:, :size, :size], atol=1e-5)
    assert np.abs(plain - got).max() > 1e-3  # the smoothing changed the seams
    stats = NormalizationStats("none", 0.0, 0.0)
    timer = StageTimes()
    merged, out = postprocess_maps(maps, grid, stats, weights="feather", seam=SeamSmoothing(2.0, 0.2), timer=timer)
    np.testing.assert_allclose(merged, want, atol=1e-5)
    np.testing.assert_allclose(out.maps, want, atol=1e-5)
    np.testing.assert_allclose(out.raw_scores, want.reshape(2, -1).max(axis=1), atol=1e-5)
    assert list(timer.seconds) == ["untile", "seam", "crop", "normalize"]


def test_postprocess_wrappers_name_what_is_wrong() -> None:
    from tilead.runtime import normalize_maps, resize_maps, smooth_seams
    from tilead.runtime.postprocess import SeamSmoothing

    grid = TileGrid(60, 40, 24, edge="pad")  # canvas 64 x 64
    with pytest.raises(ValueError, match=exactly("maps: expected dtype float32, got float64")):
        grid.canvas_to_image(np.zeros((1, 64, 64)))
    with pytest.raises(
        ValueError, match=exactly("maps[0]: expected shape (64, 64) (canvas_h, canvas_w), got (60, 60)")
    ):
        grid.canvas_to_image(np.zeros((1, 60, 60), np.float32))
    with pytest.raises(ValueError, match=exactly("maps: expected dtype float32, got float64")):
        resize_maps(np.zeros((1, 4, 4)), (8, 8))
    with pytest.raises(
        ValueError, match=exactly("maps[0]: expected shape (64, 64) (canvas_h, canvas_w), got (60, 60)")
    ):
        smooth_seams(np.zeros((1, 60, 60), np.float32), grid, SeamSmoothing())
    frozen = np.zeros((1, 64, 64), np.float32)
    frozen.flags.writeable = False
    assert smooth_seams(frozen, grid, SeamSmoothing()).shape == (1, 64, 64)  # a copy: read-only input is fine
    with pytest.raises(ValueError, match=exactly("maps: expected a writable array, got a read-only one")):
        smooth_seams(frozen, grid, SeamSmoothing(), inplace=True)
    single = normalize_maps(np.array([[0.0, 2.0], [4.0, 1.0]], np.float32), pixel_threshold=1.0, image_threshold=3.0)
    assert single.maps.shape == (1, 2, 2)
    assert single.masks.tolist() == [[[False, True], [True, False]]]
    assert single.raw_scores.tolist() == [4.0]
    assert single.labels.tolist() == [True]


def test_version_order_reads_digits_only() -> None:
    from tilead.runtime.bundle import _version_tuple

    assert _version_tuple("1.2.3") == (1, 2, 3)
    assert _version_tuple("0.1.0rc2") == (0, 1, 2)
    assert _version_tuple("1.x.0") == (1, 0, 0)
    assert _version_tuple("1.1234567890") == (1, 123456789)  # at most 9 digits per part


def test_norm_params_modes_and_messages() -> None:
    from tilead import _kernels
    from tilead.runtime.postprocess import norm_params

    assert norm_params(1, 2, None, None) == _kernels.NormSpec(_kernels.NORM_NONE, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0)
    assert norm_params(1, 2, (0, 3), (1, 4)) == _kernels.NormSpec(_kernels.NORM_MINMAX, 1.0, 0.0, 3.0, 2.0, 1.0, 4.0)
    both = "pixel_range and image_range: give both (min-max normalization) or neither (raw values)"
    with pytest.raises(ValueError, match=exactly(both)):
        norm_params(1, 2, (0, 3), None)
    with pytest.raises(ValueError, match=exactly(both)):
        norm_params(1, 2, None, (0, 3))
    with pytest.raises(ValueError, match=exactly("image_threshold: expected a finite number, got nan")):
        norm_params(1, float("nan"), None, None)
    with pytest.raises(ValueError, match=exactly("pixel_threshold: expected a number, got 'a'")):
        norm_params("a", 1, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=exactly("pixel_range: expected a finite number, got inf")):
        norm_params(1, 2, (0, float("inf")), (0, 1))
    with pytest.raises(ValueError, match=exactly("image_range: expected a number, got None")):
        norm_params(1, 2, (0, 1), (None, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=exactly("pixel_range: expected min < max, got (1.0, 1.0)")):
        norm_params(1, 2, (1, 1), (0, 1))
    with pytest.raises(ValueError, match=exactly("image_range: expected min < max, got (2.0, 2.0)")):
        norm_params(1, 2, (0, 1), (2, 2))


def test_manifest_writing_and_json_depth(tmp_path: Path) -> None:
    import json

    from tilead.runtime.bundle import DIGEST_KEY, MANIFEST, _depth, write_manifest

    out = write_manifest(tmp_path, {"a": [1, {"b": 2}]})
    text = (tmp_path / MANIFEST).read_text()
    assert text == json.dumps(out, indent=2) + "\n"
    assert text.startswith('{\n  "a": [\n    1,')
    assert set(out) == {"a", DIGEST_KEY}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_manifest(tmp_path, {"a": float("nan")})
    assert _depth(1) == 1
    assert _depth({}) == 1
    assert _depth({"a": 1, "b": "x"}) == 1
    assert _depth([[], {"a": [1]}]) == 3
    assert _depth({"a": {"b": {"c": {}}}, "d": []}) == 4


def test_location_entries_need_every_key() -> None:
    from tilead.runtime.files import parse_location_file

    entry = {"name": "r0c0", "file": "tiles/r0c0.onnx", "sha256": "0" * 64, "bytes": 10}
    got = parse_location_file(entry, "locations[0]", "r0c0", "tiles/r0c0.onnx")
    assert (got.name, got.file, got.sha256, got.bytes) == ("r0c0", "tiles/r0c0.onnx", "0" * 64, 10)
    partial = {k: v for k, v in entry.items() if k != "bytes"}
    with pytest.raises(ValueError, match=exactly("locations[0]: missing keys ['bytes']")):
        parse_location_file(partial, "locations[0]", "r0c0", "tiles/r0c0.onnx")
    with pytest.raises(
        ValueError, match=exactly("locations[0]: expected a mapping with keys name, file, sha256, bytes, got 3")
    ):
        parse_location_file(3, "locations[0]", "r0c0", "tiles/r0c0.onnx")
