"""Threshold rules for synthetic validation (#17): the good-score bound and the bounded image threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.thresholds import false_alarm_threshold, good_bound_threshold
from tilead.trainer.validation import bounded_image_threshold, bounded_pixel_threshold, compute_stats

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(scores=st.lists(finite, min_size=1, max_size=60), rate=st.floats(0.001, 0.999))
def test_good_bound_is_the_conformal_order_statistic(scores: list[float], rate: float) -> None:
    s = np.array(scores, dtype=np.float64)
    n = s.size
    t, bound = good_bound_threshold(s, rate)
    assert t in s  # a value of the data
    k = int((s <= t).sum())  # rank of t from below, counting ties
    # The guaranteed rate: at most (n + 1 - k') / (n + 1) new good parts above the k'-th smallest (k' <= k).
    assert 1 / (n + 1) - 1e-12 <= bound <= 1.0
    assert int((s > t).sum()) <= round(bound * (n + 1)) - 1
    if (1 - rate) * (n + 1) <= n:
        assert bound <= rate + 1e-12  # enough images: the target is met
    else:
        assert t == s.max()  # too few images for the rate: the largest score, bound 1 / (n + 1)
        assert math.isclose(bound, 1 / (n + 1))
    del k


def test_good_bound_examples() -> None:
    s = np.arange(1.0, 22.0)  # 21 held-out scores 1..21
    assert good_bound_threshold(s, 0.05) == (21.0, 1 / 22)  # ceil(0.95 * 22) = 21: the largest
    assert good_bound_threshold(s, 0.10) == (20.0, 2 / 22)  # ceil(0.90 * 22) = 20
    assert good_bound_threshold(np.arange(1.0, 20.0), 0.05) == (19.0, 1 / 20)  # 0.95 * 20 = 19 exactly


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, float("nan")])
def test_good_bound_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate: expected a false-alarm rate in"):
        good_bound_threshold([1.0, 2.0], rate)


def test_good_bound_rejects_empty_and_nonfinite_scores() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        good_bound_threshold([], 0.1)
    with pytest.raises(ValueError, match="must be finite"):
        good_bound_threshold([1.0, np.inf], 0.1)


def test_image_threshold_never_below_the_good_bound() -> None:
    # Faint synthetic defects score among the good images: F1 alone cuts into the good scores.
    good = np.linspace(10.0, 14.0, 21)
    bad = np.r_[np.linspace(11.0, 13.5, 20), np.linspace(20.0, 40.0, 10)]
    scores = np.r_[good, bad].astype(np.float32)
    labels = np.r_[np.zeros(good.size, bool), np.ones(bad.size, bool)]
    plain, rule = bounded_image_threshold(scores, labels, 0.99, None)
    assert rule["rule"] == "f1_adaptive"
    assert (good > plain).any()  # the plain F1 threshold raises false alarms on held-out good images
    t, rule = bounded_image_threshold(scores, labels, 0.99, 0.05)
    assert t == pytest.approx(14.0)
    assert not (good > t).any()
    assert rule["binding"] == "good bound"
    assert rule["false_alarm_bound"] == pytest.approx(1 / 22)
    assert rule["f1_adaptive"] == plain


def test_image_threshold_keeps_f1_when_it_is_higher() -> None:
    good = np.linspace(10.0, 14.0, 21)
    bad = np.linspace(30.0, 40.0, 20)
    scores = np.r_[good, bad]
    labels = np.r_[np.zeros(good.size, bool), np.ones(bad.size, bool)]
    t, rule = bounded_image_threshold(scores, labels, 0.99, 0.05)
    assert 14.0 < t < 30.0
    assert rule["binding"] == "f1_adaptive"


def test_image_threshold_without_anomalies_keeps_the_quantile_rule() -> None:
    scores = np.linspace(0.0, 1.0, 11)
    t, rule = bounded_image_threshold(scores, np.zeros(11, bool), 0.5, 0.05)
    assert t == pytest.approx(0.5)
    assert rule["rule"].startswith("quantile")


def _pixel_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Good maps with a smooth background, and defective copies whose small defects score far above it."""
    rng = np.random.default_rng(0)
    good = rng.uniform(0.0, 10.0, size=(4, 32, 32)).astype(np.float32)
    bad = good.copy()
    masks = np.zeros((8, 32, 32), dtype=bool)
    for i in range(4):
        masks[4 + i, 10:13, 10:13] = True
        bad[i, 10:13, 10:13] = 100.0  # strong, tiny synthetic defects
        bad[i, 8:15, 8:15] = np.maximum(bad[i, 8:15, 8:15], 20.0)  # their blurred halo
        bad[i, 10:13, 10:13] = 100.0
    maps = np.concatenate([good, bad])
    labels = np.r_[np.zeros(4, bool), np.ones(4, bool)]
    return maps, masks, labels


def _with_good_tail(maps: np.ndarray) -> np.ndarray:
    """Good background with a long tail: a few pixels of every image (good and copies) score up to 95."""
    out: np.ndarray = maps.copy()
    out[:, 0, :4] = np.float32(95.0)
    return out


def test_pixel_threshold_pinned_by_good_pixels_is_capped() -> None:
    maps, masks, labels = _pixel_case()
    maps = _with_good_tail(maps)
    plain, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, None)
    assert rule["rule"] == "f1_adaptive"
    t, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, 0.01)
    assert plain <= rule["pinned_below"]  # F1 lies at the top of the good pixels
    assert t == false_alarm_threshold(maps[:4], 0.01)
    assert t < plain
    assert rule["binding"] == "good pixel quantile"
    assert rule["f1_adaptive"] == plain
    assert (maps[:4] > t).mean() <= 0.01


def test_pixel_threshold_far_above_the_good_pixels_keeps_f1() -> None:
    maps, masks, labels = _pixel_case()  # good pixels 0..10, the F1 threshold trims a halo at 20
    plain, _ = bounded_pixel_threshold(maps, masks, labels, 0.99, None)
    t, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, 0.01)
    assert plain > rule["pinned_below"]
    assert t == plain
    assert rule["binding"] == "f1_adaptive"


def test_pixel_threshold_keeps_f1_when_it_is_lower_than_the_cap() -> None:
    maps, masks, labels = _pixel_case()
    maps[:4] *= 30.0  # good pixels reach far above the defects' F1 threshold
    t, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, 0.001)
    assert rule["binding"] == "f1_adaptive"
    assert t == rule["f1_adaptive"]


def test_compute_stats_records_both_bounded_rules() -> None:
    from tilead.runtime import PostProcessor, TileGrid

    maps, masks, labels = _pixel_case()
    maps = _with_good_tail(maps)
    grid = TileGrid(image_size=(32, 32), tile_size=(32, 32), stride=(32, 32))
    stats, info = compute_stats(
        maps[None],
        masks,
        labels,
        PostProcessor(grid, "uniform", None),
        stage="image",
        good_quantile=0.99,
        target_false_alarm=0.05,
        pixel_false_positive=0.01,
    )
    assert info["image_threshold_rule"]["rule"] == "max(f1_adaptive, good bound)"
    assert info["pixel_threshold_rule"]["binding"] == "good pixel quantile"
    assert stats.pixel_threshold == pytest.approx(info["pixel_threshold_rule"]["good_pixel_quantile"])
    assert stats.image_threshold >= info["image_threshold_rule"]["good_bound"]
