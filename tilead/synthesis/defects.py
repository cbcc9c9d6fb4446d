"""Synthetic defects on good images, for validation without labelled defects.

Every defect is drawn at the image's native resolution into a copy of one
good image. The mask is **exact by definition**: ``mask[y, x]`` is True if and
only if the defect changed pixel ``(y, x)`` in at least one channel
(``(image != good).any(axis=-1)``). For blended kinds (a texture or colour
mixed in with an opacity below 1) this means the pixels of the drawn region
whose 8-bit value was changed by the blend; a region pixel the blend happened
to leave identical is not in the mask, and nothing outside the drawn region
ever changes. So ``image == good`` wherever ``mask`` is False, always.

Kinds (``KINDS``):

* ``perlin_texture``: a Perlin-noise shaped region (inside an ellipse)
  filled with the texture of another good image, or of a flipped, shifted and
  brightness-jittered copy of the same image when there is no other image of
  a usable size, blended with an opacity in [0.5, 1] (DRAEM-like, no external
  texture data);
* ``cutpaste``: a rectangle of the same image, optionally colour-jittered,
  pasted elsewhere (CutPaste);
* ``scar``: a thin rotated rectangle (4-16 px wide) of jittered content from
  elsewhere in the image (CutPaste-scar);
* ``scratch``: a straight line 1-4 px wide (pixel centres closer than half the
  width to the centre line), brighter or darker than its surroundings;
* ``spot``: a small ellipse (radius 1-8 px at 256 px scale, scaled with the
  tile), dark or bright;
* ``blotch``: a Perlin-shaped region whose brightness or colour is shifted.

Sizes are drawn log-uniformly from a few pixels to half the reference size
(``tile_size`` when given, else the image size), so small and large defects
are equally common on a log scale. Centres are uniform over the whole image
(regions are clipped at the border); with ``tile_size`` a quarter of the
centres are snapped onto a multiple of the tile size along one axis, so that
defects lie across tile seams too.

Opacity: with ``opacity=(lo, hi)`` every defect is made fainter after it is
drawn: the result is ``good + a * (defect - good)`` (rounded to uint8) with
``a`` drawn uniformly from ``[lo, hi]`` per defect, so the shape, size and
place are those of the full-strength defect and only the contrast changes
(the mask stays exact: the pixels the faint defect changed). Which attempt
makes the defect is decided at full strength, so every opacity fades the
same defect; where ``a`` would round every change away, it is raised just
enough to keep one changed pixel. Real defects are
often faint (a stain, a shallow dent); validation thresholds fitted only on
high-contrast fakes land too high for them (see ``docs/good_only.md``).

Determinism: defect ``k`` of image ``i`` draws from its own stream seeded by
``(seed, i, k)``, so the result depends only on the seed, the inputs and
``per_image``. Kinds go round-robin over ``kinds`` (every kind appears once
``len(images) * per_image >= len(kinds)``).

NumPy only (no torch, OpenCV or SciPy): the torch-free runtime tools may import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tilead.synthesis.perlin import fractal_noise

__all__ = ["KINDS", "SyntheticDefect", "synthesize_defects"]

KINDS = ("perlin_texture", "cutpaste", "scar", "scratch", "spot", "blotch")
MIN_IMAGE_SIDE = 8
_ATTEMPTS = 16


@dataclass(frozen=True)
class SyntheticDefect:
    """One synthetic defect.

    Attributes:
        image: uint8 ``(H, W, C)``: the good image with the defect.
        mask: bool ``(H, W)``: exactly the pixels that differ from the good image.
        kind: One of :data:`KINDS`.
        area: Number of mask pixels (at least 1).
        source: Index of the good image it was made from.
    """

    image: np.ndarray
    mask: np.ndarray
    kind: str
    area: int
    source: int


@dataclass(frozen=True)
class _Ctx:
    images: Sequence[np.ndarray]
    index: int
    rng: np.random.Generator
    ref: tuple[int, int]  # reference (tile) size for defect sizes
    tile: tuple[int, int] | None
    min_fraction: float = 0.0  # smallest defect side as a fraction of min(ref)

    @property
    def image(self) -> np.ndarray:
        return self.images[self.index]

    @property
    def max_side(self) -> float:
        return max(4.0, 0.5 * min(self.ref))

    def low(self, pixels: float) -> float:
        """The smallest side of a kind (``pixels``), raised to ``min_fraction`` of the reference size."""
        if self.min_fraction <= 0.0:
            return pixels
        return min(max(pixels, self.min_fraction * min(self.ref)), self.max_side)


# -- geometry -----------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    lo, hi = max(lo, 1e-3), max(hi, lo)
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _centre(ctx: _Ctx) -> tuple[float, float]:
    h, w = ctx.image.shape[:2]
    cy, cx = ctx.rng.uniform(0, h), ctx.rng.uniform(0, w)
    if ctx.tile is not None and ctx.rng.random() < 0.25:
        if ctx.rng.random() < 0.5 and h > ctx.tile[0]:
            cy = float(ctx.tile[0] * ctx.rng.integers(1, max(2, math.ceil(h / ctx.tile[0]))))
        elif w > ctx.tile[1]:
            cx = float(ctx.tile[1] * ctx.rng.integers(1, max(2, math.ceil(w / ctx.tile[1]))))
    return min(cy, h - 1.0), min(cx, w - 1.0)


def _box(ctx: _Ctx, bh: int, bw: int) -> tuple[int, int, int, int]:
    """A box of about ``bh x bw`` around a random centre, clipped to the image: ``(y0, y1, x0, x1)``."""
    h, w = ctx.image.shape[:2]
    cy, cx = _centre(ctx)
    y0, x0 = round(cy - bh / 2), round(cx - bw / 2)
    y0c, x0c = max(0, y0), max(0, x0)
    y1c, x1c = min(h, y0 + max(1, bh)), min(w, x0 + max(1, bw))
    if y1c <= y0c:
        y0c, y1c = min(int(cy), h - 1), min(int(cy), h - 1) + 1
    if x1c <= x0c:
        x0c, x1c = min(int(cx), w - 1), min(int(cx), w - 1) + 1
    return y0c, y1c, x0c, x1c


def _oriented(ctx: _Ctx, length: float, width: float) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A rotated rectangle (``|along| <= length / 2``, ``|across| < width / 2``) in its clipped bounding box."""
    angle = ctx.rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    half_h = 0.5 * (length * abs(s) + width * abs(c)) + 1
    half_w = 0.5 * (length * abs(c) + width * abs(s)) + 1
    h, w = ctx.image.shape[:2]
    cy, cx = _centre(ctx)
    y0, y1 = max(0, math.floor(cy - half_h)), min(h, math.ceil(cy + half_h) + 1)
    x0, x1 = max(0, math.floor(cx - half_w)), min(w, math.ceil(cx + half_w) + 1)
    yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    along = xx * c + yy * s
    across = -xx * s + yy * c
    region = (np.abs(along) <= length / 2) & (np.abs(across) < width / 2)
    return (y0, y1, x0, x1), region


