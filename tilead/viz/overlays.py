"""Overlay pictures for humans: image, heatmap, predicted and true defect outlines.

Drawn with NumPy and Pillow only (no OpenCV: its text rendering changed between
OpenCV 4 and 5), at the input image's full resolution: maps and masks at another
size are upsampled to the image (bilinear for the map, nearest for the masks).

The picture (RGB internally, returned BGR or RGB):

* a header: the caption (file name), the score beside the threshold and the
  verdict (OK / NG);
* two panels: the plain image left, the annotated image right;
* a footer: the heatmap's colour bar (normalized score, threshold marked) and a
  legend for the predicted and (when given) ground-truth outlines.

The heatmap colours only what matters. Normalized maps put the threshold at
0.5 but squeeze the normal pixels into a narrow band just below it (min-max
normalization over the validation range: on MVTec bottle the normal pixels of a
good image lie between 0.47 and 0.50), so a fixed colour scale over [0, 1]
tints every pixel alike. Instead, per picture:

* pixels at or below the *floor* stay uncoloured. The floor defaults to half
  way between the map's median (the image's normal level) and the threshold;
* between the floor and the threshold the colour fades in (near misses show
  faintly); at and above the threshold it is fully opaque (``alpha``);
* above the threshold the colour runs from yellow to dark red at the map's
  maximum (the *top*).

The colour bar in the footer shows this picture's floor, threshold and top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

PRED_RGB = (30, 144, 255)  # predicted anomalous region: blue outline
TRUE_RGB = (50, 230, 50)  # ground truth: green outline
OK_RGB = (40, 150, 60)
NG_RGB = (210, 40, 40)
THRESHOLD = 0.5
"""The normalized map's threshold (DESIGN.md: every normalization puts it at 0.5)."""

# Heat colour stops (position in [0, 1] from the threshold to the top, RGB); below the threshold: the first colour.
_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (255, 236, 120)),
    (0.3, (255, 190, 0)),
    (0.65, (255, 90, 0)),
    (1.0, (190, 0, 30)),
)
MIN_SPAN = 1e-3
"""Smallest colour span above the threshold (a map whose maximum is the threshold still gets a scale)."""

U8 = npt.NDArray[np.uint8]


def heat_lut() -> npt.NDArray[np.float32]:
    """The heatmap's 256-entry colour table, float32 ``(256, 3)`` RGB in [0, 255]."""
    pos = np.array([p for p, _ in _STOPS], dtype=np.float64)
    rgb = np.array([c for _, c in _STOPS], dtype=np.float64)
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, pos, rgb[:, k]) for k in range(3)], axis=1).astype(np.float32)


