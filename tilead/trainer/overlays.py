"""Overlay pictures for humans: image, heatmap, predicted and true defect outlines."""

from __future__ import annotations

import cv2
import numpy as np

PRED_COLOR = (0, 0, 255)  # BGR red: predicted anomalous region
TRUE_COLOR = (0, 255, 0)  # BGR green: ground truth


def overlay(
    image: np.ndarray,
    normalized: np.ndarray,
    pred_mask: np.ndarray,
    true_mask: np.ndarray | None,
    caption: str,
    *,
    channel_order: str = "BGR",
    alpha: float = 0.45,
) -> np.ndarray:
    """Compose an overlay picture.

    Args:
        image: uint8 ``(H, W, C)`` (C 1 or 3) in ``channel_order``.
        normalized: float32 ``(H, W)`` map in [0, 1] (0.5 = threshold).
        pred_mask: bool ``(H, W)`` predicted anomalous pixels.
        true_mask: bool ``(H, W)`` ground truth, or None.
        caption: Text drawn in the top-left corner.
        channel_order: Order of ``image``'s channels.
        alpha: Heatmap opacity.

    Returns:
        uint8 ``(H, 2W, 3)`` BGR: the plain image left, the annotated right.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif channel_order == "RGB":
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    else:
        bgr = image.copy()
    heat = cv2.applyColorMap(np.clip(normalized * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    annotated = cv2.addWeighted(bgr, 1.0 - alpha, heat, alpha, 0.0)
    thickness = max(1, round(max(image.shape[:2]) / 300))
    if true_mask is not None and true_mask.any():
        contours, _ = cv2.findContours(true_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(annotated, contours, -1, TRUE_COLOR, thickness)
    if pred_mask.any():
        contours, _ = cv2.findContours(pred_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(annotated, contours, -1, PRED_COLOR, thickness)
    scale = max(0.4, max(image.shape[:2]) / 1000)
    for img in (bgr, annotated):
        cv2.putText(img, caption, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(
            img, caption, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
        )
    return np.concatenate([bgr, annotated], axis=1)


def pick_overlays(types: list[str], count: int) -> list[int]:
    """Indices of ``count`` images to draw, spread over the defect types.

    Round-robin over the types (sorted), taking each type's images in order,
    so every type appears before any appears twice.
    """
    if count <= 0:
        return []
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        by_type.setdefault(t, []).append(i)
    order: list[int] = []
    queues = [by_type[t] for t in sorted(by_type)]
    while len(order) < count and any(queues):
        for q in queues:
            if q and len(order) < count:
                order.append(q.pop(0))
    return sorted(order)
