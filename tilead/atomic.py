"""Atomic file writes: a reader never sees a half-written file under its final name.

Every write goes to a temporary name in the same directory, is flushed,
fsynced and renamed over the target. Torch-free, so the runtime-side commands
(``tilead-predict``, ``tilead-bench``) use it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe to probe


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    _atomic(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_png(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` (uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` BGR) as PNG with Pillow; write it atomically.

    Raises:
        ValueError: If ``image`` is not uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.
    """
    import io

    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"PNG of {path}: expected uint8 (H, W) or (H, W, 3) BGR, got {image.dtype} {image.shape}")
    rgb = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())
