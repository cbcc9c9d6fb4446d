"""Threshold rules for synthetic validation (#17): the good-score bound and the bounded image threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.thresholds import false_alarm_threshold, good_bound_threshold
from tilead.trainer.metrics import f1_at_threshold
from tilead.trainer.validation import (
    PINNED_CONFIDENCE,
    best_f1_at_or_below,
    bounded_image_threshold,
    bounded_pixel_threshold,
    compute_stats,
    f1_win_share,
)

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
    # The same tiny defect on every image: F1 above the limit wins every resample but those of good images only.
    assert rule["f1_win_share"] > 0.99
    assert not rule["pinned"]


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


def _plateau_case(halo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two kinds of synthetic defect whose F1 curve is a plateau with two near-equal maxima (issue #20).

    Good background 0..10 (pinning limit about 11.25). Four images have a strong core (9 px at 100) with a
    halo of ``halo`` good pixels at 50: only a threshold above 50 leaves the halo out. Four have a faint
    defect (15 px at 11, just above the background) that only a threshold below the limit marks. Low
    threshold F1 48 / (48 + halo), high threshold F1 18 / 33: ``halo`` 39 puts the maximum below the
    limit, 41 above it, by a hair either way.
    """
    rng = np.random.default_rng(0)
    good = rng.uniform(0.0, 10.0, size=(4, 32, 32)).astype(np.float32)
    maps = np.concatenate([good, good, good]).copy()
    masks = np.zeros(maps.shape, dtype=bool)
    ring = np.zeros((32, 32), dtype=bool)
    ring[8:15, 8:15] = True
    ring[10:13, 10:13] = False  # 40 px around the core
    flat = ring.reshape(-1)
    if halo < 40:
        flat[np.flatnonzero(flat)[: 40 - halo]] = False
    elif halo > 40:
        flat[np.flatnonzero(~flat)[40 - halo :]] = True  # more halo pixels in the last row
    assert int(ring.sum()) == halo
    for i in range(4, 8):  # strong core, halo on good pixels
        maps[i][ring] = 50.0
        masks[i, 10:13, 10:13] = True
        maps[i, 10:13, 10:13] = 100.0
    for i in range(8, 12):  # faint defect, no halo
        masks[i, 20:23, 5:10] = True
        maps[i, 20:23, 5:10] = 11.0
    labels = np.r_[np.zeros(4, bool), np.ones(8, bool)]
    return maps, masks, labels


@pytest.mark.parametrize("halo", [39, 41])
def test_a_pixel_threshold_on_an_f1_plateau_is_pinned_wherever_its_maximum_falls(halo: int) -> None:
    maps, masks, labels = _plateau_case(halo)
    high, low = 18 / 33, 48 / (48 + halo)
    t, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, 0.01)
    assert rule["f1"] == pytest.approx(max(high, low))
    # Before: pinned only when the F1 maximum fell at most at the limit; halo 41 put it above (the high
    # threshold, missing every faint defect), halo 39 below (capped). Now both are capped the same way.
    assert (rule["f1_adaptive"] > rule["pinned_below"]) == (high > low)
    assert rule["pinned"]
    assert rule["binding"] == "good pixel quantile"
    assert t == false_alarm_threshold(maps[:4], 0.01)
    assert bool((maps[masks] > t).all())  # every defect pixel marked, the faint ones too
    if high > low:
        assert rule["f1_win_share"] < PINNED_CONFIDENCE
        assert rule["best_below_limit"]["f1"] == pytest.approx(low)
        assert rule["best_below_limit"]["threshold"] < rule["pinned_below"]


def test_a_clear_f1_win_above_the_limit_is_kept_even_if_small() -> None:
    maps, masks, labels = _plateau_case(41)
    maps[8:12][masks[8:12]] = 100.0  # the faint defects become strong: the high threshold wins on every image
    t, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, 0.01)
    assert rule["f1_adaptive"] > rule["pinned_below"]
    assert rule["f1_win_share"] >= PINNED_CONFIDENCE
    assert not rule["pinned"]
    assert t == rule["f1_adaptive"]


