"""Normalization statistics from validation maps, merged as the runtime merges them.

The per-location maps of the validation images go through the runtime's
:class:`~tilead.runtime.PostProcessor` (``merge``: untile + seam smoothing, the
Predictor's code and settings), then:

* min/max of the merged maps and of the image scores;
* thresholds: F1-adaptive (the threshold of best F1 under ``score >
  threshold``) where the validation set has anomalous images / pixels;
  otherwise (a good-only ``holdout`` split) the ``good_quantile`` of the good
  scores, because F1 needs anomalies. Which rule was used is recorded.

Stage ``tile`` computes (threshold, min, max) per location on that location's
upsampled maps against the matching crop of the ground-truth masks, then
merges with per-tile normalization and takes the image-score statistics of
the result.

Every record states the image counts and an estimate of the false-alarm rate
on good parts (the share of the validation's good images whose score is above
the image threshold): an in-sample estimate, since the threshold was chosen on
those same images (:func:`false_alarm_estimate`). With synthetic anomalies the
share of them missed is recorded too.

Image scores are the merged maps' max, or the detector's own scores when
given (``postprocess.image_score: detector``: the max over each image's tiles
of the detector's per-tile score); the image range and threshold are then
measured on those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tilead.runtime import TileGrid, resize_maps
from tilead.runtime.postprocessor import NormalizationStage, NormalizationStats, PostProcessor, TileStats
from tilead.thresholds import false_alarm_threshold, good_bound_threshold
from tilead.trainer.metrics import ThresholdResult, f1_adaptive_threshold


def _threshold(scores: np.ndarray, labels: np.ndarray, good_quantile: float) -> tuple[float, dict[str, Any]]:
    """F1-adaptive threshold when both classes are present, else a quantile of the good scores."""
    flat = scores.reshape(-1)
    lab = labels.reshape(-1).astype(bool)
    if lab.any() and not lab.all():
        res = f1_adaptive_threshold(flat, lab)
        return float(res.threshold), {"rule": "f1_adaptive", "f1": res.f1}
    good = flat[~lab] if not lab.all() else flat
    value = float(np.quantile(good.astype(np.float64), good_quantile))
    return value, {"rule": f"quantile {good_quantile} of good scores (no anomalies to fit an F1 threshold)"}


def bounded_image_threshold(
    scores: np.ndarray, labels: np.ndarray, good_quantile: float, target_false_alarm: float | None
) -> tuple[float, dict[str, Any]]:
    """The image threshold, never below the good-score bound at ``target_false_alarm`` (synthetic validation).

    F1-adaptive on good plus (synthetic) anomalous images trades false alarms for misses by the synthetic
    defects' mix, which says nothing about real defects. With ``target_false_alarm`` the threshold is
    ``max(F1-adaptive, good bound)``, the bound being :func:`tilead.thresholds.good_bound_threshold` of the
    good images' scores: a new good part exceeds it with probability at most the recorded ``bound``.

    Args:
        scores: Raw image scores ``(n,)``.
        labels: Image labels ``(n,)`` (True: anomalous).
        good_quantile: Quantile rule without anomalies (as :func:`_threshold`).
        target_false_alarm: Target false-alarm rate on new good parts, or None for plain F1-adaptive.

    Returns:
        The threshold and how it was chosen.
    """
    value, rule = _threshold(scores, labels, good_quantile)
    lab = np.asarray(labels).astype(bool).reshape(-1)
    if target_false_alarm is None or rule["rule"] != "f1_adaptive":
        return value, rule
    bound, rate = good_bound_threshold(np.asarray(scores).reshape(-1)[~lab], target_false_alarm)
    chosen = max(value, bound)
    return chosen, {
        "rule": "max(f1_adaptive, good bound)",
        "f1_adaptive": value,
        "f1": rule["f1"],
        "good_bound": bound,
        "target_false_alarm": target_false_alarm,
        "false_alarm_bound": rate,
        "binding": "good bound" if bound > value else "f1_adaptive",
        "note": "the good bound is the k-th smallest held-out good score with k = ceil((1 - target) * (n + 1)) "
        "(the largest when n is too small): a new good part scores above it with probability at most "
        "false_alarm_bound (split-conformal)",
    }


PINNED_MARGIN = 0.25
"""An F1 pixel threshold at most ``max + PINNED_MARGIN * (max - median)`` of the good pixels is pinned by them."""
PINNED_CONFIDENCE = 0.95
"""An F1 threshold above the pinning limit counts only if it beats the best one below in this share of resamples."""
PINNED_RESAMPLES = 1000
"""Bootstrap resamples of the validation images for :data:`PINNED_CONFIDENCE`."""


def best_f1_at_or_below(maps: np.ndarray, masks: np.ndarray, limit: float) -> ThresholdResult:
    """The F1-best pixel threshold among thresholds below ``limit`` (as :func:`f1_adaptive_threshold`).

    Scores are clipped at ``limit`` first: for every threshold ``t < limit``, ``min(x, limit) > t`` exactly when
    ``x > t``, and every threshold :func:`f1_adaptive_threshold` returns lies below some score, so below ``limit``.

    Args:
        maps: Maps ``(n, H, W)``.
        masks: Ground truth ``(n, H, W)``, at least one True.
        limit: The largest threshold allowed.

    Returns:
        The threshold (below ``limit``) and its F1 on these maps.
    """
    clipped = np.minimum(maps, np.asarray(limit, dtype=maps.dtype))
    return f1_adaptive_threshold(clipped, masks)


def f1_win_share(
    maps: np.ndarray, masks: np.ndarray, high: float, low: float, *, resamples: int = PINNED_RESAMPLES, seed: int = 0
) -> float:
    """Share of bootstrap resamples of the images in which threshold ``high`` has a higher pixel F1 than ``low``.

    Each resample draws ``n`` of the ``n`` images with replacement (seeded) and pools their pixels, as the
    validation F1 pools them; ties count as no win. A share near 1 says the F1 advantage of ``high`` holds
    across images; near or below one half, it is within the image-to-image noise of the validation set.

    Args:
        maps: Maps ``(n, H, W)``.
        masks: Ground truth ``(n, H, W)``.
        high: One threshold (the decision is ``x > threshold``).
        low: The other threshold.
        resamples: Bootstrap resamples.
        seed: Seed of the draws.

    Returns:
        The share in ``[0, 1]``.
    """
    n = maps.shape[0]
    truth = masks.reshape(n, -1).sum(axis=1).astype(np.float64)

    def counts(t: float) -> tuple[np.ndarray, np.ndarray]:
        marked = maps.reshape(n, -1) > np.asarray(t, dtype=maps.dtype)
        hits = (marked & masks.reshape(n, -1)).sum(axis=1).astype(np.float64)
        return hits, marked.sum(axis=1).astype(np.float64)

    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    f1 = []
    for hits, marked in (counts(high), counts(low)):
        tp, denominator = hits[draws].sum(axis=1), marked[draws].sum(axis=1) + truth[draws].sum(axis=1)
        f1.append(np.divide(2.0 * tp, denominator, out=np.zeros(resamples), where=denominator > 0))
    return float(np.mean(f1[0] > f1[1]))


def bounded_pixel_threshold(
    merged: np.ndarray, masks: np.ndarray, labels: np.ndarray, good_quantile: float, pixel_false_positive: float | None
) -> tuple[float, dict[str, Any]]:
    """The pixel threshold, never above the good pixels' ``1 - pixel_false_positive`` quantile (synthetic validation).

    Synthetic defects score far above many real ones and are mostly small, so the F1-best threshold on them
    trims the blurred halo that real defects need and lands too high. With ``pixel_false_positive``, when
    the F1-best threshold is pinned by the good pixels, the threshold is ``min(F1-adaptive, q)``, ``q`` the
    smallest threshold with at most ``pixel_false_positive`` of the held-out good images' pixels above it
    (:func:`tilead.thresholds.false_alarm_threshold`): any region scoring above the level that only that share
    of good pixels reach is marked, however strong the synthetic defects were.

    Pinned means set by false positives on good background rather than by the defects: a threshold at most
    ``max + PINNED_MARGIN * (max - median)`` of the good pixels (the pinning limit) is F1-best, or as good as
    the F1-best within the validation set's noise. On small synthetic defects the F1 curve is often a plateau
    (bottle: F1 0.38 +- 0.004 from 41 to 71 raw), and where on it the maximum falls is chance: a slightly
    different map (a fused thumbnail branch) moves it above the limit, and a threshold far too high for real
    defects would be kept. So an F1-best threshold above the limit is kept only if it beats the best threshold
    below the limit (:func:`best_f1_at_or_below`) in at least :data:`PINNED_CONFIDENCE` of bootstrap
    resamples of the validation images (:func:`f1_win_share`).

    Args:
        merged: Merged maps ``(n, H, W)``.
        masks: Ground truth ``(n, H, W)``.
        labels: Image labels ``(n,)`` (True: anomalous; good images' pixels give ``q``).
        good_quantile: Quantile rule without anomalies (as :func:`_threshold`).
        pixel_false_positive: Share of good pixels allowed above the threshold, or None for plain F1-adaptive.

    Returns:
        The threshold and how it was chosen.
    """
    value, rule = _threshold(merged, masks, good_quantile)
    lab = np.asarray(labels).astype(bool).reshape(-1)
    if pixel_false_positive is None or rule["rule"] != "f1_adaptive" or lab.all():
        return value, rule
    good = merged[~lab]
    cap = false_alarm_threshold(good, pixel_false_positive)
    top, median = float(good.max()), float(np.median(good))
    pinned_below = top + PINNED_MARGIN * (top - median)
    evidence: dict[str, Any] = {}
    pinned = value <= pinned_below
    if not pinned:  # is the F1-best threshold above the limit measurably better than the best one below it?
        below = best_f1_at_or_below(merged, masks, pinned_below)
        share = f1_win_share(merged, masks, value, below.threshold)
        pinned = share < PINNED_CONFIDENCE
        evidence = {
            "best_below_limit": {"threshold": below.threshold, "f1": below.f1},
            "f1_win_share": share,
            "win_share_needed": PINNED_CONFIDENCE,
            "resamples": PINNED_RESAMPLES,
        }
    chosen = min(value, cap) if pinned else value
    return chosen, {
        "rule": "min(f1_adaptive, good pixel quantile) when f1_adaptive is pinned by good pixels, else f1_adaptive",
        "f1_adaptive": value,
        "f1": rule["f1"],
        "good_pixel_quantile": cap,
        "pixel_false_positive": pixel_false_positive,
        "good_pixel_max": top,
        "pinned_below": pinned_below,
        **evidence,
        "pinned": pinned,
        "binding": "good pixel quantile" if pinned and cap < value else "f1_adaptive",
        "note": "pinned: the F1-best threshold lies at the top of the held-out good pixels (<= max + "
        f"{PINNED_MARGIN} x (max - median)), or above but winning over the best threshold below that limit in "
        f"fewer than {PINNED_CONFIDENCE:g} of bootstrap resamples of the validation images (F1 plateau); it is "
        "then set by false positives on good background, not by how the synthetic defects are delineated, and "
        "is capped at the level only pixel_false_positive of good pixels reach",
    }


def false_alarm_estimate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """False alarms on the good images and misses on the anomalous ones at an image threshold.

    Args:
        scores: Raw image scores ``(n,)``.
        labels: Image labels ``(n,)`` (True: anomalous).
        threshold: Image threshold (an image is NG iff its score > threshold).

    Returns:
        ``good_images``, ``false_alarms``, ``false_alarm_rate`` (None without good images),
        ``anomalous_images``, ``misses``, ``miss_rate`` (None without anomalies) and a note that
        the estimate is in-sample (the threshold was set on these images).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != lab.shape:
        raise ValueError(f"false_alarm_estimate: {s.size} scores for {lab.size} labels")
    ng = s > threshold
    n_good, n_bad = int((~lab).sum()), int(lab.sum())
    alarms, misses = int((ng & ~lab).sum()), int((~ng & lab).sum())
    return {
        "good_images": n_good,
        "false_alarms": alarms,
        "false_alarm_rate": alarms / n_good if n_good else None,
        "anomalous_images": n_bad,
        "misses": misses,
        "miss_rate": misses / n_bad if n_bad else None,
        "in_sample": True,
        "note": "share of the validation images above the image threshold; the threshold was chosen on these "
        "same images, so this is an in-sample (optimistic) estimate; expect more false alarms on new parts",
    }


def check_validation_count(count: int, split: str, minimum: int, force: bool, what: str = "validation images") -> str:
    """Refuse thresholds from too few images (guard rail), or describe the forced exception.

    Args:
        count: Images the thresholds would come from.
        split: ``validation.split``.
        minimum: ``validation.min_images``.
        force: ``validation.force``.
        what: What ``count`` counts, for the message.

    Returns:
        ``""`` when ``count >= minimum``, else (forced) a warning for the records.

    Raises:
        ValueError: If ``count < minimum`` and not forced; the message names the count and what to do.
    """
    if count >= minimum:
        return ""
    if split == "same_as_test":
        advice = "add test images"
    else:
        advice = (
            "add good training images or raise validation.holdout_fraction (the held-out share of "
            "the good training images)"
        )
    message = (
        f"validation ({split}): thresholds would come from {count} {what}, fewer than validation.min_images "
        f"({minimum}); {advice}, or set validation.force: true to accept thresholds from so few images"
    )
    if not force:
        raise ValueError(message)
    return f"forced (validation.force): thresholds come from only {count} {what} (min_images {minimum})"


def _range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:  # degenerate (constant maps): keep the formula finite
        hi = lo + 1.0
    return lo, hi


def tile_statistics(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, grid: TileGrid, good_quantile: float
) -> tuple[TileStats, list[dict[str, Any]]]:
    """Per-location (threshold, min, max) on upsampled tile maps.

    Args:
        maps: float32 ``(L, n, h, w)`` raw maps.
        masks: bool ``(n, H, W)`` ground truth.
        labels: ``(n,)`` image labels.
        grid: The tile grid.
        good_quantile: Quantile rule where a location sees no anomalous pixel.

    Returns:
        The statistics and, per location, how its threshold was chosen.
    """
    cmasks = grid.image_to_canvas(masks)  # padded or resized as the tiles are
    thresholds, mins, maxs, rules = [], [], [], []
    th, tw = grid.tile_size
    for index, (y0, x0, y1, x1) in enumerate(grid.boxes()):
        up = resize_maps(np.ascontiguousarray(maps[index]), (th, tw))
        crop = cmasks[:, y0:y1, x0:x1]
        t, rule = _threshold(up, crop, good_quantile)
        lo, hi = _range(up)
        thresholds.append(t)
        mins.append(lo)
        maxs.append(hi)
        rules.append({"location": grid.location_names()[index], **rule})
    del labels
    return TileStats(tuple(thresholds), tuple(mins), tuple(maxs)), rules


def check_finite(maps: np.ndarray, grid: TileGrid, image_scores: np.ndarray | None = None) -> None:
    """Refuse validation outputs with NaN or infinity (the thresholds and ranges would be NaN).

    Args:
        maps: float32 ``(L, n, h, w)`` raw per-location maps.
        grid: The tile grid (for location names).
        image_scores: ``(n,)`` detector image scores, or None.

    Raises:
        ValueError: Naming the first location and validation image with a non-finite value, and the count.
    """
    bad = ~np.isfinite(maps).reshape(maps.shape[0], maps.shape[1], -1).all(axis=2)
    if bad.any():
        loc, img = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"validation maps: non-finite values (NaN or infinity) in the output of location "
            f"{grid.location_names()[loc]} for validation image {img} ({int(bad.sum())} location/image pairs "
            "in all); thresholds and ranges computed from them would be NaN. The model's output is broken "
            "(check the fitted statistics, the backbone weights and the validation images)."
        )
    if image_scores is not None:
        scores = np.asarray(image_scores)
        if not np.isfinite(scores).all():
            img = int(np.argmax(~np.isfinite(scores)))
            raise ValueError(
                f"validation image scores: non-finite detector score for validation image {img} "
                f"({int((~np.isfinite(scores)).sum())} in all); thresholds computed from them would be NaN"
            )


