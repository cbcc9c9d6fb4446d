"""NumPy reference implementations: the oracle for every kernel.

Written from the geometry rules in DESIGN.md, independently of the C++ code
(no shared helpers, float64 arithmetic, whole-array formulations), so that the
kernels are checked against a second reading of the same definitions.
"""

from __future__ import annotations

import numpy as np

EDGES = ("shift", "pad", "resize")
"""The policies this oracle knows (its own reading of DESIGN.md, not the runtime's list)."""


def axis_origins(size: int, tile: int, stride: int, edge: str) -> tuple[list[int], int]:
    """Tile origins along one axis and the canvas length."""
    if edge not in EDGES:
        raise ValueError(f"the reference knows no edge policy {edge!r}")
    origins = []
    o = 0
    while o + tile <= size:
        origins.append(o)
        o += stride
    if origins[-1] + tile < size:
        origins.append(size - tile if edge == "shift" else origins[-1] + stride)
    canvas = size if edge == "shift" else origins[-1] + tile
    return origins, canvas


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of align_corners=False bilinear weights (PyTorch rules)."""
    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for d in range(out_size):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        w1 = src - i0
        m[d, i0] += 1.0 - w1
        m[d, i1] += w1
    return m


def resize(maps: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of (..., h, w) arrays in float64."""
    my = bilinear_matrix(maps.shape[-2], out_h)
    mx = bilinear_matrix(maps.shape[-1], out_w)
    result: np.ndarray = my @ maps.astype(np.float64) @ mx.T
    return result


def image_to_canvas(planes: np.ndarray, tile_hw: tuple[int, int], stride_hw: tuple[int, int], edge: str) -> np.ndarray:
    """(n, H, W) image planes -> (n, canvas_h, canvas_w) float64.

    As they are (shift), zero-padded right and bottom (pad) or bilinearly resized to the canvas (resize).
    """
    h, w = planes.shape[1:]
    _, ch = axis_origins(h, tile_hw[0], stride_hw[0], edge)
    _, cw = axis_origins(w, tile_hw[1], stride_hw[1], edge)
    values = planes.astype(np.float64)
    if edge == "resize":
        return resize(values, ch, cw)
    return np.pad(values, ((0, 0), (0, ch - h), (0, cw - w)))


def canvas_to_image(maps: np.ndarray, image_hw: tuple[int, int], edge: str) -> np.ndarray:
    """(n, canvas_h, canvas_w) maps -> (n, H, W) float64.

    The top-left image region (shift, pad) or the canvas bilinearly resized to the image (resize).
    """
    if edge not in EDGES:
        raise ValueError(f"the reference knows no edge policy {edge!r}")
    if edge == "resize":
        return resize(maps, *image_hw)
    result: np.ndarray = maps[:, : image_hw[0], : image_hw[1]].astype(np.float64)
    return result


def tile(
    images: np.ndarray,
    tile_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    edge: str,
    mean: list[float],
    std: list[float],
    out_channels: int,
    swap_rb: bool,
) -> np.ndarray:
    """(n, H, W, C) uint8 -> (L, n, out_channels, th, tw) float64 normalized tiles."""
    n, h, w, c = images.shape
    oy, ch = axis_origins(h, tile_hw[0], stride_hw[0], edge)
    ox, cw = axis_origins(w, tile_hw[1], stride_hw[1], edge)
    img = images.astype(np.float64)
    if c == 1 and out_channels == 3:
        img = np.repeat(img, 3, axis=3)
    if swap_rb and img.shape[3] == 3:
        img = img[..., ::-1]
    if edge == "pad":
        img = np.pad(img, ((0, 0), (0, ch - h), (0, cw - w), (0, 0)))
    elif edge == "resize":
        img = np.moveaxis(resize(np.moveaxis(img, 3, 1), ch, cw), 1, 3)
    norm = (img / 255.0 - np.asarray(mean)) / np.asarray(std)
    out = np.empty((len(oy) * len(ox), n, out_channels, *tile_hw))
    for r, y in enumerate(oy):
        for cc, x in enumerate(ox):
            block = norm[:, y : y + tile_hw[0], x : x + tile_hw[1], :]
            out[r * len(ox) + cc] = np.moveaxis(block, 3, 1)
    return out