def _perlin_region(ctx: _Ctx, box: tuple[int, int, int, int]) -> np.ndarray:
    """A Perlin-noise shaped region inside the ellipse inscribed in ``box``: bool ``(bh, bw)``."""
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    res = (int(ctx.rng.integers(1, 5)), int(ctx.rng.integers(1, 5)))
    noise = fractal_noise((bh, bw), res, ctx.rng, octaves=2)
    yy = (np.arange(bh) + 0.5 - bh / 2)[:, None] / (bh / 2)
    xx = (np.arange(bw) + 0.5 - bw / 2)[None, :] / (bw / 2)
    envelope = np.clip(1.0 - (yy**2 + xx**2), 0.0, 1.0)
    level = noise * 0.8 + envelope - 0.5
    region: np.ndarray = level > ctx.rng.uniform(0.0, 0.3)
    return region


# -- filling ------------------------------------------------------------------------------------------


def _jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Gain and per-channel offset: float64 of ``patch``'s shape."""
    gain = rng.uniform(1 - 0.4 * strength, 1 + 0.4 * strength)
    offset = rng.uniform(-40 * strength, 40 * strength, size=patch.shape[-1])
    out: np.ndarray = patch.astype(np.float64) * gain + offset
    return out


def _crop(src: np.ndarray, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    y = int(rng.integers(0, src.shape[0] - bh + 1))
    x = int(rng.integers(0, src.shape[1] - bw + 1))
    return src[y : y + bh, x : x + bw]


def _texture(ctx: _Ctx, bh: int, bw: int) -> np.ndarray:
    """Texture for a region of ``bh x bw``: another good image's crop, or a transformed copy of this image."""
    others = [j for j, im in enumerate(ctx.images) if j != ctx.index and im.shape[0] >= bh and im.shape[1] >= bw]
    if others:
        src = ctx.images[int(ctx.rng.choice(others))]
        patch = _crop(src, bh, bw, ctx.rng).astype(np.float64)
        strength = 0.5
    else:
        src = ctx.image[::-1, ::-1] if ctx.rng.random() < 0.5 else ctx.image[::-1, :]
        shift = (int(ctx.rng.integers(0, src.shape[0])), int(ctx.rng.integers(0, src.shape[1])))
        src = np.roll(src, shift, axis=(0, 1))
        patch = _crop(src, bh, bw, ctx.rng).astype(np.float64)
        strength = 1.0
    if ctx.rng.random() < 0.5:
        patch = patch[:, ::-1]
    return _jitter(patch, ctx.rng, strength)


def _contrast_colour(ctx: _Ctx, patch: np.ndarray) -> np.ndarray:
    """A colour clearly darker or brighter than ``patch``'s mean: float64 ``(C,)``."""
    mean = patch.reshape(-1, patch.shape[-1]).mean(axis=0)
    delta = ctx.rng.uniform(60, 160)
    dark = mean.mean() > 127 if ctx.rng.random() < 0.8 else ctx.rng.random() < 0.5
    out: np.ndarray = np.clip(mean - delta if dark else mean + delta, 0, 255)
    return out


def _blend(
    image: np.ndarray, box: tuple[int, int, int, int], region: np.ndarray, fill: np.ndarray, alpha: float | np.ndarray
) -> np.ndarray:
    """``image`` with ``fill`` blended into ``region`` of ``box`` (opacity ``alpha``), rounded to uint8."""
    y0, y1, x0, x1 = box
    out: np.ndarray = image.copy()
    local = out[y0:y1, x0:x1].astype(np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    mixed = np.clip(np.rint(local * (1 - a) + fill * a), 0, 255)
    local[region] = mixed[region] if mixed.shape == local.shape else np.broadcast_to(mixed, local.shape)[region]
    out[y0:y1, x0:x1] = local.astype(np.uint8)
    return out


# -- kinds --------------------------------------------------------------------------------------------


def _perlin_texture(ctx: _Ctx) -> np.ndarray:
    side = _log_uniform(ctx.rng, ctx.low(8), ctx.max_side)
    aspect = ctx.rng.uniform(0.5, 2.0)
    box = _box(ctx, round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect)))
    region = _perlin_region(ctx, box)
    fill = _texture(ctx, box[1] - box[0], box[3] - box[2])
    return _blend(ctx.image, box, region, fill, ctx.rng.uniform(0.5, 1.0))