def compute_stats(
    maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    post: PostProcessor,
    *,
    stage: NormalizationStage,
    good_quantile: float,
    image_scores: np.ndarray | None = None,
    target_false_alarm: float | None = None,
    pixel_false_positive: float | None = None,
    fuse: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[NormalizationStats, dict[str, Any]]:
    """Normalization statistics of a validation set.

    Args:
        maps: float32 ``(L, n, h, w)`` raw per-location maps.
        masks: bool ``(n, H, W)`` ground-truth masks (all False for good).
        labels: int/bool ``(n,)`` image labels.
        post: The run's post-processing without statistics (grid, blending, seams): the maps are merged
            with it, as the deployed runtime merges them.
        stage: ``image``, ``tile`` or ``none``.
        good_quantile: Threshold quantile when there are no anomalies.
        image_scores: float32 ``(n,)`` raw image scores of the detector's own
            (None: each merged map's max).
        target_false_alarm: With anomalies (synthetic validation): the image threshold is at least the
            good-score bound at this false-alarm rate (:func:`bounded_image_threshold`); None: F1-adaptive.
        pixel_false_positive: With anomalies (synthetic validation), stages ``image`` and ``none``: the pixel
            threshold is at most the good pixels' ``1 - pixel_false_positive`` quantile
            (:func:`bounded_pixel_threshold`); None: F1-adaptive.
        fuse: The thumbnail branch: merged maps ``(n, H, W)`` to the fused maps the statistics are then
            measured on (as :func:`tilead.runtime.postprocessor.postprocess_maps`' ``fuse``); None: no thumbnail.

    Returns:
        The statistics and a description of how they were obtained.

    Raises:
        ValueError: For non-finite maps or scores (:func:`check_finite`), mismatched score counts, or a
            ``post`` that already holds statistics.
    """
    if post.stats is not None:
        raise ValueError("post: validation measures the statistics; expected a PostProcessor without them")
    grid = post.grid
    check_finite(maps, grid, image_scores)
    labels = np.asarray(labels).astype(bool)
    info: dict[str, Any] = {
        "stage": stage,
        "images": int(labels.size),
        "anomalous_images": int(labels.sum()),
        "image_score": "max" if image_scores is None else "detector",
    }
    if image_scores is not None and np.shape(image_scores) != labels.shape:
        raise ValueError(
            f"image_scores: expected {labels.size} scores (one per image), got shape {np.shape(image_scores)}"
        )

    def image_scores_of(merged: np.ndarray) -> np.ndarray:
        return merged.reshape(merged.shape[0], -1).max(axis=1) if image_scores is None else np.asarray(image_scores)

    if stage == "tile":
        tile_stats, rules = tile_statistics(maps, masks, labels, grid, good_quantile)
        merged = post.merge(maps, tile_stats=tile_stats, fuse=fuse)
        scores = image_scores_of(merged)
        image_t, image_rule = bounded_image_threshold(scores, labels, good_quantile, target_false_alarm)
        stats = NormalizationStats(
            stage="tile",
            pixel_threshold=0.5,
            image_threshold=image_t,
            pixel_range=(0.0, 1.0),
            image_range=_range(scores),
            tile_stats=tile_stats,
        )
        info.update({"pixel_threshold_rule": rules, "image_threshold_rule": image_rule})
        info["false_alarm_estimate"] = false_alarm_estimate(scores, labels, image_t)
        return stats, info
    merged = post.merge(maps, fuse=fuse)
    scores = image_scores_of(merged)
    pixel_t, pixel_rule = bounded_pixel_threshold(merged, masks, labels, good_quantile, pixel_false_positive)
    image_t, image_rule = bounded_image_threshold(scores, labels, good_quantile, target_false_alarm)
    info.update({"pixel_threshold_rule": pixel_rule, "image_threshold_rule": image_rule})
    info["false_alarm_estimate"] = false_alarm_estimate(scores, labels, image_t)
    if stage == "none":
        return NormalizationStats(stage="none", pixel_threshold=pixel_t, image_threshold=image_t), info
    stats = NormalizationStats(
        stage="image",
        pixel_threshold=pixel_t,
        image_threshold=image_t,
        pixel_range=_range(merged),
        image_range=_range(scores),
    )
    return stats, info