def _upsample_mask(mask: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Nearest-neighbour resize of a bool ``(h, w)`` mask to ``shape``."""
    if mask.shape == shape:
        return mask
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    out: npt.NDArray[np.bool_] = mask[rows[:, None], cols[None, :]]
    return out


def _upsample_map(values: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Bilinear resize of a float32 ``(h, w)`` map to ``shape`` (the runtime's kernel)."""
    if values.shape == shape:
        return values
    from tilead.runtime import resize_maps

    out: npt.NDArray[np.float32] = resize_maps(np.ascontiguousarray(values[None], dtype=np.float32), shape)[0]
    return out


def _shift_max(mask: npt.NDArray[np.bool_], radius: int, axis: int) -> npt.NDArray[np.bool_]:
    """Dilate a bool mask by ``radius`` pixels along one axis."""
    out: npt.NDArray[np.bool_] = mask.copy()
    n = mask.shape[axis]
    for d in range(1, min(radius, n - 1) + 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(d, None), slice(None, n - d)
        out[tuple(a)] |= mask[tuple(b)]
        out[tuple(b)] |= mask[tuple(a)]
    return out


def outline(mask: npt.NDArray[np.bool_], thickness: int) -> npt.NDArray[np.bool_]:
    """The outline of a bool ``(H, W)`` mask: its border pixels, ``thickness`` pixels wide, inside the mask.

    A pixel of the mask is on the outline when a pixel at most ``thickness``
    pixels away (square neighbourhood) lies outside the mask or the image.

    Returns:
        bool ``(H, W)``.
    """
    if thickness < 1:
        raise ValueError(f"outline thickness: expected an int >= 1, got {thickness!r}")
    outside = np.pad(~mask, 1, constant_values=True)
    near = _shift_max(_shift_max(outside, thickness, 0), thickness, 1)
    out: npt.NDArray[np.bool_] = mask & near[1:-1, 1:-1]
    return out


@dataclass(frozen=True)
class HeatScale:
    """How a picture's normalized map becomes colour: uncoloured below ``floor``, opaque from ``threshold``.

    Attributes:
        floor: Scores at or below it stay uncoloured.
        threshold: Scores at or above it are fully opaque (the normalized threshold, 0.5).
        top: The score that gets the darkest colour (the map's maximum, at least ``threshold + MIN_SPAN``).
    """

    floor: float
    threshold: float
    top: float

    @classmethod
    def of(cls, normalized: np.ndarray, floor: float | None = None, threshold: float = THRESHOLD) -> HeatScale:
        """The scale of one map: ``floor`` (default half way from the map's median to the threshold), its top.

        Raises:
            ValueError: If ``floor`` is above the threshold.
        """
        v = np.asarray(normalized, dtype=np.float32)
        finite = v[np.isfinite(v)]
        if floor is None:
            median = float(np.median(finite)) if finite.size else threshold
            floor = threshold - 0.5 * max(0.0, threshold - median)
        elif not floor <= threshold:
            raise ValueError(f"overlay floor: expected a score <= the threshold {threshold}, got {floor!r}")
        top = max(float(finite.max()) if finite.size else threshold, threshold + MIN_SPAN)
        return cls(float(floor), float(threshold), top)


def heat_layer(
    normalized: npt.NDArray[np.float32], scale: HeatScale, *, alpha: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Colour and opacity of the heatmap.

    Args:
        normalized: float32 ``(H, W)`` normalized map (0.5 = threshold); NaN counts as uncoloured.
        scale: Floor, threshold and top of the colours.
        alpha: Opacity at and above the threshold.

    Returns:
        ``(rgb, opacity)``: float32 ``(H, W, 3)`` colours and float32 ``(H, W)`` opacities in [0, alpha].
    """
    v = np.asarray(normalized, dtype=np.float32)
    v = np.where(np.isfinite(v), v, -np.inf)
    t = np.clip((v - scale.threshold) / (scale.top - scale.threshold), 0.0, 1.0)
    rgb: npt.NDArray[np.float32] = heat_lut()[np.round(t * 255).astype(np.intp)]
    width = scale.threshold - scale.floor
    # floor == threshold: a hard edge.
    ramp = np.clip((v - scale.floor) / width, 0.0, 1.0) if width > 0 else (v >= scale.threshold).astype(np.float32)
    opacity: npt.NDArray[np.float32] = (alpha * ramp).astype(np.float32)
    return rgb, opacity


def _as_rgb(image: np.ndarray, channel_order: str) -> U8:
    """uint8 ``(H, W, 3)`` RGB copy of a gray or colour image."""
    if image.dtype != np.uint8:
        raise ValueError(f"overlay image: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay image: expected (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    if channel_order == "BGR":
        return np.ascontiguousarray(image[:, :, ::-1])
    if channel_order == "RGB":
        same: U8 = image.copy()
        return same
    raise ValueError(f"overlay channel_order: expected 'BGR' or 'RGB', got {channel_order!r}")


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (the same on every machine with Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return int(right - left)


def _header(
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    fs: int,
    caption: str,
    score: float | None,
    threshold: float,
    label: bool | None,
    extra: str,
) -> None:
    fnt = font(fs)
    pad = max(4, fs // 2)
    y = (height - fs) // 2
    x_right = width - pad
    if label is not None:
        verdict = "NG" if label else "OK"
        w = _text_width(draw, verdict, fnt) + 2 * pad
        draw.rectangle((x_right - w, 2, x_right, height - 3), fill=NG_RGB if label else OK_RGB)
        draw.text((x_right - w + pad, y), verdict, font=fnt, fill=(255, 255, 255))
        x_right -= w + pad
    parts = []
    if score is not None:
        parts.append(f"score {score:.3f}  threshold {threshold:.2f}" if np.isfinite(score) else "score n/a")
    if extra:
        parts.append(extra)
    if parts:
        text = "   ".join(parts)
        w = _text_width(draw, text, fnt)
        draw.text((x_right - w, y), text, font=fnt, fill=(235, 235, 235))
        x_right -= w + 2 * pad
    # The caption gets what is left, shortened from the left (the file name's end matters most).
    room = max(0, x_right - pad)
    shown = caption
    while shown and _text_width(draw, shown, fnt) > room:
        shown = shown[2:] if len(shown) > 2 else ""
        shown = ("…" + shown[1:]) if shown else shown
    draw.text((pad, y), shown, font=fnt, fill=(255, 255, 255))


def _footer(canvas: Image.Image, top: int, width: int, fs: int, scale: HeatScale, truth: bool, line: int) -> None:
    draw = ImageDraw.Draw(canvas)
    fnt, small = font(fs), font(max(8, (fs * 3) // 4))
    pad = max(4, fs // 2)
    label = "anomaly (normalized)"
    x0 = pad + _text_width(draw, label, fnt) + pad
    bar_w = max(40, min(width // 2, width - x0 - 24 * fs))
    bar_h = max(6, fs // 2 + 2)
    y0 = top + pad // 2 + 2
    draw.text((pad, y0 + (bar_h - fs) // 2), label, font=fnt, fill=(235, 235, 235))
    # The bar spans [lo, top]: a little of the uncoloured part below the floor, the fade, the colours.
    span = scale.top - scale.floor
    lo = scale.floor - 0.15 * span
    v = np.linspace(lo, scale.top, bar_w, dtype=np.float32)[None, :].repeat(bar_h, axis=0)
    rgb, opacity = heat_layer(v, scale, alpha=1.0)
    base = np.full((bar_h, bar_w, 3), 110.0, dtype=np.float32)  # mid gray: "the image" under the heat
    bar = base * (1.0 - opacity[..., None]) + rgb * opacity[..., None]
    canvas.paste(Image.fromarray(np.clip(bar + 0.5, 0, 255).astype(np.uint8)), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h), outline=(200, 200, 200))
    ticks = [(scale.threshold, f"threshold {scale.threshold:g}"), (scale.top, f"max {scale.top:.3f}")]
    if scale.floor < scale.threshold:
        ticks.insert(0, (scale.floor, f"{scale.floor:.3f}"))
    last_right = -(10**9)
    for value, text in ticks:
        x = x0 + round((value - lo) / (scale.top - lo) * (bar_w - 1))
        ty = y0 + bar_h + pad // 2 + 2
        draw.line((x, y0 + bar_h, x, ty), fill=(235, 235, 235), width=2 if value == scale.threshold else 1)
        tw = _text_width(draw, text, small)
        tx = min(max(x - tw // 2, x0 - tw // 2), x0 + bar_w - tw)
        if tx < last_right + pad:  # would overlap the previous label
            continue
        draw.text((tx, ty), text, font=small, fill=(235, 235, 235))
        last_right = tx + tw
    # Legend: outline swatches.
    x = x0 + bar_w + 3 * pad
    entries = [(PRED_RGB, "prediction")] + ([(TRUE_RGB, "ground truth")] if truth else [])
    yc = y0 + bar_h // 2
    for colour, text in entries:
        sw = 2 * fs
        draw.rectangle((x, yc - fs // 2, x + sw, yc + fs // 2), outline=colour, width=max(2, line))
        x += sw + pad
        draw.text((x, yc - fs // 2), text, font=fnt, fill=(235, 235, 235))
        x += _text_width(draw, text, fnt) + 3 * pad


def _font_size(width: int) -> int:
    return int(np.clip(round(width / 36), 11, 72))


def frame(height: int, width: int) -> tuple[int, int]:
    """Heights of the header and the footer of the overlay of a ``height x width`` image.

    The overlay is ``(header + height + footer, 2 * width, 3)``; the panels start at row ``header``.
    """
    del height
    fs = _font_size(width)
    return round(fs * 1.9), round(fs * 3.2)


def overlay(
    image: np.ndarray,
    normalized: np.ndarray,
    pred_mask: np.ndarray,
    true_mask: np.ndarray | None,
    caption: str,
    *,
    channel_order: str = "BGR",
    alpha: float = 0.5,
    floor: float | None = None,
    score: float | None = None,
    label: bool | None = None,
    threshold: float = THRESHOLD,
    extra: str = "",
    output_order: Literal["BGR", "RGB"] = "BGR",
) -> U8:
    """Compose an overlay picture at the image's full resolution.

    Args:
        image: uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` in ``channel_order``.
        normalized: float32 ``(h, w)`` map in [0, 1] (0.5 = threshold); upsampled to ``(H, W)`` if smaller.
        pred_mask: bool ``(h, w)`` predicted anomalous pixels (resized to ``(H, W)`` nearest).
        true_mask: bool ``(h', w')`` ground truth, or None (then the legend has no ground-truth entry).
        caption: Text at the header's left (e.g. the file's relative path).
        channel_order: Order of ``image``'s colour channels, ``"BGR"`` or ``"RGB"``.
        alpha: Heatmap opacity at and above the threshold.
        floor: Normalized scores at or below it stay uncoloured (<= 0.5; default: half way from the
            map's median to the threshold, see :class:`HeatScale`).
        score: The normalized image score shown beside ``threshold`` (None: not shown).
        label: The verdict, True = NG (None: not shown).
        threshold: The threshold shown beside the score.
        extra: More text for the header (e.g. the raw score).
        output_order: Channel order of the result.

    Returns:
        uint8 ``(header + H + footer, 2W, 3)``: header, the plain image left and the annotated
        image right, footer with colour bar and legend.

    Raises:
        ValueError: For a bad image, map shape, ``alpha`` or ``floor``.
    """
    rgb = _as_rgb(np.asarray(image), channel_order)
    h, w = rgb.shape[:2]
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"overlay alpha: expected 0 < alpha <= 1, got {alpha!r}")
    for name, arr in (("normalized", normalized), ("pred_mask", pred_mask), ("true_mask", true_mask)):
        if arr is not None and np.asarray(arr).ndim != 2:
            raise ValueError(f"overlay {name}: expected a 2-D (H, W) array, got shape {np.asarray(arr).shape}")
    values = _upsample_map(np.asarray(normalized, dtype=np.float32), (h, w))
    scale = HeatScale.of(values, floor)
    heat, opacity = heat_layer(values, scale, alpha=alpha)
    annotated = rgb.astype(np.float32) * (1.0 - opacity[..., None]) + heat * opacity[..., None]
    annotated_u8 = np.clip(annotated + 0.5, 0, 255).astype(np.uint8)
    line = max(1, round(max(h, w) / 300))
    masks: Sequence[tuple[np.ndarray | None, tuple[int, int, int]]] = ((true_mask, TRUE_RGB), (pred_mask, PRED_RGB))
    for mask, colour in masks:
        if mask is not None:
            m = _upsample_mask(np.asarray(mask).astype(bool), (h, w))
            if m.any():
                annotated_u8[outline(m, line)] = colour
    fs = _font_size(w)
    head_h, foot_h = frame(h, w)
    canvas = Image.new("RGB", (2 * w, head_h + h + foot_h), (32, 32, 32))
    canvas.paste(Image.fromarray(rgb), (0, head_h))
    canvas.paste(Image.fromarray(annotated_u8), (w, head_h))
    draw = ImageDraw.Draw(canvas)
    _header(draw, 2 * w, head_h, fs, caption, score, threshold, label, extra)
    _footer(canvas, head_h + h, 2 * w, fs, scale, true_mask is not None, line)
    out = np.asarray(canvas, dtype=np.uint8)
    return np.ascontiguousarray(out[:, :, ::-1]) if output_order == "BGR" else out.copy()


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