def _cutpaste(ctx: _Ctx) -> np.ndarray:
    side = _log_uniform(ctx.rng, ctx.low(4), ctx.max_side)
    aspect = math.exp(ctx.rng.uniform(math.log(0.3), math.log(3.3)))
    box = _box(ctx, round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect)))
    bh, bw = box[1] - box[0], box[3] - box[2]
    patch = _crop(ctx.image, bh, bw, ctx.rng).astype(np.float64)
    if ctx.rng.random() < 0.5:
        patch = _jitter(patch, ctx.rng, 0.5)
    return _blend(ctx.image, box, np.ones((bh, bw), dtype=bool), patch, 1.0)


def _scar(ctx: _Ctx) -> np.ndarray:
    width = ctx.rng.uniform(4, 16)
    length = _log_uniform(ctx.rng, ctx.low(10), max(12.0, ctx.max_side))
    box, region = _oriented(ctx, length, width)
    patch = _crop(ctx.image, box[1] - box[0], box[3] - box[2], ctx.rng)
    return _blend(ctx.image, box, region, _jitter(patch, ctx.rng, 1.0), 1.0)


def _scratch(ctx: _Ctx) -> np.ndarray:
    width = ctx.rng.uniform(1, 4)
    length = _log_uniform(ctx.rng, ctx.low(6), max(8.0, 1.2 * ctx.max_side))
    box, region = _oriented(ctx, length, width)
    y0, y1, x0, x1 = box
    colour = _contrast_colour(ctx, ctx.image[y0:y1, x0:x1])
    return _blend(ctx.image, box, region, colour, ctx.rng.uniform(0.7, 1.0))


