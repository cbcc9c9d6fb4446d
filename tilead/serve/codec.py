"""Request bodies to images and results to JSON, with a 4xx reason for every bad input.

No Ray and no torch here: OpenCV decodes (``cv2.imdecode``, in the base
install), so the same checks run in the server and in fast unit tests. Every
bad request becomes a :class:`RequestError` carrying its HTTP status and a
reason that says what was wrong and what was expected; nothing here raises
anything else for outside input.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Decoded pixels OpenCV may allocate for one request body (a "decompression bomb" guard: a small PNG
#: can declare a huge image). Read by OpenCV once, when ``cv2`` is first imported in the process.
MAX_DECODED_PIXELS = 1 << 26  # 64 Mpx, 8192x8192
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_DECODED_PIXELS))

import cv2  # noqa: E402  (after the pixel limit above)


class RequestError(ValueError):
    """A bad request: ``status`` is the HTTP status (4xx), ``reason`` the message for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ImageSpec:
    """What the served bundle takes.

    Attributes:
        image_size: ``(height, width)``.
        channels: 1 (gray) or 3 (decoded as BGR).
        resize: Resize other sizes to ``image_size`` instead of refusing them.
        max_body_bytes: Largest accepted request body.
    """

    image_size: tuple[int, int]
    channels: int
    resize: bool = False
    max_body_bytes: int = 32 << 20

    @property
    def input_order(self) -> str:
        """The Predictor's ``input_order`` for decoded images."""
        return "GRAY" if self.channels == 1 else "BGR"


def check_length(content_length: str | None, spec: ImageSpec) -> None:
    """Refuse a declared body size before reading it.

    Raises:
        RequestError: 400 for a malformed ``Content-Length``, 413 when it exceeds the limit.
    """
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise RequestError(400, f"Content-Length: expected an integer, got {content_length[:40]!r}") from None
    if size < 0:
        raise RequestError(400, f"Content-Length: expected a non-negative integer, got {size}")
    if size > spec.max_body_bytes:
        raise RequestError(413, f"body of {size} bytes exceeds the limit of {spec.max_body_bytes} bytes")


def decode_image(body: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, TIFF, ... whatever OpenCV reads) for the bundle.

    Args:
        body: The request body.
        spec: What the bundle takes.

    Returns:
        uint8 ``(H, W, C)`` with ``C = spec.channels`` (BGR for 3 channels), at the
        bundle's size, or at any size when ``spec.resize`` (the Predictor resizes it).

    Raises:
        RequestError: 413 for a body over the limit, 400 for an empty or undecodable
            body, 422 for an image of the wrong size (when not resizing).
    """
    if len(body) > spec.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes exceeds the limit of {spec.max_body_bytes} bytes")
    if not body:
        raise RequestError(400, "empty body; expected an encoded image (PNG, JPEG, BMP or TIFF bytes)")
    flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(np.frombuffer(body, dtype=np.uint8), flag)
    except cv2.error as err:  # e.g. an image over the decoded-pixel limit
        raise RequestError(400, f"cannot decode the body as an image: {str(err).strip()[-200:]}") from None
    if image is None or image.size == 0:
        raise RequestError(
            400, f"the body ({len(body)} bytes) is not a decodable image; expected PNG, JPEG, BMP or TIFF bytes"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    h, w = spec.image_size
    if image.shape[:2] != (h, w) and not spec.resize:
        raise RequestError(
            422,
            f"image size {image.shape[0]}x{image.shape[1]} (height x width); the bundle takes {h}x{w} "
            "(this server does not resize: start it with --resize to accept other sizes)",
        )
    out: np.ndarray = np.ascontiguousarray(image, dtype=np.uint8)
    return out


def parse_flag(value: str | None, name: str) -> bool:
    """A boolean query parameter: absent/``0``/``false``/``no`` or ``1``/``true``/``yes``/empty.

    Raises:
        RequestError: 400 for anything else.
    """
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("", "1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise RequestError(400, f"query parameter {name!r}: expected 0/1/true/false, got {value[:40]!r}")


def mask_png_base64(mask: np.ndarray) -> str:
    """A bool ``(H, W)`` mask as a base64 PNG (0 and 255, one channel)."""
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("OpenCV could not encode the mask as PNG")
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_mask_png_base64(text: str) -> np.ndarray:
    """Inverse of :func:`mask_png_base64` (for clients and tests): bool ``(H, W)``.

    Raises:
        ValueError: If the text is not a base64 PNG.
    """
    raw = base64.b64decode(text, validate=True)
    mask = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("mask_png: not a PNG")
    out: np.ndarray = mask > 127
    return out


def result_json(
    score: float, label: bool, raw_score: float, timings: dict[str, float], mask: np.ndarray | None
) -> dict[str, Any]:
    """The JSON answer of one prediction (floats as Python floats: exact round trip)."""
    out: dict[str, Any] = {
        "score": float(score),
        "label": bool(label),
        "raw_score": float(raw_score),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if mask is not None:
        out["mask_png"] = mask_png_base64(mask)
        out["mask_shape"] = [int(mask.shape[0]), int(mask.shape[1])]
    return out
