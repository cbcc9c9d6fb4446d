"""Resizing uint8 images the way training does, in bounded memory (``Predictor(resize=True)``).

:func:`resize_image` is the one image resize of training and the runtime: an
image that shrinks along both axes goes through the area kernel
(``_kernels.resize_area``, OpenCV's ``INTER_AREA`` bit for bit, uint8 in and
out, no temporaries beyond the output); any other size change is bilinear
(:func:`resize_uint8`). See ``docs/resizing.md``.

The runtime's resize kernel works on float32 planes: converting a whole
20000x20000x3 camera image first would take 4.8 GB of temporaries. Here the
output is produced in bands of rows: for each band, the two source rows of
every output row are gathered and blended vertically in float32 (the kernel's
formula and coordinates, :func:`lerp_rows`), then the kernel resizes the band
horizontally (its vertical step is then the identity). The result is bit for
bit the kernel's whole-image resize (tested), with temporaries of a few
``band_elements`` floats. Images of up to ``whole_elements`` values go
through the kernel in one call.
"""

from __future__ import annotations

import numpy as np

from tilead.runtime._checks import check_array
from tilead.runtime.devices import kernel_family
from tilead.runtime.postprocess import resize_maps

BAND_ELEMENTS = 1 << 20  # floats per band of rows (x 4 bytes, a few such arrays alive at once)
WHOLE_ELEMENTS = 1 << 24  # images up to this many values (64 MiB as float32) go through the kernel in one call


def lerp_rows(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of bilinear resizing (align_corners=False), in the kernel's float32 arithmetic.

    Args:
        out_size: Output length.
        in_size: Input length.

    Returns:
        ``(i0, i1, w1)``: int64 ``(out_size,)`` source indices and float32 ``(out_size,)`` weights of ``i1``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def resize_uint8(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    band_elements: int = BAND_ELEMENTS,
    whole_elements: int = WHOLE_ELEMENTS,
) -> np.ndarray:
    """Bilinear resize of a uint8 ``(H, W, C)`` image, rounded to uint8; large images in bands of output rows.

    Args:
        image: uint8 ``(H, W, C)``.
        size: Output ``(height, width)``.
        band_elements: Bound on the float32 elements of one band (``rows x W x C``); at least one row.
        whole_elements: Images with at most this many values are resized in one kernel call (faster,
            same result).

    Returns:
        uint8 ``(height, width, C)``, C-contiguous.
    """
    check_array(image, "image", dtypes=[np.uint8], ndims=[3], contiguous=False)
    in_h, in_w, channels = image.shape
    out_h, out_w = size
    if image.size <= whole_elements:
        planes = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        whole = np.clip(np.rint(resize_maps(planes, size)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return np.ascontiguousarray(whole)
    out = np.empty((out_h, out_w, channels), dtype=np.uint8)
    i0, i1, w1 = lerp_rows(out_h, in_h)
    rows = max(1, band_elements // max(1, in_w * channels))
    one = np.float32(1.0)
    for start in range(0, out_h, rows):
        stop = min(out_h, start + rows)
        w = w1[start:stop, None, None]
        top = image[i0[start:stop]].astype(np.float32)
        bottom = image[i1[start:stop]].astype(np.float32)
        band = (one - w) * top + w * bottom  # the kernel's vertical step, (rows, W, C)
        del top, bottom
        planes = np.ascontiguousarray(band.transpose(2, 0, 1))  # (C, rows, W)
        del band
        resized = resize_maps(planes, (stop - start, out_w))  # horizontal only: the vertical step is the identity
        out[start:stop] = np.clip(np.rint(resized), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return out


def resize_image(image: np.ndarray, size: tuple[int, int], *, device: str = "cpu") -> np.ndarray:
    """Resize a uint8 ``(H, W, C)`` image as training does: area when shrinking on both axes, else bilinear.

    Shrinking along both axes (``height <= H`` and ``width <= W``) is OpenCV's ``INTER_AREA``, bit for bit
    (the area kernel, :mod:`tilead/area.h`); growing along either axis is the runtime's bilinear resize
    (:func:`resize_uint8`, align_corners=False, rounded half to even). The trainer loads images through this
    function, so a bundle's model sees the same pixels in training and in ``Predictor(resize=True)``.
    Memory: the area path allocates only the output; the bilinear path works in bands of rows.

    Args:
        image: uint8 ``(H, W, C)``.
        size: Output ``(height, width)``, both at least 1.
        device: ``"cpu"`` or ``"cuda"`` (the area kernel's twin; the bilinear path runs on the CPU).

    Returns:
        uint8 ``(height, width, C)``, C-contiguous (a copy when the size is unchanged).

    Raises:
        ValueError: For a non-uint8 or non-3-D image or a size below 1.
    """
    check_array(image, "image", dtypes=[np.uint8], ndims=[3], contiguous=False)
    out_h, out_w = (int(v) for v in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size: expected a (height, width) of at least 1x1, got {size}")
    in_h, in_w, channels = image.shape
    if (out_h, out_w) == (in_h, in_w):
        return np.array(image, order="C", copy=True)
    if out_h > in_h or out_w > in_w:
        return resize_uint8(image, (out_h, out_w))
    out = np.empty((1, out_h, out_w, channels), dtype=np.uint8)
    kernel_family(device).resize_area(np.ascontiguousarray(image)[None], out)
    result: np.ndarray = out[0]
    return result