def _spot(ctx: _Ctx) -> np.ndarray:
    scale = max(1.0, min(ctx.ref) / 256)
    r = max(_log_uniform(ctx.rng, 1, 8) * scale, 0.5 * ctx.low(0))
    ry, rx = r * ctx.rng.uniform(0.6, 1.4), r * ctx.rng.uniform(0.6, 1.4)
    h, w = ctx.image.shape[:2]
    cy, cx = _centre(ctx)
    y0, y1 = max(0, math.floor(cy - ry)), min(h, math.ceil(cy + ry) + 1)
    x0, x1 = max(0, math.floor(cx - rx)), min(w, math.ceil(cx + rx) + 1)
    yy = (np.arange(y0, y1) - cy)[:, None] / ry
    xx = (np.arange(x0, x1) - cx)[None, :] / rx
    region = yy**2 + xx**2 <= 1.0
    colour = _contrast_colour(ctx, ctx.image[y0:y1, x0:x1])
    return _blend(ctx.image, (y0, y1, x0, x1), region, colour, ctx.rng.uniform(0.6, 1.0))


def _blotch(ctx: _Ctx) -> np.ndarray:
    side = _log_uniform(ctx.rng, ctx.low(8), ctx.max_side)
    box = _box(ctx, round(side), round(side * ctx.rng.uniform(0.6, 1.6)))
    region = _perlin_region(ctx, box)
    y0, y1, x0, x1 = box
    local = ctx.image[y0:y1, x0:x1].astype(np.float64)
    channels = local.shape[-1]
    if ctx.rng.random() < 0.5 or channels == 1:  # brightness
        sign = -1.0 if local.mean() > 127 else 1.0
        shift = np.full(channels, sign * ctx.rng.uniform(25, 70))
    else:  # colour cast
        shift = ctx.rng.uniform(20, 60, size=channels) * ctx.rng.choice([-1.0, 1.0], size=channels)
    return _blend(ctx.image, box, region, local + shift, 1.0)


_MAKERS: dict[str, Callable[[_Ctx], np.ndarray]] = {
    "perlin_texture": _perlin_texture,
    "cutpaste": _cutpaste,
    "scar": _scar,
    "scratch": _scratch,
    "spot": _spot,
    "blotch": _blotch,
}
assert tuple(_MAKERS) == KINDS


# -- public -------------------------------------------------------------------------------------------


def _fade(good: np.ndarray, image: np.ndarray, a: float) -> np.ndarray:
    """``good + a * (image - good)`` rounded to uint8; ``a`` raised just enough to keep one changed pixel.

    A faint copy of a low-contrast defect can round every change away; it then gets the smallest opacity
    that changes a pixel (at most 1/2, since the full-strength defect changes some pixel by 1 or more), so
    it stays the same defect, never stronger than at full strength.
    """
    change = image.astype(np.float64) - good
    largest = float(np.abs(change).max())
    a = max(a, min(1.0, 0.5 / largest * (1.0 + 1e-6)))
    faded: np.ndarray = np.clip(np.rint(good + a * change), 0, 255).astype(np.uint8)
    return faded


