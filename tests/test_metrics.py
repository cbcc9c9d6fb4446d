"""Anomaly-detection metrics: AUROC, F1 (adaptive and fixed threshold), AUPRO, against independent oracles."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from tilead.trainer.metrics import (
    ThresholdResult,
    aupro,
    auroc,
    evaluate,
    f1_adaptive_threshold,
    f1_at_threshold,
    metrics_at_threshold,
)

# ---------------------------------------------------------------------------------------------------------------------
# Oracles (independent of the implementation: boolean masks, loops, scipy labelling, exact fractions)
# ---------------------------------------------------------------------------------------------------------------------


def counts_above(scores: npt.NDArray[Any], labels: npt.NDArray[np.bool_], threshold: Any) -> tuple[int, int]:
    """TP and FP of `scores > threshold`, compared with NumPy's own rules."""
    pred = scores > threshold
    return int(np.count_nonzero(pred & labels)), int(np.count_nonzero(pred & ~labels))


def brute_best_cut(scores: npt.NDArray[Any], labels: npt.NDArray[np.bool_]) -> tuple[Fraction, float]:
    """Best F1 (exact fraction) over all rules `score >= s`, s any distinct score, and the highest such s."""
    n_pos = int(labels.sum())
    best: tuple[Fraction, float] = (Fraction(-1), 0.0)
    for s in np.unique(scores):
        pred = scores >= s
        tp = int(np.count_nonzero(pred & labels))
        fp = int(np.count_nonzero(pred & ~labels))
        f1 = Fraction(2 * tp, tp + fp + n_pos)
        if f1 >= best[0]:  # ascending s, so ties end on the highest s
            best = (f1, float(s))
    return best


