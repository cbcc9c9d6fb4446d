"""Exact, memory-efficient anomaly-detection metrics (NumPy only, no torch).

Conventions used throughout:

* A higher score means more anomalous. Labels and masks are bool or 0/1, with ``True``/1 meaning anomalous.
* A sample or pixel is **predicted anomalous iff ``score > threshold``** (strictly greater).
* A threshold is a Python ``float``. It is compared with the scores as an exact real number, whatever the
  scores' dtype: for float32 scores, ``score > threshold`` means the mathematical comparison, not the comparison
  after rounding the threshold to float32 (which is what ``float32_array > python_float`` does under NumPy 2).
  The thresholds returned by :func:`f1_adaptive_threshold` are exactly representable in the scores' dtype, so
  every way of comparing them (float32 or float64) gives the same predictions.
* Integer scores are converted to float64; float scores keep their dtype (float32 stays float32).

Definitions:

* **AUROC** (:func:`auroc`): the probability that a random anomalous sample scores higher than a random normal
  one, a tie counting one half; identical to ``sklearn.metrics.roc_auc_score``. Computed from ranks: the positive
  scores are looked up (``np.searchsorted``, left and right) in the sorted negative scores, which gives for each
  positive the number of negatives strictly below plus half the number equal to it; the sums are exact integers.
* **F1** (:func:`f1_at_threshold`): with TP/FP/FN counted from ``score > threshold``,
  ``F1 = 2 TP / (2 TP + FP + FN)``, defined as 0 when TP = 0 (likewise precision and recall).
* **Adaptive threshold** (:func:`f1_adaptive_threshold`): the threshold that maximizes F1. The optimum is attained
  by "predict anomalous iff ``score >= s``" for ``s`` one of the distinct anomalous scores (raising ``s`` to the
  next anomalous score only removes false positives); TP and FP for every candidate come from searchsorted on the
  sorted positive and negative scores. Ties in F1 go to the highest ``s``. The returned threshold lies strictly
  between ``s`` and the next lower score present in the data (their midpoint, rounded into the scores' dtype), so
  ``score > threshold`` reproduces ``score >= s`` on this data.
* **AUPRO** (:func:`aupro`, Bergmann et al., MVTec AD): ground-truth regions are the 8-connected components of
  each image's mask. At a threshold, PRO is the mean over all regions of all images of the fraction of the
  region's pixels predicted anomalous, and FPR is the number of normal pixels predicted anomalous over the number
  of all normal pixels of all images. The curve (starting at (0, 0), one point per distinct score) is integrated
  by the trapezoid rule up to FPR = ``fpr_limit`` (the end point linearly interpolated) and divided by
  ``fpr_limit``, so a perfect detector scores 1.

Memory: the pixel-level functions work on flattened views of the inputs (no float64 upcast); the largest
temporaries are one sorted copy of the scores (AUROC, F1) and one partitioned copy of the normal scores (AUPRO),
plus a few boolean arrays of one byte per pixel. AUPRO sorts only the anomalous pixels and the normal pixels above
the ``fpr_limit`` quantile, so its cost grows with ``fpr_limit``.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

# The threshold functions live in the torch- and OpenCV-free tilead.thresholds (tilead-calibrate uses them);
# they are re-exported here under their old names.
from tilead.thresholds import (
    BoolArray,
    FloatArray,
    ThresholdResult,
    _as_labels,
    _as_scores,
    _f1_adaptive_split,
    _metrics_split,
    _pair,
    _Split,
    _split,
    f1_adaptive_threshold,
    f1_at_threshold,
    metrics_at_threshold,
)

__all__ = [
    "ThresholdResult",
    "aupro",
    "auroc",
    "evaluate",
    "f1_adaptive_threshold",
    "f1_at_threshold",
    "metrics_at_threshold",
]

IntArray = npt.NDArray[np.intp]

# Positive scores are looked up in chunks so that the index arrays stay small.
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


PixelMaps = FloatArray | list[FloatArray]
PixelMasks = BoolArray | list[BoolArray]


def _maps_and_masks(anomaly_maps: Any, masks: Any) -> tuple[PixelMaps, PixelMasks]:
    """Validate (n, H, W) anomaly maps and masks of the same shape, or lists of per-image (H_i, W_i) ones."""
    if isinstance(anomaly_maps, list) and isinstance(masks, list):
        if len(anomaly_maps) != len(masks) or not anomaly_maps:
            raise ValueError(
                f"anomaly_maps and masks: expected two equally long, non-empty lists, got {len(anomaly_maps)} "
                f"maps and {len(masks)} masks"
            )
        pairs = [_maps_and_masks(m[None], k[None]) for m, k in zip(anomaly_maps, masks, strict=True)]
        return [np.asarray(m)[0] for m, _ in pairs], [np.asarray(k)[0] for _, k in pairs]
    maps = _as_scores(anomaly_maps, "anomaly_maps")
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must have shape (n, H, W), got shape {maps.shape}")
    mask = _as_labels(masks, "masks")
    if mask.shape != maps.shape:
        raise ValueError(
            f"anomaly_maps and masks must have the same shape, got anomaly_maps of shape {maps.shape} "
            f"and masks of shape {mask.shape}"
        )
    return maps, mask


def _check_fpr_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:  # also rejects NaN
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


# ---------------------------------------------------------------------------------------------------------------------
# Core computations on sorted splits
# ---------------------------------------------------------------------------------------------------------------------


def _auroc_split(split: _Split, lname: str) -> float:
    pos, neg = split.pos, split.neg
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both anomalous and normal samples in {lname}, got {n_pos} anomalous and {n_neg} normal"
        )
    # 2 * (Mann-Whitney U) = sum over positives of (#neg < s) + (#neg <= s); exact in Python integers.
    twice_u = 0
    for start in range(0, n_pos, _CHUNK):
        keys = pos[start : start + _CHUNK]  # sorted keys speed up searchsorted
        twice_u += int(np.searchsorted(neg, keys, side="left").sum(dtype=np.int64))
        twice_u += int(np.searchsorted(neg, keys, side="right").sum(dtype=np.int64))
    return twice_u / (2 * n_pos * n_neg)  # int / int is correctly rounded


def _trapezoid_to_limit(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under the curve (x non-decreasing, x[0] = 0) from 0 to ``limit``, end point interpolated."""
    j = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit (at least x[0] = 0)
    widths = np.diff(x[:j])
    heights = y[1:j] + y[: j - 1]
    area = float(np.dot(widths, heights)) / 2.0
    if j < x.size:  # x[j-1] <= limit < x[j]: add the segment up to the interpolated point at the limit
        x0, y0, x1, y1 = float(x[j - 1]), float(y[j - 1]), float(x[j]), float(y[j])
        y_limit = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def _flat(values: PixelMaps | PixelMasks) -> np.ndarray:
    """All pixels of all images, flat (a view for an (n, H, W) array, a concatenation for a list)."""
    if isinstance(values, list):
        return np.concatenate([v.reshape(-1) for v in values])
    return values.reshape(-1)