def tile_u8(
    images: np.ndarray,
    tile_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    edge: str,
    out_channels: int,
    swap_rb: bool,
) -> np.ndarray:
    """(n, H, W, C) uint8 -> (L, n, th, tw, out_channels) uint8 tiles, the pixels unnormalized (shift, pad only)."""
    if edge not in ("shift", "pad"):
        raise ValueError(f"uint8 tiles copy pixels: no resampling edge policy ({edge!r})")
    n, h, w, c = images.shape
    oy, ch = axis_origins(h, tile_hw[0], stride_hw[0], edge)
    ox, cw = axis_origins(w, tile_hw[1], stride_hw[1], edge)
    img = images
    if c == 1 and out_channels == 3:
        img = np.concatenate([img, img, img], axis=3)
    if swap_rb and img.shape[3] == 3:
        img = img[..., [2, 1, 0]]
    canvas = np.zeros((n, ch, cw, out_channels), dtype=np.uint8)
    canvas[:, :h, :w] = img
    blocks = [canvas[:, y : y + tile_hw[0], x : x + tile_hw[1]] for y in oy for x in ox]
    return np.stack(blocks)


def axis_weights(origins: list[int], tile_len: int, mode: str) -> list[np.ndarray]:
    """Unnormalized per-tile 1-D blend weights (uniform, or feather ramps over overlaps)."""
    result = []
    q = np.arange(tile_len, dtype=np.float64)
    for i, o in enumerate(origins):
        w = np.ones(tile_len)
        if mode == "feather":
            if i > 0:
                overlap = origins[i - 1] + tile_len - o
                if overlap > 0:
                    w = np.where(q < overlap, np.minimum(w, (q + 0.5) / max(overlap, 1)), w)
            if i < len(origins) - 1:
                overlap = o + tile_len - origins[i + 1]
                d = tile_len - 1 - q
                if overlap > 0:
                    w = np.where(d < overlap, np.minimum(w, (d + 0.5) / max(overlap, 1)), w)
        result.append(w)
    return result