def brute_aupro(maps: npt.NDArray[Any], masks: npt.NDArray[np.bool_], fpr_limit: float) -> float:
    """AUPRO by brute force: one threshold per distinct score, per-region overlap from scipy 8-connected labels."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3), dtype=int)) for m in masks]
    sizes = [np.bincount(lab.ravel())[1:] for lab, _ in labelled]
    n_regions = sum(int(n) for _, n in labelled)
    normal = ~masks
    n_normal = int(normal.sum())
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.count_nonzero(pred & normal) / n_normal)
        overlap = 0.0
        for (lab, n), size, p in zip(labelled, sizes, pred, strict=True):
            hit = np.bincount(lab[p], minlength=n + 1)[1:]
            overlap += float(np.sum(hit / size))
        pros.append(overlap / n_regions)
    area = 0.0
    for j in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[j - 1], pros[j - 1], fprs[j], pros[j]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def random_case(
    seed: int, n: int = 3, size: int = 16, levels: int = 40
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Small images with several regions of varied sizes (one image empty) and many tied scores."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.06
    masks[0] = ndimage.binary_dilation(masks[0], iterations=1)
    masks[-1] = False
    maps = rng.integers(0, levels, size=(n, size, size)).astype(np.float64)
    maps[masks] += rng.integers(0, levels // 2, size=int(masks.sum()))
    return maps / 4.0, masks


# ---------------------------------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn_with_ties(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.2
    scores: npt.NDArray[Any] = (rng.integers(0, 12, size=3000) + 3 * labels).astype(dtype)  # many ties across classes
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@given(
    st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=60).filter(
        lambda xs: 0 < sum(b for _, b in xs) < len(xs)
    )
)
def test_auroc_property_matches_sklearn(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([float(s) for s, _ in pairs])
    labels = np.array([b for _, b in pairs])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_hand_values_and_label_encodings() -> None:
    # Positives {3, 2}, negatives {2, 1}: pairs (3>2) 1, (3>1) 1, (2=2) 1/2, (2>1) 1 -> 3.5 / 4.
    scores = np.array([[3.0, 2.0], [2.0, 1.0]])
    for labels in (np.array([[1, 1], [0, 0]]), np.array([[True, True], [False, False]]), np.array([[1.0, 1], [0, 0]])):
        assert auroc(scores, labels) == 0.875
    assert auroc([0.0, 1.0], [0, 1]) == 1.0
    assert auroc([0.0, 1.0], [1, 0]) == 0.0
    assert auroc([5.0, 5.0, 5.0], [1, 0, 1]) == 0.5


def test_auroc_large_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    n = 2_000_000
    labels = rng.random(n) < 0.05
    scores = (rng.standard_normal(n) + 1.5 * labels).astype(np.float32)
    scores[::3] = np.round(scores[::3], 2)  # plenty of ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# F1
# ---------------------------------------------------------------------------------------------------------------------


def check_adaptive(scores: npt.NDArray[Any], labels: npt.NDArray[np.bool_]) -> ThresholdResult:
    """The adaptive threshold is optimal (vs sklearn and an exact brute force) and reproduces its counts with >."""
    res = f1_adaptive_threshold(scores, labels)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_curve = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    assert res.f1 == pytest.approx(float(f1_curve.max()), abs=1e-12)
    best_f1, best_s = brute_best_cut(scores, labels)
    assert res.f1 == float(best_f1)
    # `>` against the threshold gives exactly the `>= best_s` prediction, in the scores' dtype and in float64.
    expected = counts_above(scores, labels, np.nextafter(scores.dtype.type(best_s), -np.inf))
    assert np.array_equal(scores >= best_s, scores > res.threshold)
    assert counts_above(scores, labels, res.threshold) == expected
    assert counts_above(scores.astype(np.float64), labels, res.threshold) == expected
    assert counts_above(scores, labels, np.float64(res.threshold)) == expected
    tp, fp = expected
    n_pos = int(labels.sum())
    assert (res.precision, res.recall) == (tp / (tp + fp), tp / n_pos)
    assert metrics_at_threshold(scores, labels, res.threshold) == res
    return res


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(5))
def test_f1_adaptive_matches_precision_recall_curve(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = (rng.integers(0, 30, size=500) + 6 * labels).astype(dtype) / 7
    check_adaptive(scores, labels)


@given(
    st.lists(st.tuples(st.integers(-3, 6), st.booleans()), min_size=1, max_size=40).filter(
        lambda xs: any(b for _, b in xs)
    )
)
def test_f1_adaptive_property(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s / 3 for s, _ in pairs])
    labels = np.array([b for _, b in pairs])
    check_adaptive(scores, labels)


@given(
    st.floats(2.0**-10, 2.0**10, width=32),
    st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=20).filter(
        lambda xs: any(b for _, b in xs)
    ),
)
def test_f1_adaptive_threshold_with_one_ulp_neighbours(base: float, pairs: list[tuple[int, bool]]) -> None:
    # Scores are consecutive float32 values: no float32 lies strictly between neighbours, so a float64 midpoint
    # compared with float32 scores (NumPy rounds it to float32) would move to one of them.
    bits = np.float32(base).view(np.int32) + np.array([k for k, _ in pairs], dtype=np.int32)
    scores = bits.view(np.float32)
    labels = np.array([b for _, b in pairs])
    res = check_adaptive(scores, labels)
    assert np.float32(res.threshold) == res.threshold  # representable in float32


def test_f1_adaptive_midpoint_rounding_up_case() -> None:
    # 1 + 2^-23 and 1 + 2^-22 are adjacent float32 values whose float64 midpoint rounds (to even) to the upper one.
    lo, hi = np.float32(1 + 2**-23), np.float32(1 + 2**-22)
    assert np.nextafter(lo, np.float32(2)) == hi
    assert np.float32((float(lo) + float(hi)) / 2) == hi
    scores = np.array([lo, hi, hi], dtype=np.float32)
    labels = np.array([False, True, True])
    res = f1_adaptive_threshold(scores, labels)
    assert res.f1 == 1.0
    assert res.threshold == float(lo)
    assert counts_above(scores, labels, res.threshold) == (2, 0)


def test_f1_adaptive_hand_values() -> None:
    # F1 = 2TP / (2TP + FP + FN). Cuts at the positive scores: s=0.9 -> TP1 FP0 FN1, F1 2/3;
    # s=0.5 -> TP2 FP1 FN0, F1 4/5 (best). Threshold: midpoint of 0.5 and the next lower score 0.3.
    scores = np.array([0.9, 0.7, 0.5, 0.3, 0.1])
    labels = np.array([1, 0, 1, 0, 0])
    res = f1_adaptive_threshold(scores, labels)
    assert res == ThresholdResult(threshold=0.4, f1=0.8, precision=2 / 3, recall=1.0)
    # Tie: s=0.9 (TP1 FP0 FN1, F1 2/3) and s=0.1 (TP2 FP2 FN0, F1 4/6): the higher threshold wins.
    res = f1_adaptive_threshold([0.9, 0.5, 0.4, 0.1], [1, 0, 0, 1])
    assert res.f1 == pytest.approx(2 / 3, abs=1e-15)
    assert res.threshold == pytest.approx(0.7, abs=1e-15)
    assert (res.precision, res.recall) == (1.0, 0.5)
    # The lowest score is the cut: the threshold sits one float64 ulp below it.
    res = f1_adaptive_threshold([0.2, 0.5], [1, 1])
    assert res.threshold == np.nextafter(0.2, -np.inf)
    assert res.f1 == 1.0


def test_f1_at_threshold_strict_and_zero_cases() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    # > 0.35: 0.4 (FP) and 0.8 (TP); 0.35 itself is not predicted -> TP1 FP1 FN1 -> F1 2/4.
    assert f1_at_threshold(scores, labels, 0.35) == 0.5
    assert metrics_at_threshold(scores, labels, 0.35) == ThresholdResult(0.35, 0.5, 0.5, 0.5)
    assert f1_at_threshold(scores, labels, 0.0) == 2 * 2 / (2 * 2 + 2)
    assert metrics_at_threshold(scores, labels, 0.8) == ThresholdResult(0.8, 0.0, 0.0, 0.0)  # TP = 0
    assert f1_at_threshold(scores, labels, np.inf) == 0.0
    assert f1_at_threshold(scores, labels, -np.inf) == pytest.approx(2 / 3)
    assert f1_at_threshold(scores, np.zeros(4, dtype=bool), 0.0) == 0.0  # no positives at all


def test_f1_at_threshold_compares_float32_exactly() -> None:
    # float32(0.1) = 0.100000001490116... > 0.1, so it is predicted anomalous although float32(0.1) == float32(0.1).
    scores = np.array([0.1, 0.05], dtype=np.float32)
    labels = np.array([True, False])
    assert f1_at_threshold(scores, labels, 0.1) == 1.0
    assert f1_at_threshold(scores, labels, float(np.float32(0.1))) == 0.0
    # Beyond the float32 range.
    assert f1_at_threshold(scores, labels, 1e40) == 0.0
    assert f1_at_threshold(scores, labels, -1e40) == pytest.approx(2 / 3)


@given(
    st.lists(st.tuples(st.floats(-4, 4, width=32), st.booleans()), min_size=1, max_size=30),
    st.floats(-5, 5),
    st.sampled_from([-1, 0, 1]),
)
def test_f1_at_threshold_same_for_float32_and_float64(pairs: list[tuple[float, bool]], t: float, ulps: int) -> None:
    scores = np.array([s for s, _ in pairs], dtype=np.float32)
    labels = np.array([b for _, b in pairs])
    # Thresholds on, or one float64 ulp beside, a float32 score exercise the exact comparison.
    threshold = float(scores[0]) + ulps * float(np.spacing(float(scores[0]))) if ulps else t
    res32 = metrics_at_threshold(scores, labels, threshold)
    assert res32 == metrics_at_threshold(scores.astype(np.float64), labels, threshold)
    tp, fp = counts_above(scores.astype(np.float64), labels, threshold)
    n_pos = int(labels.sum())
    assert res32.f1 == (0.0 if tp == 0 else 2 * tp / (tp + fp + n_pos))


# ---------------------------------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.004, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    maps, masks = random_case(seed)
    expected = brute_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)
    assert aupro(maps.astype(np.float32), masks.astype(np.uint8), fpr_limit) == pytest.approx(expected, abs=1e-9)


@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(2, 8), st.sampled_from([0.3, 0.1, 0.5, 1.0]))
def test_aupro_property(seed: int, n: int, size: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < rng.uniform(0.05, 0.5)
    masks[0, 0, 0], masks[0, -1, -1] = True, False  # at least one region and one normal pixel
    maps = rng.integers(0, 6, size=masks.shape).astype(np.float64)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(brute_aupro(maps, masks, fpr_limit), abs=1e-9)


def test_aupro_larger_quantized_matches_brute_force() -> None:
    # 262k pixels, 50 score levels: many ties at the FPR cutoff that np.partition picks.
    rng = np.random.default_rng(11)
    masks = ndimage.binary_dilation(rng.random((4, 256, 256)) < 0.002, iterations=3)
    maps = np.floor(np.clip(rng.normal(20, 8, masks.shape) + 12 * masks, 0, 49)).astype(np.float32)
    for fpr_limit in (0.3, 0.02):
        expected = brute_aupro(maps, masks, fpr_limit)
        assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_hand_values() -> None:
    # Perfect detector: PRO reaches 1 at FPR 0.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 3] = True
    assert aupro(masks.astype(np.float64), masks) == 1.0

    # One image, 10 normal pixels, regions A (score 0.9) and B (0.5), one pixel each; normals 0.7, 0.4, 8 x 0.0.
    # Curve: (0,0) -> t=.9 (0,.5) -> t=.7 (.1,.5) -> t=.5 (.1,1) -> t=.4 (.2,1) -> t=0 (1,1).
    # Area to 0.3: .1*.5 + .1*1 + .1*1 = 0.25, normalized 0.25 / 0.3 = 5/6.
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 2, 3] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, 0], maps[0, 2, 3], maps[0, 1, 1], maps[0, 1, 2] = 0.9, 0.5, 0.7, 0.4
    assert aupro(maps, masks) == pytest.approx(5 / 6, abs=1e-15)

    # Interpolated end point: regions A (0.9) and B (0.0, tied with 7 of the 8 normals), one normal at 0.7.
    # Curve: (0,0) -> (0,.5) -> (1/8,.5) -> (1,1). At FPR .3 on the last segment PRO = .5 + (.175/.875)*.5 = .6.
    # Area: .125*.5 + .175*(.5+.6)/2 = .15875; normalized .15875 / .3 = 127/240.
    masks = np.zeros((1, 2, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 4] = True
    maps = np.zeros((1, 2, 5))
    maps[0, 0, 0], maps[0, 0, 2] = 0.9, 0.7
    assert aupro(maps, masks) == pytest.approx(127 / 240, abs=1e-15)

    # 8-connectivity: (0,0), (1,1), (1,2) form ONE region of 3 pixels (4-connectivity would give two).
    # Only (0,0) scores 1; all else 0. Curve: (0,0) -> (0,1/3) -> (1,1); at .3 PRO = 1/3 + .3*2/3 = 8/15.
    # Area .3*(1/3 + 8/15)/2, normalized (5/15 + 8/15)/2 = 13/30 (two regions would give .575).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0
    assert aupro(maps, masks) == pytest.approx(13 / 30, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_agrees_with_the_individual_metrics() -> None:
    maps, masks = random_case(3, n=4, size=32)
    maps32 = maps.astype(np.float32)
    image_scores = maps.reshape(4, -1).max(axis=1)
    image_labels = np.array([1, 0, 1, 0])
    out = evaluate(image_scores, image_labels, maps32, masks, image_threshold=8.0, pixel_threshold=6.1)
    assert out == {
        "image_auroc": auroc(image_scores, image_labels),
        "image_f1": f1_at_threshold(image_scores, image_labels, 8.0),
        "image_f1_max": f1_adaptive_threshold(image_scores, image_labels).f1,
        "pixel_auroc": auroc(maps32, masks),
        "pixel_f1": f1_at_threshold(maps32, masks, 6.1),
        "pixel_f1_max": f1_adaptive_threshold(maps32, masks).f1,
        "aupro": aupro(maps32, masks),
    }
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps32.ravel()), abs=1e-12)
    assert out["aupro"] == pytest.approx(brute_aupro(maps32, masks, 0.3), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------------------------

GOOD_S = np.array([0.1, 0.5, 0.9])
GOOD_L = np.array([0, 1, 1])
GOOD_MAPS = np.linspace(0, 1, 18).reshape(2, 3, 3)
GOOD_MASKS = GOOD_MAPS > 0.8


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auroc(GOOD_S, GOOD_L[:2]), r"scores and labels must have the same shape.*\(3,\).*\(2,\)"),
        (lambda: auroc([0.1, np.nan], [0, 1]), r"scores must be finite, got 1 NaN"),
        (lambda: f1_adaptive_threshold([0.1, np.inf], [0, 1]), r"scores must be finite"),
        (lambda: auroc(GOOD_S, [0, 2, 1]), r"labels must be binary .*\{0, 1, 2\}"),
        (lambda: auroc(GOOD_S, [0.0, 0.5, 1.0]), r"labels must be binary"),
        (lambda: auroc(GOOD_S, ["a", "b", "c"]), r"labels must be a bool or 0/1 array, got dtype <U1"),
        (lambda: auroc(np.array([True, False]), [0, 1]), r"scores must be a real-valued .* got dtype bool"),
        (lambda: auroc([], []), r"scores must not be empty"),
        (lambda: auroc(GOOD_S, [1, 1, 1]), r"both anomalous and normal samples in labels, got 3 anomalous and 0"),
        (lambda: auroc(GOOD_S, [0, 0, 0]), r"in labels, got 0 anomalous and 3 normal"),
        (lambda: f1_adaptive_threshold(GOOD_S, [0, 0, 0]), r"at least one anomalous sample in labels"),
        (lambda: f1_at_threshold(GOOD_S, GOOD_L, float("nan")), r"threshold must be a number, got NaN"),
        (lambda: aupro(GOOD_MAPS[0], GOOD_MASKS[0]), r"anomaly_maps must have shape \(n, H, W\), got shape \(3, 3\)"),
        (lambda: aupro(GOOD_MAPS, GOOD_MASKS[:1]), r"anomaly_maps and masks must have the same shape"),
        (lambda: aupro(GOOD_MAPS, np.zeros((2, 3, 3), bool)), r"at least one anomalous region in masks"),
        (lambda: aupro(GOOD_MAPS, np.ones((2, 3, 3), bool)), r"normal pixels in masks"),
        (lambda: aupro(GOOD_MAPS, GOOD_MASKS.astype(np.uint8) * 255), r"masks must be binary .*255.*mask > 0"),
        (lambda: aupro(GOOD_MAPS, GOOD_MASKS, fpr_limit=0.0), r"fpr_limit must be in \(0, 1\], got 0.0"),
        (lambda: aupro(GOOD_MAPS, GOOD_MASKS, fpr_limit=1.5), r"fpr_limit must be in \(0, 1\], got 1.5"),
        (lambda: aupro(GOOD_MAPS * np.nan, GOOD_MASKS), r"anomaly_maps must be finite"),
        (lambda: evaluate(GOOD_S, GOOD_L, GOOD_MAPS, GOOD_MASKS, 0.5, 0.5), r"3 image scores and 2 anomaly maps"),
        (lambda: evaluate(GOOD_S[:2], [1, 2], GOOD_MAPS, GOOD_MASKS, 0.5, 0.5), r"image_labels must be binary"),
        (lambda: evaluate(GOOD_S[:2], [1, 1], GOOD_MAPS, GOOD_MASKS, 0.5, 0.5), r"samples in image_labels"),
        (lambda: evaluate(GOOD_S[:2], [0, 1], GOOD_MAPS, GOOD_MASKS, 0.5, np.nan), r"pixel_threshold must be"),
        (lambda: evaluate(GOOD_S[:2], [0, 1], GOOD_MAPS, GOOD_MASKS, 0.5, 0.5, 2.0), r"fpr_limit must be in"),
    ],
)
def test_invalid_inputs_raise(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_images_of_different_sizes_are_each_judged_at_their_own_size(h: int, w: int, seed: int) -> None:
    """A list of per-image maps (issue #19): transposing one image changes its shape, not its pixels or regions."""
    rng = np.random.default_rng(seed)
    maps = rng.random((2, h, w)).astype(np.float32)
    masks = rng.random((2, h, w)) > 0.7
    masks[0, 0, 0] = True  # at least one region
    masks[1, -1, -1] = False  # at least one normal pixel
    scores = np.array([0.2, 0.9])
    labels = np.array([False, True])
    stacked = evaluate(scores, labels, maps, masks, image_threshold=0.5, pixel_threshold=0.5)
    mixed = evaluate(
        scores, labels, [maps[0], maps[1].T], [masks[0], masks[1].T], image_threshold=0.5, pixel_threshold=0.5
    )
    assert mixed == pytest.approx(stacked, abs=1e-12)
    assert mixed["pixel_auroc"] == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))


def test_per_image_lists_are_checked() -> None:
    with pytest.raises(ValueError, match="equally long"):
        evaluate([0.1], [True], [np.zeros((2, 2))], [], image_threshold=0.5, pixel_threshold=0.5)
    with pytest.raises(ValueError, match="same shape"):
        evaluate(
            [0.1, 0.2],
            [True, False],
            [np.zeros((2, 2)), np.zeros((3, 2))],
            [np.zeros((2, 2), bool), np.zeros((2, 3), bool)],
            image_threshold=0.5,
            pixel_threshold=0.5,
        )
