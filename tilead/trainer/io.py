"""Atomic file writes and per-location checkpoints (safetensors, no pickles).

Every file of a run folder is written to a temporary name in the same
directory, flushed, fsynced and renamed over the target, so an interrupted run
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    """Encode ``image`` (uint8 HxW or HxWx3 BGR) as PNG and write it atomically.

    Raises:
        OSError: If OpenCV cannot encode the image.
    """
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    atomic_write_bytes(path, buf.tobytes())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors with string metadata as safetensors, atomically."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a readable safetensors file.
    """
    return _read_checkpoint(path, with_tensors=False)[1]


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a readable safetensors file.
    """
    return _read_checkpoint(path, with_tensors=True)


def _read_checkpoint(path: Path, *, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            keys = list(fh.keys()) if with_tensors else []
            tensors = {k: fh.get_tensor(k) for k in keys}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
    return tensors, meta
