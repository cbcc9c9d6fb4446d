"""Reading image files for the runtime's commands (``tilead predict``, ``bench``, ``calibrate``) with Pillow.

The lean install (``pip install tilead``) has neither torch nor OpenCV, so the
commands that only run a bundle decode files with Pillow. The pixels are the
ones the trainer's loader (OpenCV, ``IMREAD_UNCHANGED``) gets from the same file
(a test compares the two wherever OpenCV is installed):

* colour comes back as uint8 ``(H, W, 3)`` BGR, gray as uint8 ``(H, W)``;
* 16-bit samples are reduced to 8 bits by ``>> 8`` (the high byte), as the trainer does (16-bit
  colour TIFF files may differ by one level: Pillow rounds them);
* alpha is dropped (not blended); palette, CMYK and YCbCr images are converted to RGB first;
* a colour file read as gray goes through :func:`bgr_to_gray`, as in the trainer
  (OpenCV's ``COLOR_BGR2GRAY`` weights, ``(4899 R + 9617 G + 1868 B + 8192) >> 14``);
* EXIF orientation is ignored (files are decoded as stored, as the trainer does);
* multi-frame files (TIFF, GIF) give their first frame.

This module imports neither torch nor cv2.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

__all__ = ["MAX_PIXELS", "ImageFileError", "bgr_to_gray", "read_image", "resize_nearest"]

MAX_PIXELS = 1 << 30
"""Largest image (height x width) :func:`read_image` decodes: OpenCV's default limit, 1 Gi pixels."""

_PILLOW_LIMIT = threading.Lock()
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageFileError(ValueError):
    """A file that cannot be read or decoded as an image; the message names the file and the cause."""


def bgr_to_gray(image: np.ndarray) -> np.ndarray:
    """Gray from BGR with the BT.601 weights in 14-bit fixed point; the trainer's and the runtime CLIs' one definition.

    ``(4899 R + 9617 G + 1868 B + 8192) >> 14``: OpenCV's ``COLOR_BGR2GRAY`` weights; OpenCV's own
    vectorised code rounds differently for about 0.3 % of pixels (by one level), so both sides use
    this function rather than OpenCV.

    Args:
        image: ``(H, W, 3)`` uint8 BGR.

    Returns:
        ``(H, W)`` uint8 luma.
    """
    bgr = image.astype(np.uint32)
    gray = (bgr[..., 0] * 1868 + bgr[..., 1] * 9617 + bgr[..., 2] * 4899 + 8192) >> 14
    return gray.astype(np.uint8)


def resize_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` resize (source pixel ``floor(x * (1 / (out / in)))``, its rounding), for masks.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array of any dtype.
        size: Output ``(height, width)``, both positive.

    Returns:
        ``(height, width[, C])`` array of ``image``'s dtype.

    Raises:
        ValueError: If ``image`` is empty or ``size`` is not positive.
    """
    out_h, out_w = size
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output size must be positive (height, width), got {size}")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, C) array, got shape {image.shape}")
    in_h, in_w = image.shape[:2]
    rows = np.minimum(np.floor(np.arange(out_h) * (1.0 / (out_h / in_h))).astype(np.int64), in_h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) * (1.0 / (out_w / in_w))).astype(np.int64), in_w - 1)
    return np.ascontiguousarray(image[rows][:, cols])


def read_image(path: str | Path, *, gray: bool, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file as the trainer's loader does.

    Args:
        path: The file.
        gray: ``True`` for a ``(H, W)`` gray image, ``False`` for ``(H, W, 3)`` BGR.
        max_pixels: Largest ``H * W`` accepted (the header is checked before any pixel is decoded).

    Returns:
        uint8 ``(H, W)`` when ``gray`` else ``(H, W, 3)`` BGR, C-contiguous.

    Raises:
        ImageFileError: If the file cannot be read, is not a decodable image, is larger than
            ``max_pixels`` or has a pixel type other than 1-, 8- or 16-bit samples.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with _PILLOW_LIMIT:  # our own limit replaces Pillow's decompression-bomb one (89 M pixels)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageFileError(
                    f"{path}: {height}x{width} (height x width) is more than the {max_pixels} pixels allowed"
                )
            img.load()
            pixels = _to_uint8(img, path)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        raise ImageFileError(f"cannot read {path}: {err.strerror or type(err).__name__}") from err
    except UnidentifiedImageError as err:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageFileError(f"cannot decode {path}: the file is empty") from err
        raise ImageFileError(f"cannot decode {path}: not an image in a format Pillow reads") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageFileError):
            raise
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ImageFileError(f"cannot decode {path} (empty, truncated or corrupt: {reason})") from err
    if pixels.ndim == 2:
        return np.ascontiguousarray(pixels) if gray else np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, 2))
    bgr = np.ascontiguousarray(pixels[:, :, ::-1])
    return bgr_to_gray(bgr) if gray else bgr


def _to_uint8(img: object, path: Path) -> np.ndarray:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 pixels of a loaded Pillow image."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.uint16)
        return (wide >> 8).astype(np.uint8)
    if mode in ("L", "1", "LA", "La"):
        return np.asarray(img.convert("L") if mode != "L" else img)
    if mode == "I":  # 16-bit gray in older Pillow versions; 32-bit samples beyond 16 bits are refused
        wide = np.asarray(img)
        if wide.size and (wide.min() < 0 or wide.max() > 0xFFFF):
            raise ImageFileError(f"{path}: 32-bit integer samples outside 0..65535 (expected 8- or 16-bit images)")
        return (wide.astype(np.uint16) >> 8).astype(np.uint8)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        return np.asarray(img if mode == "RGB" else img.convert("RGB"))
    raise ImageFileError(
        f"{path}: unsupported pixel type {mode!r} (expected 1-, 8- or 16-bit gray, palette, RGB(A) or CMYK samples)"
    )