def _aupro(maps: PixelMaps, mask: PixelMasks, limit: float) -> float:
    anomalous_scores: list[FloatArray] = []
    inverse_sizes: list[npt.NDArray[np.float64]] = []
    n_regions = 0
    for i in range(len(maps)):
        m = np.ascontiguousarray(mask[i])
        if not m.any():
            continue
        n_labels, region = cv2.connectedComponents(m.view(np.uint8), connectivity=8)
        ids = region[m]
        sizes = np.bincount(ids, minlength=n_labels)
        anomalous_scores.append(maps[i][m])
        inverse_sizes.append(1.0 / sizes[ids])
        n_regions += int(n_labels) - 1
    if n_regions == 0:
        raise ValueError("aupro needs at least one anomalous region in masks, got masks that are all empty")

    # A flat copy of the normal pixels' scores, partitioned in place below.
    normal = (
        np.concatenate([m[~np.asarray(k)] for m, k in zip(maps, mask, strict=True)])
        if isinstance(maps, list)
        else maps[~np.asarray(mask)]
    )
    n_normal = normal.size
    if n_normal == 0:
        raise ValueError("aupro needs normal pixels in masks, got masks that mark every pixel anomalous")
    # Only thresholds down to the first one whose FPR exceeds the limit matter. That one is at or above the k-th
    # largest normal score for any k > limit * n_normal; one extra guards against rounding in limit * n_normal.
    k = min(n_normal, math.floor(limit * n_normal) + 2)
    normal.partition(n_normal - k)
    cutoff = normal[n_normal - k]
    kept = normal[normal >= cutoff]  # ties with the cutoff may lie on either side of the partition
    del normal
    n_kept = kept.size

    # Sort kept normals and anomalous pixels together, descending. Temporaries are freed early and one float64
    # buffer is reused: the peak is about 17 bytes per sorted pixel plus 24 per distinct score.
    scores = np.concatenate([kept, *anomalous_scores])
    del kept, anomalous_scores
    order = np.argsort(scores)[::-1]
    ordered = scores[order]
    del scores
    # One curve point per distinct threshold: the last index of each run of equal scores.
    is_last = np.empty(ordered.size, dtype=np.bool_)
    np.not_equal(ordered[1:], ordered[:-1], out=is_last[:-1])
    is_last[-1] = True
    del ordered
    last = np.flatnonzero(is_last)
    del is_last
    fpr = np.zeros(last.size + 1)  # the curve starts at (0, 0)
    pro = np.zeros(last.size + 1)
    anomalous = order >= n_kept  # kept normals come first in `scores`
    cumulative = np.empty(order.size)
    np.subtract(1.0, anomalous, out=cumulative)  # 1 per normal pixel (cumsum of bools would make a cast copy)
    np.cumsum(cumulative, out=cumulative)  # false positives of each prefix (exact integers)
    np.take(cumulative, last, out=fpr[1:], mode="clip")  # indices are valid; "raise" would copy `out`
    fpr /= n_normal
    cumulative[:] = 0.0
    cumulative[anomalous] = np.concatenate(inverse_sizes)[order[anomalous] - n_kept]
    del order, anomalous, inverse_sizes
    np.cumsum(cumulative, out=cumulative)  # n_regions * PRO of each prefix
    np.take(cumulative, last, out=pro[1:], mode="clip")
    pro /= n_regions
    del cumulative, last
    return _trapezoid_to_limit(fpr, pro, limit) / limit


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Exact area under the ROC curve, ties counted as one half (same value as ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: Anomaly scores, any shape (flattened), higher = more anomalous; float or integer, finite.
        labels: Ground truth of the same shape, bool or 0/1 (1 = anomalous).

    Returns:
        The AUROC in [0, 1].

    Raises:
        ValueError: If the shapes differ, scores are empty or not finite, labels are not binary, or labels do not
            contain both classes.
    """
    s, lab = _pair(scores, labels, "scores", "labels")
    return _auroc_split(_split(s, lab), "labels")


def aupro(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap (PRO) curve up to FPR ``fpr_limit`` (MVTec AD definition).

    Regions are the 8-connected components of each image's mask; PRO at a threshold is the mean over all regions
    of all images of the fraction of the region's pixels predicted anomalous; FPR is the fraction of all normal
    pixels predicted anomalous. The curve, from (0, 0) through one point per distinct score, is integrated with
    the trapezoid rule up to FPR = ``fpr_limit`` (end point interpolated linearly) and divided by ``fpr_limit``.

    Args:
        anomaly_maps: Pixel scores of shape (n, H, W), float or integer, finite.
        masks: Ground-truth masks of shape (n, H, W), bool or 0/1. Images without anomalous pixels are allowed;
            their pixels count as normal.
        fpr_limit: Upper FPR integration limit in (0, 1].

    Returns:
        The normalized AUPRO in [0, 1] (1 for a perfect detector).

    Raises:
        ValueError: If anomaly_maps is not 3-D, the shapes differ, scores are not finite, masks are not binary, no
            image has an anomalous region, no pixel is normal, or fpr_limit is outside (0, 1].
    """
    limit = _check_fpr_limit(fpr_limit)
    maps, mask = _maps_and_masks(anomaly_maps, masks)
    return _aupro(maps, mask, limit)


def evaluate(
    image_scores: npt.ArrayLike,
    image_labels: npt.ArrayLike,
    anomaly_maps: npt.ArrayLike,
    masks: npt.ArrayLike,
    image_threshold: float,
    pixel_threshold: float,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image- and pixel-level metrics of one evaluation set.

    The pixel arrays are flattened as views and keep their dtype; the sorted pixel scores are shared by
    ``pixel_auroc``, ``pixel_f1`` and ``pixel_f1_max``.

    Args:
        image_scores: Image scores of shape (n,).
        image_labels: Image labels of shape (n,), bool or 0/1 (1 = anomalous).
        anomaly_maps: Pixel scores of shape (n, H, W), or a list of n per-image ``(H_i, W_i)`` arrays
            (images of different sizes, each judged at its own size; pixel metrics pool all pixels).
        masks: Ground-truth masks of the same shape(s), bool or 0/1 (a list when ``anomaly_maps`` is one).
        image_threshold: Image threshold; an image is anomalous iff its score > image_threshold.
        pixel_threshold: Pixel threshold; a pixel is anomalous iff its score > pixel_threshold.
        fpr_limit: FPR integration limit of the AUPRO, in (0, 1].

    Returns:
        A dict with ``image_auroc``, ``image_f1`` (at image_threshold), ``image_f1_max`` (best achievable),
        ``pixel_auroc``, ``pixel_f1`` (at pixel_threshold), ``pixel_f1_max`` and ``aupro``.

    Raises:
        ValueError: On invalid inputs (see the individual metrics), if image_scores and anomaly_maps disagree on the
            number of images, or if either level lacks one of the two classes.
    """
    limit = _check_fpr_limit(fpr_limit)
    for name, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if math.isnan(float(value)):
            raise ValueError(f"{name} must be a number, got NaN")
    img_s, img_l = _pair(image_scores, image_labels, "image_scores", "image_labels")
    maps, mask = _maps_and_masks(anomaly_maps, masks)
    if img_s.size != len(maps):
        raise ValueError(
            f"image_scores and anomaly_maps must describe the same images, got {img_s.size} image scores "
            f"and {len(maps)} anomaly maps"
        )
    result: dict[str, float] = {}
    images = _split(img_s, img_l)
    result["image_auroc"] = _auroc_split(images, "image_labels")
    result["image_f1"] = _metrics_split(images, image_threshold, "image_threshold").f1
    result["image_f1_max"] = _f1_adaptive_split(images, "image_labels").f1
    pixels = _split(_flat(maps), _flat(mask))
    result["pixel_auroc"] = _auroc_split(pixels, "masks")
    result["pixel_f1"] = _metrics_split(pixels, pixel_threshold, "pixel_threshold").f1
    result["pixel_f1_max"] = _f1_adaptive_split(pixels, "masks").f1
    del pixels
    result["aupro"] = _aupro(maps, mask, limit)
    return result
