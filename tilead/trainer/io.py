"""Per-location checkpoints (safetensors, no pickles), written atomically.

The atomic writers live in :mod:`tilead.atomic` (torch-free) and are
re-exported here for the trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tilead.atomic import atomic_write_bytes, atomic_write_json, atomic_write_png, atomic_write_text

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_write_text",
    "load_tensors",
    "read_metadata",
    "save_tensors",
]


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