def _check_inputs(
    images: Sequence[np.ndarray],
    seed: int,
    per_image: int,
    kinds: Sequence[str] | None,
    tile_size: object,
    opacity: object = (1.0, 1.0),
) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise TypeError(f"images: expected a sequence of uint8 (H, W, C) arrays, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: expected at least one good image, got none")
    channels: int | None = None
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray):
            raise TypeError(f"images[{i}]: expected a numpy array, got {type(im).__name__}")
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] not in (1, 3, 4):
            raise ValueError(f"images[{i}]: expected uint8 (H, W, C) with C 1, 3 or 4, got {im.dtype} {im.shape}")
        if min(im.shape[:2]) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"images[{i}]: expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, "
                f"got {im.shape[0]}x{im.shape[1]}"
            )
        if channels is not None and im.shape[2] != channels:
            raise ValueError(f"images[{i}]: {im.shape[2]} channels, images[0] has {channels}; expected the same")
        channels = im.shape[2]
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(per_image, bool) or not isinstance(per_image, int | np.integer) or per_image < 1:
        raise ValueError(f"per_image: expected a positive integer, got {per_image!r}")
    chosen: tuple[str, ...]
    if kinds is None:
        chosen = KINDS
    else:
        if isinstance(kinds, str):
            raise TypeError(f"kinds: expected a sequence of kind names, got the string {kinds!r}")
        chosen = tuple(kinds)
        if not chosen:
            raise ValueError(f"kinds: expected at least one of {', '.join(KINDS)}, got none")
        bad = [k for k in chosen if k not in KINDS]
        if bad:
            raise ValueError(f"kinds: unknown {bad}; expected some of {', '.join(KINDS)}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"kinds: {list(chosen)} lists a kind twice")
    tile: tuple[int, int] | None = None
    if tile_size is not None:
        if (
            not isinstance(tile_size, Sequence)
            or len(tile_size) != 2
            or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in tile_size)
        ):
            raise ValueError(f"tile_size: expected (height, width) of positive integers, got {tile_size!r}")
        tile = (int(tile_size[0]), int(tile_size[1]))
    if (
        not isinstance(opacity, Sequence)
        or len(opacity) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in opacity)
        or not 0.0 < float(opacity[0]) <= float(opacity[1]) <= 1.0
    ):
        raise ValueError(f"opacity: expected (low, high) with 0 < low <= high <= 1, got {opacity!r}")
    return chosen, tile


def synthesize_defects(
    images: Sequence[np.ndarray],
    *,
    seed: int,
    per_image: int = 1,
    kinds: Sequence[str] | None = None,
    tile_size: tuple[int, int] | None = None,
    opacity: tuple[float, float] = (1.0, 1.0),
    min_fraction: float = 0.0,
) -> list[SyntheticDefect]:
    """Draw synthetic defects into copies of good images (see the module docstring).

    Args:
        images: Good images, each uint8 ``(H, W, C)`` (C 1, 3 or 4, the same for all; sizes may differ,
            at least 8x8). They are not modified.
        seed: Non-negative seed; the same seed and inputs give identical results.
        per_image: Defects made from each image (each its own copy, one defect each).
        kinds: Kinds to draw, round-robin (default: all of :data:`KINDS`).
        tile_size: ``(height, width)`` of the tiles the model sees: defect sizes scale with it and some
            defects are centred on tile seams (None: sizes scale with each image).
        opacity: ``(low, high)`` range, ``0 < low <= high <= 1``, of the factor each defect's change is scaled
            by (drawn per defect; ``(1, 1)``: full strength, the default).
        min_fraction: Smallest defect side (length for scratches and scars, diameter for spots) as a
            fraction of the reference size, in ``[0, 0.5]`` (0: the kinds' own few-pixel minimum).

    Returns:
        ``len(images) * per_image`` defects: image-major, ``per_image`` consecutive ones per image.

    Raises:
        TypeError: If ``images`` or ``kinds`` have the wrong type.
        ValueError: For a bad image (naming ``images[i]``), seed, count, kind, tile size or opacity, or if an
            image is so uniform that no attempt changed a pixel.
    """
    chosen, tile = _check_inputs(images, seed, per_image, kinds, tile_size, opacity)
    lo, hi = float(opacity[0]), float(opacity[1])
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, int | float) or not 0.0 <= min_fraction <= 0.5:
        raise ValueError(f"min_fraction: expected a number in [0, 0.5], got {min_fraction!r}")
    out: list[SyntheticDefect] = []
    for i, good in enumerate(images):
        ref = tile if tile is not None else (int(good.shape[0]), int(good.shape[1]))
        for k in range(per_image):
            kind = chosen[(i * per_image + k) % len(chosen)]
            rng = np.random.default_rng([int(seed), i, k])
            ctx = _Ctx(images, i, rng, ref, tile, float(min_fraction))
            for _ in range(_ATTEMPTS):
                image = _MAKERS[kind](ctx)
                if not np.any(image != good):
                    continue  # decided on the full-strength defect: every opacity takes the same attempt
                if lo < 1.0:
                    image = _fade(good, image, rng.uniform(lo, hi))
                mask = np.any(image != good, axis=-1)
                out.append(SyntheticDefect(image=image, mask=mask, kind=kind, area=int(mask.sum()), source=i))
                break
            else:
                raise ValueError(
                    f"images[{i}]: {_ATTEMPTS} attempts at a {kind!r} defect changed no pixel "
                    "(is the image uniform?); use other kinds or other images"
                )
    return out