def untile(
    maps: np.ndarray,
    image_hw: tuple[int, int],
    tile_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    edge: str,
    weights: str = "uniform",
    tile_stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(L, n, h, w) maps -> (n, canvas_h, canvas_w) weighted average of upsampled tiles."""
    oy, ch = axis_origins(image_hw[0], tile_hw[0], stride_hw[0], edge)
    ox, cw = axis_origins(image_hw[1], tile_hw[1], stride_hw[1], edge)
    wy = axis_weights(oy, tile_hw[0], weights)
    wx = axis_weights(ox, tile_hw[1], weights)
    n = maps.shape[1]
    num = np.zeros((n, ch, cw))
    den = np.zeros((ch, cw))
    for r, y in enumerate(oy):
        for c, x in enumerate(ox):
            loc = r * len(ox) + c
            up = resize(maps[loc], *tile_hw)
            if tile_stats is not None:
                t, lo, hi = (float(a[loc]) for a in tile_stats)
                # Non-finite values stay non-finite (NaN), never clamped to 0 or 1 (issue #16).
                up = np.where(np.isfinite(up), np.clip((up - t) / (hi - lo) + 0.5, 0.0, 1.0), np.nan)
            w2 = np.outer(wy[r], wx[c])
            num[:, y : y + tile_hw[0], x : x + tile_hw[1]] += w2 * up
            den[y : y + tile_hw[0], x : x + tile_hw[1]] += w2
    return num / den


def band_mask(
    image_hw: tuple[int, int], tile_hw: tuple[int, int], stride_hw: tuple[int, int], edge: str, width: float
) -> np.ndarray:
    """(canvas_h, canvas_w) bool: pixels within int(tile * width) of an interior tile edge."""
    axes = []
    for a in range(2):
        origins, canvas = axis_origins(image_hw[a], tile_hw[a], stride_hw[a], edge)
        half = int(tile_hw[a] * width)
        seams = {o for o in origins if o > 0} | {o + tile_hw[a] for o in origins if o + tile_hw[a] < canvas}
        p = np.arange(canvas)
        flags = np.zeros(canvas, dtype=bool)
        for s in seams:
            flags |= (p >= s - half) & (p < s + half)
        axes.append(flags)
    return axes[0][:, None] | axes[1][None, :]


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian of (n, h, w) maps, kernel 2*int(4*sigma+0.5)+1, reflect padding."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    g /= g.sum()
    out = maps.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        length = out.shape[axis]
        for k in range(2 * radius + 1):
            acc += g[k] * np.take(padded, np.arange(k, k + length), axis=axis)
        out = acc
    return out


def smooth_seams(
    maps: np.ndarray,
    image_hw: tuple[int, int],
    tile_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    edge: str,
    sigma: float,
    width: float,
) -> np.ndarray:
    """Seam smoothing: blurred values on band pixels, originals elsewhere."""
    if sigma <= 0:
        return maps.astype(np.float64)
    band = band_mask(image_hw, tile_hw, stride_hw, edge, width)
    return np.where(band[None], gaussian_blur(maps, sigma), maps.astype(np.float64))


def normalize(
    maps: np.ndarray,
    pixel_threshold: float,
    image_threshold: float,
    pixel_range: tuple[float, float] | None,
    image_range: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalized maps, masks, raw scores, scores) by anomalib's min-max formula.

    The non-finite rule (issue #16): a NaN or infinite value is anomalous. Its
    pixel normalizes to 1 and is masked; its image gets raw score NaN and the
    most anomalous score (1 normalized, +inf raw).
    """
    bad = ~np.isfinite(maps)
    flat = maps.reshape(maps.shape[0], -1)
    bad_image = bad.reshape(maps.shape[0], -1).any(axis=1)
    safe = np.where(bad, 0.0, maps.astype(np.float64))
    raw = np.where(bad_image, np.nan, np.where(bad.reshape(flat.shape), -np.inf, safe.reshape(flat.shape)).max(axis=1))
    if pixel_range is None or image_range is None:
        return maps.astype(np.float64), (safe > pixel_threshold) | bad, raw, np.where(bad_image, np.inf, raw)
    norm = np.clip((safe - pixel_threshold) / (pixel_range[1] - pixel_range[0]) + 0.5, 0.0, 1.0)
    norm = np.where(bad, 1.0, norm)
    scores = np.clip((raw - image_threshold) / (image_range[1] - image_range[0]) + 0.5, 0.0, 1.0)
    scores = np.where(bad_image, 1.0, scores)
    return norm, norm > 0.5, raw, scores


def area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA coverage table along one axis (downscaling, ``in_size >= out_size``).

    Output pixel ``d`` covers ``[d * s, (d + 1) * s)`` of the input (``s = 1 / (out / in)`` in float64,
    as OpenCV computes it); every input pixel it touches gets its covered fraction divided by the cell
    width, rounded to float32. Returns ``(index, weight)`` of shape ``(out_size, taps)``, zero-padded
    (weight 0 on index 0) after each row's taps, in increasing index order.
    """
    scale = 1.0 / (out_size / in_size)
    rows: list[list[tuple[int, float]]] = []
    for d in range(out_size):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, in_size - f1)
        s2 = min(int(np.floor(f2)), in_size - 1)
        s1 = min(int(np.ceil(f1)), s2)
        taps = []
        if s1 - f1 > 1e-3:
            taps.append((s1 - 1, (s1 - f1) / cell))
        taps.extend((s, 1.0 / cell) for s in range(s1, s2))
        if f2 - s2 > 1e-3:
            taps.append((s2, min(f2 - s2, 1.0, cell) / cell))
        rows.append(taps)
    width = max(len(t) for t in rows)
    index = np.zeros((out_size, width), dtype=np.int64)
    weight = np.zeros((out_size, width), dtype=np.float32)
    for d, taps in enumerate(rows):
        for k, (s, a) in enumerate(taps):
            index[d, k] = s
            weight[d, k] = np.float32(a)
    return index, weight


def area_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV's ``INTER_AREA`` downscale of a uint8 ``(H, W, C)`` image (``out_h <= H``, ``out_w <= W``).

    Written from OpenCV's description of the algorithm: with whole-number scale factors on both axes
    each output pixel is the mean of its block (``(sum + 2) >> 2`` for 2x2 blocks, else
    ``sum * float32(1 / area)`` rounded half to even); otherwise each output pixel is the coverage-weighted
    mean in float32, summed per source row horizontally, then over rows, rounded half to even.
    """
    h, w, _ = image.shape
    if (out_h, out_w) == (h, w):
        same: np.ndarray = image.copy()
        return same
    sx, sy = 1.0 / (out_w / w), 1.0 / (out_h / h)
    ix, iy = int(np.rint(sx)), int(np.rint(sy))
    if abs(sx - ix) < np.finfo(np.float64).eps and abs(sy - iy) < np.finfo(np.float64).eps:
        blocks = image[: out_h * iy, : out_w * ix].astype(np.int64)
        sums = blocks.reshape(out_h, iy, out_w, ix, -1).sum(axis=(1, 3))
        if ix == 2 and iy == 2:
            halved: np.ndarray = ((sums + 2) >> 2).astype(np.uint8)
            return halved
        scaled = sums.astype(np.float32) * np.float32(1.0 / (ix * iy))
        block: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return block
    xi, xa = area_taps(w, out_w)
    yi, ya = area_taps(h, out_h)
    pixels = image.astype(np.float32)
    out = np.zeros((out_h, out_w, image.shape[2]), dtype=np.float32)
    for t in range(yi.shape[1]):
        rows = pixels[yi[:, t]]  # (out_h, W, C)
        buf = np.zeros(out.shape, dtype=np.float32)
        for k in range(xi.shape[1]):
            buf = buf + rows[:, xi[:, k]] * xa[None, :, k, None]
        out = (out + ya[:, t, None, None] * buf).astype(np.float32)
    result: np.ndarray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return result
