"""Decision thresholds on anomaly scores: F1-adaptive, at a target false-alarm rate, and their quality.

NumPy only (no torch, no OpenCV), so the runtime-side ``tilead-calibrate``
and the trainer's validation share one implementation;
:mod:`tilead.trainer.metrics` re-exports these names.

Conventions (as in :mod:`tilead.trainer.metrics`): a higher score is more
anomalous; a sample is **predicted anomalous iff ``score > threshold``**
(strictly greater), compared as exact real numbers whatever the scores'
dtype. :func:`f1_adaptive_threshold` returns the threshold of best F1 (ties
to the highest), lying strictly between the chosen cut score and the next
lower score and exactly representable in the scores' dtype.
:func:`false_alarm_threshold` returns the smallest threshold at which at
most a given share of good samples is predicted anomalous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ThresholdResult",
    "f1_adaptive_threshold",
    "f1_at_threshold",
    "false_alarm_threshold",
    "good_bound_threshold",
    "metrics_at_threshold",
]

FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ThresholdResult:
    """A decision threshold and the detection quality it gives (prediction rule ``score > threshold``).

    Attributes:
        threshold: The decision threshold; anomalous iff ``score > threshold``.
        f1: F1 score, 0 when there is no true positive.
        precision: TP / (TP + FP), 0 when nothing is predicted anomalous.
        recall: TP / (TP + FN), 0 when there is no anomalous sample.
    """

    threshold: float
    f1: float
    precision: float
    recall: float


@dataclass(frozen=True)
class _Split:
    """Scores split by label, each part sorted ascending (same dtype)."""

    pos: FloatArray
    neg: FloatArray


def _as_scores(scores: npt.ArrayLike, name: str) -> FloatArray:
    """Return ``scores`` as a non-empty, finite float array (float dtypes kept, integers to float64)."""
    arr = np.asarray(scores)
    is_int = np.issubdtype(arr.dtype, np.integer)
    if not (is_int or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a real-valued (float or integer) array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if is_int:
        arr = arr.astype(np.float64)
    # min/max propagate NaN and expose +-inf without allocating a boolean array of the input's size.
    if not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s) out of {arr.size}")
    return arr


def _as_labels(labels: npt.ArrayLike, name: str) -> BoolArray:
    """Return ``labels`` as a bool array (a view when already bool); values must be bool or 0/1."""
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        return arr
    is_int = np.issubdtype(arr.dtype, np.integer)
    if not (is_int or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or 0/1 array, got dtype {arr.dtype}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.bool_)
    # Integers: a min/max check needs no temporary; floats must be exactly 0.0 or 1.0.
    binary = bool(arr.min() >= 0 and arr.max() <= 1) if is_int else bool(np.all((arr == 0) | (arr == 1)))
    if not binary:
        values = np.unique(arr)  # error path only
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if values.size > 6 else "")
        hint = " (for 0/255 masks pass mask > 0)" if values.max() == 255 else ""
        raise ValueError(f"{name} must be binary (bool or 0/1), got values {{{shown}}}{hint}")
    out: BoolArray = arr != 0
    return out


def _pair(scores: npt.ArrayLike, labels: npt.ArrayLike, sname: str, lname: str) -> tuple[FloatArray, BoolArray]:
    """Validate a scores/labels pair of equal shape and return both flattened (views where possible)."""
    s = _as_scores(scores, sname)
    lab = _as_labels(labels, lname)
    if s.shape != lab.shape:
        raise ValueError(
            f"{sname} and {lname} must have the same shape, got {sname} of shape {s.shape} "
            f"and {lname} of shape {lab.shape}"
        )
    return s.reshape(-1), lab.reshape(-1)


def _floor_threshold(threshold: float, dtype: np.dtype[Any], name: str) -> np.floating[Any]:
    """The largest value of ``dtype`` that is <= ``threshold``.

    For ``s`` of that dtype, ``s > result`` holds exactly when ``s > threshold`` holds for real numbers, so the
    scores can be compared in their own dtype without an upcast copy.
    """
    t = float(threshold)
    if math.isnan(t):
        raise ValueError(f"{name} must be a number, got NaN")
    kind: type[np.floating[Any]] = dtype.type
    with np.errstate(over="ignore"):
        td: np.floating[Any] = kind(t)
    if float(td) > t:
        td = kind(np.nextafter(td, kind(-np.inf)))
    return td


def _split(scores: FloatArray, labels: BoolArray) -> _Split:
    """Copy the positive and negative scores out of flat arrays and sort each in place."""
    pos = scores[labels]
    pos.sort()
    neg = scores[~labels]
    neg.sort()
    return _Split(pos=pos, neg=neg)


def _result(threshold: float, tp: int, fp: int, n_pos: int) -> ThresholdResult:
    if tp == 0:
        return ThresholdResult(threshold=threshold, f1=0.0, precision=0.0, recall=0.0)
    return ThresholdResult(
        threshold=threshold,
        f1=2 * tp / (tp + fp + n_pos),  # 2 TP / (2 TP + FP + FN)
        precision=tp / (tp + fp),
        recall=tp / n_pos,
    )


def _threshold_below(s: np.floating[Any], lower: np.floating[Any] | None) -> float:
    """A value ``t`` of the dtype of ``s`` with ``lower <= t < s``: the midpoint rounded into the dtype if possible."""
    kind = type(s)
    if lower is not None:
        with np.errstate(over="ignore", under="ignore"):
            mid = kind(float(lower) / 2 + float(s) / 2)
        if lower <= mid < s:
            return float(mid)
    return float(np.nextafter(s, kind(-np.inf)))


def _f1_adaptive_split(split: _Split, lname: str) -> ThresholdResult:
    pos, neg = split.pos, split.neg
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0:
        raise ValueError(f"f1_adaptive_threshold needs at least one anomalous sample in {lname}, got none")
    # First index of each run of equal values in the sorted positives: candidate s = pos[starts].
    new_value = np.empty(n_pos, dtype=np.bool_)
    new_value[0] = True
    np.not_equal(pos[1:], pos[:-1], out=new_value[1:])
    starts = np.flatnonzero(new_value)
    del new_value
    candidates = pos[starts]
    tp = n_pos - starts  # positives with score >= s
    fp = n_neg - np.searchsorted(neg, candidates, side="left")  # negatives with score >= s
    f1 = 2.0 * tp / (tp + fp + n_pos)  # exact ties are equal floats (same rational, correctly rounded)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # highest threshold among ties
    s = candidates[best]
    below: list[np.floating[Any]] = []
    if starts[best] > 0:
        below.append(pos[starts[best] - 1])
    n_neg_below = n_neg - int(fp[best])
    if n_neg_below > 0:
        below.append(neg[n_neg_below - 1])
    threshold = _threshold_below(s, max(below) if below else None)
    return _result(threshold, int(tp[best]), int(fp[best]), n_pos)


def _metrics_split(split: _Split, threshold: float, tname: str) -> ThresholdResult:
    td = _floor_threshold(threshold, split.pos.dtype, tname)
    tp = split.pos.size - int(np.searchsorted(split.pos, td, side="right"))
    fp = split.neg.size - int(np.searchsorted(split.neg, td, side="right"))
    return _result(float(threshold), tp, fp, split.pos.size)


def f1_adaptive_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> ThresholdResult:
    """The threshold that maximizes F1 under the rule ``score > threshold``, and the F1 it achieves.

    Among thresholds with equal F1 the highest is chosen. The returned threshold lies strictly between the chosen
    cut score ``s`` and the next lower score in the data (or just below ``s`` when no score is lower), and is
    exactly representable in the scores' dtype, so ``scores > result.threshold`` reproduces the reported counts
    whether the comparison is done in float32 or float64.

    Args:
        scores: Anomaly scores, any shape (flattened), higher = more anomalous; float or integer, finite.
        labels: Ground truth of the same shape, bool or 0/1 (1 = anomalous).

    Returns:
        The threshold with its F1, precision and recall on this data.

    Raises:
        ValueError: If the shapes differ, scores are empty or not finite, labels are not binary, or there is no
            anomalous sample.
    """
    s, lab = _pair(scores, labels, "scores", "labels")
    return _f1_adaptive_split(_split(s, lab), "labels")


def metrics_at_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> ThresholdResult:
    """F1, precision and recall of the prediction ``score > threshold``.

    The comparison is exact (the threshold is not rounded to the scores' dtype first); F1, precision and recall are
    0 when there is no true positive.

    Args:
        scores: Anomaly scores, any shape (flattened), higher = more anomalous; float or integer, finite.
        labels: Ground truth of the same shape, bool or 0/1 (1 = anomalous).
        threshold: Decision threshold (any real number, +-inf allowed, not NaN).

    Returns:
        The threshold (as float) with its F1, precision and recall.

    Raises:
        ValueError: If the shapes differ, scores are empty or not finite, labels are not binary, or the threshold is
            NaN.
    """
    s, lab = _pair(scores, labels, "scores", "labels")
    td = _floor_threshold(threshold, s.dtype, "threshold")
    predicted = s > td
    n_predicted = int(np.count_nonzero(predicted))
    tp = int(np.count_nonzero(np.logical_and(predicted, lab, out=predicted)))
    return _result(float(threshold), tp, n_predicted - tp, int(np.count_nonzero(lab)))


def f1_at_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> float:
    """F1 score of the prediction ``score > threshold`` (0 when there is no true positive).

    Args:
        scores: Anomaly scores, any shape (flattened), higher = more anomalous; float or integer, finite.
        labels: Ground truth of the same shape, bool or 0/1 (1 = anomalous).
        threshold: Decision threshold (any real number, +-inf allowed, not NaN).

    Returns:
        The F1 score in [0, 1].

    Raises:
        ValueError: As :func:`metrics_at_threshold`.
    """
    return metrics_at_threshold(scores, labels, threshold).f1


def false_alarm_threshold(good_scores: npt.ArrayLike, rate: float) -> float:
    """The smallest threshold at which at most ``rate`` of the good samples score above it.

    With ``k = floor(rate * n)`` false alarms allowed among ``n`` good
    scores, the threshold is the ``(k + 1)``-th largest score: exactly the
    ``k`` scores above it (fewer with ties) are predicted anomalous.

    Args:
        good_scores: Scores of good samples, any shape (flattened), finite.
        rate: Accepted false-alarm rate in ``[0, 1)``.

    Returns:
        The threshold (a value of the data).

    Raises:
        ValueError: For empty or non-finite scores, or a rate outside ``[0, 1)``.
    """
    s = _as_scores(good_scores, "good_scores").reshape(-1)
    r = float(rate)
    if not 0.0 <= r < 1.0:  # also rejects NaN
        raise ValueError(f"rate: expected a false-alarm rate in [0, 1), got {rate!r}")
    k = math.floor(r * s.size)
    return float(np.partition(s, s.size - 1 - k)[s.size - 1 - k])


def good_bound_threshold(good_scores: npt.ArrayLike, rate: float) -> tuple[float, float]:
    """A threshold that a new good sample exceeds with probability at most ``rate`` (split-conformal bound).

    With ``n`` good scores (held out: not used for fitting) and a new good
    sample exchangeable with them, the ``k``-th smallest score ``s_(k)``
    satisfies ``P(new > s_(k)) <= (n + 1 - k) / (n + 1)``. The threshold is
    ``s_(k)`` with ``k = ceil((1 - rate) * (n + 1))``; when that exceeds
    ``n`` (too few images for the rate) it is the largest score, whose bound
    is ``1 / (n + 1)``. Unlike :func:`false_alarm_threshold` (the in-sample
    rate) this bounds the rate on *new* good parts, which is what a line sees.

    Args:
        good_scores: Scores of held-out good samples, any shape (flattened), finite.
        rate: Target false-alarm rate in ``(0, 1)``.

    Returns:
        ``(threshold, bound)``: the threshold (a value of the data) and the
        false-alarm rate it guarantees, ``(n + 1 - k) / (n + 1)`` (above
        ``rate`` only when ``n`` is too small for it).

    Raises:
        ValueError: For empty or non-finite scores, or a rate outside ``(0, 1)``.
    """
    s = _as_scores(good_scores, "good_scores").reshape(-1)
    r = float(rate)
    if not 0.0 < r < 1.0:  # also rejects NaN
        raise ValueError(f"rate: expected a false-alarm rate in (0, 1), got {rate!r}")
    n = s.size
    k = min(n, math.ceil((1.0 - r) * (n + 1) - 1e-9))
    k = max(k, 1)
    threshold = float(np.partition(s, k - 1)[k - 1])
    return threshold, (n + 1 - k) / (n + 1)
