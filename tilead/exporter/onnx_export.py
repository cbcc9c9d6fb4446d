"""One location model to one ONNX file, checked.

Uses PyTorch's ``torch.export``-based ONNX exporter (``dynamo=True``, the
supported path since PyTorch 2.9; it needs ``onnxscript``) with a dynamic batch
dimension, then ``onnx.checker`` (full check, with shape inference) and a
numerical comparison of ONNX Runtime with the eager model on a random batch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tilead.runtime.bundle import INPUT_NAME, OUTPUT_NAME

DEFAULT_OPSET = 18
MAX_BATCH = 1024


def export_location(
    model: nn.Module, tile_shape: tuple[int, int, int], path: Path, *, opset: int = DEFAULT_OPSET
) -> None:
    """Export one location's model with a dynamic batch dimension.

    Args:
        model: Maps ``(n, C, th, tw)`` float32 tiles to ``(n, 1, h, w)`` float32.
        tile_shape: ``(C, th, tw)``.
        path: Target ``.onnx`` file (parameters embedded, no external data).
        opset: ONNX opset (>= 17).

    Raises:
        ValueError: For an opset below 17.
        RuntimeError: If the export fails.
    """
    if opset < 17:
        raise ValueError(f"opset: expected 17 or newer, got {opset}")
    model = model.eval()
    example = torch.zeros(2, *tile_shape, dtype=torch.float32)
    batch = torch.export.Dim("n", min=1, max=MAX_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
        )
    if program is None:  # pragma: no cover - dynamo export always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full shape inference; raises ``onnx.checker.ValidationError``."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def compare_with_eager(model: nn.Module, path: Path, tile_shape: tuple[int, int, int], *, seed: int = 0) -> float:
    """Max abs difference of ONNX Runtime (CPU) vs the eager model on a random batch of 2.

    Returns:
        The max abs difference relative to the eager output's range (0 = identical).
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *tile_shape)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    if got.shape != ref.shape:
        raise RuntimeError(f"{path}: ONNX output shape {got.shape} differs from the eager model's {ref.shape}")
    span = float(ref.max() - ref.min()) or 1.0
    return float(np.abs(got - ref).max()) / span
