"""``tilead eval --report``: the evaluation's results as a :class:`~tilead.viz.report.ReportData` page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime import NormalizedMaps
from tilead.runtime.postprocessor import NormalizationStats
from tilead.trainer.data import Sample
from tilead.viz.overlays import overlay
from tilead.viz.report import ReportData, write_report


def overlay_of(
    image: np.ndarray,
    sample: Sample,
    channel_order: str,
    normalized: np.ndarray,
    predicted: np.ndarray,
    truth: np.ndarray | None,
    score: float,
    label: bool,
    raw_score: float,
    output_order: str = "BGR",
) -> np.ndarray:
    """The overlay of one evaluated image, drawn at the image's resolution.

    Args:
        image: uint8 ``(H, W[, C])`` the evaluated image as loaded, in ``channel_order``.
        sample: Where it came from (named in the caption).
        channel_order: ``image``'s colour order.
        normalized: float32 ``(h, w)`` deployed map (upsampled to the image when smaller).
        predicted: bool ``(h, w)`` deployed mask.
        truth: bool ``(h', w')`` ground truth, or None.
        score: Normalized image score.
        label: Deployed decision (True: NG).
        raw_score: Image score before normalization.
        output_order: Channel order of the picture.

    Returns:
        uint8 ``(H', 2W, 3)`` in ``output_order`` (see :func:`tilead.viz.overlays.overlay`).
    """
    return overlay(
        image,
        normalized,
        predicted,
        truth,
        f"{sample.defect_type}/{sample.path.name}",
        channel_order=channel_order,
        score=score,
        label=label,
        extra=f"raw {raw_score:.4g}",
        output_order="RGB" if output_order == "RGB" else "BGR",
    )


def write_eval_report(
    path: Path,
    *,
    metrics_json: dict[str, Any],
    samples: Sequence[Sample],
    load_image: Callable[[Sample], np.ndarray],
    channel_order: str,
    result: NormalizedMaps,
    maps: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    merged: np.ndarray | Sequence[np.ndarray] | None,
    truth: np.ndarray | Sequence[np.ndarray],
    raw_scores: np.ndarray,
    stats: NormalizationStats,
    group_names: Sequence[str] | None = None,
    gallery: int = 4,
) -> Path:
    """Write the HTML report of an evaluation.

    Args:
        path: The page to write.
        metrics_json: What ``metrics.json`` holds (summary and ``metrics``).
        samples: The evaluated images, in order.
        load_image: Loads a sample's image for the gallery overlays.
        channel_order: The loaded images' channel order.
        result: The deployed image outputs: ``scores`` and ``labels`` ``(n,)``.
        maps: Per image, the normalized map ``(H_i, W_i)`` (an ``(n, H, W)`` array or a list for mixed sizes).
        masks: Per image, the deployed mask bool ``(H_i, W_i)``.
        merged: Raw merged maps ``(n, H, W)`` (pixel scores compared with the pixel threshold); None: no
            pixel-level curves.
        truth: Ground-truth masks bool ``(n, H, W)``.
        raw_scores: float ``(n,)`` image scores compared with the image threshold.
        stats: The deployed thresholds.
        group_names: Per-image group shown as the type (default: each sample's defect type).
        gallery: Images per gallery section.

    Returns:
        ``path``.
    """
    labels = np.array([bool(s.label) for s in samples], dtype=bool)
    types = list(group_names) if group_names is not None else [s.defect_type for s in samples]
    has_truth = bool(labels.any())

    def draw(i: int) -> np.ndarray:
        return overlay_of(
            load_image(samples[i]),
            samples[i],
            channel_order,
            maps[i],
            np.asarray(masks[i], dtype=bool),
            np.asarray(truth[i], dtype=bool) if has_truth else None,
            float(result.scores[i]),
            bool(result.labels[i]),
            float(raw_scores[i]),
            output_order="RGB",
        )

    summary: dict[str, Any] = {
        k: metrics_json[k]
        for k in ("run", "config", "inference", "grid_shape", "evaluated_at", "normalization", "image_score")
        if k in metrics_json
    }
    summary["images"] = f"{len(samples)} ({int(labels.sum())} defective)"
    summary["image threshold"] = f"{float(stats.image_threshold):.6g}"
    summary["pixel threshold"] = f"{float(stats.pixel_threshold):.6g}"
    notes = [str(metrics_json["note"])] if "note" in metrics_json else []
    data = ReportData(
        title=f"tilead evaluation: {metrics_json.get('config', '')}",
        summary=summary,
        metrics=dict(metrics_json.get("metrics", {})),
        names=[f"{s.defect_type}/{s.path.name}" for s in samples],
        defect_types=types,
        labels=labels,
        scores=np.asarray(raw_scores, dtype=np.float64),
        image_threshold=float(stats.image_threshold),
        predicted=np.asarray(result.labels, dtype=bool),
        pixel_scores=None if merged is None or not has_truth else list(merged),
        pixel_truth=[np.asarray(t, dtype=bool) for t in truth],
        pixel_predicted=[np.asarray(m, dtype=bool) for m in masks],
        pixel_threshold=float(stats.pixel_threshold),
        draw=draw,
        gallery=gallery,
        notes=notes,
    )
    return write_report(path, data)