@given(
    values=st.lists(st.integers(0, 12), min_size=2, max_size=40),
    truth=st.lists(st.booleans(), min_size=2, max_size=40),
    limit=st.floats(-1.0, 13.0, allow_nan=False),
)
def test_best_f1_at_or_below_is_the_brute_force_maximum(values: list[int], truth: list[bool], limit: float) -> None:
    n = min(len(values), len(truth))
    scores = np.array(values[:n], dtype=np.float32).reshape(1, 1, n)
    lab = np.array(truth[:n]).reshape(1, 1, n)
    if not lab.any():
        lab[0, 0, 0] = True
    res = best_f1_at_or_below(scores, lab, limit)
    assert res.threshold < limit
    assert f1_at_threshold(scores, lab, res.threshold) == pytest.approx(res.f1)
    # Every decision a threshold below the limit can make: mark all, or mark what scores above a value < limit.
    cuts = [-np.inf] + [float(v) for v in np.unique(scores) if v < limit]
    assert res.f1 == pytest.approx(max(f1_at_threshold(scores, lab, c) for c in cuts))


def test_f1_win_share_counts_resamples_won() -> None:
    maps, masks, _ = _plateau_case(41)
    assert f1_win_share(maps, masks, 75.0, 75.0) == 0.0  # ties are no win
    strong = maps.copy()
    strong[8:12][masks[8:12]] = 100.0
    # Every image prefers 75 or is indifferent: won but for the ~1 % of resamples without a haloed image.
    assert f1_win_share(strong, masks, 75.0, 10.5) > 0.98
    assert f1_win_share(strong, masks, 10.5, 75.0) == 0.0
    share = f1_win_share(maps, masks, 75.0, 10.5)  # the plateau: each kind of image prefers another threshold
    assert 0.2 < share < PINNED_CONFIDENCE
    assert f1_win_share(maps, masks, 75.0, 10.5, seed=0) == share  # seeded


def test_a_thumbnail_that_tips_the_f1_plateau_keeps_the_capped_fused_threshold() -> None:
    """Issue #20: the fused map moved the F1 maximum across the pinning limit, and the threshold with it."""
    from tilead.runtime import PostProcessor, TileGrid
    from tilead.runtime.thumbnail import BranchStats, ThumbnailBranch

    maps, masks, labels = _plateau_case(39)  # tiled alone: the F1 maximum under the limit, capped
    thumb = np.zeros_like(maps)
    thumb[4:8, 28, 0:2] = 40.0  # the thumbnail sees two more pixels on the haloed images, between the cuts
    identity = BranchStats(threshold=0.0, min=0.0, max=1.0)
    branch = ThumbnailBranch(64, "weighted", 0.5, (32, 32), identity, identity)
    grid = TileGrid(image_size=(32, 32), tile_size=(32, 32), stride=(32, 32))
    records = {}
    for name, fuse in (("tiled", None), ("fused", lambda m: branch.fuse(m, thumb))):
        stats, info = compute_stats(
            maps[None], masks, labels, PostProcessor(grid, "uniform", None), stage="image", good_quantile=0.99,
            target_false_alarm=0.05, pixel_false_positive=0.01, fuse=fuse,
        )  # fmt: skip
        records[name] = (stats.pixel_threshold, info["pixel_threshold_rule"])
    fused = branch.fuse(maps, thumb)
    (t_tiled, tiled), (t_fused, rule) = records["tiled"], records["fused"]
    assert tiled["f1_adaptive"] <= tiled["pinned_below"]  # tiled alone: pinned by the old test too
    assert rule["f1_adaptive"] > rule["pinned_below"]  # fused: the maximum tipped to the high cut ...
    assert rule["f1_adaptive"] > float(fused[masks].min())  # ... which misses every faint defect
    assert rule["f1_win_share"] < PINNED_CONFIDENCE  # ... but wins only by noise:
    assert rule["pinned"]  # capped at the fused good pixels' quantile
    assert t_fused == pytest.approx(false_alarm_threshold(fused[:4], 0.01))
    assert bool((fused[masks] > t_fused).all())
    assert bool((maps[masks] > t_tiled).all())
