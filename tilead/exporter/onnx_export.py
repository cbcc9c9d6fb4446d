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

from tilead.runtime.bundle import INPUT_NAME, OUTPUT_NAME, SCORE_NAME
from tilead.trainer.detectors.base import LocationModel

DEFAULT_OPSET = 18
MAX_BATCH = 1024


class MapAndScore(nn.Module):
    """A location model whose ``forward`` returns its map and its own image score (the graph with two outputs).

    Args:
        model: A :class:`LocationModel` that implements ``forward_with_score``.
    """

    def __init__(self, model: LocationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, C, th, tw)`` tiles to the map ``(n, 1, h, w)`` and the score ``(n,)``."""
        return self.model.forward_with_score(x)


def output_names(model: nn.Module) -> list[str]:
    """The graph outputs of ``model``: ``map``, plus ``score`` for a :class:`MapAndScore`."""
    return [OUTPUT_NAME, SCORE_NAME] if isinstance(model, MapAndScore) else [OUTPUT_NAME]


def export_location(
    model: nn.Module,
    tile_shape: tuple[int, int, int],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    input_name: str = INPUT_NAME,
    outputs: list[str] | None = None,
) -> None:
    """Export one location's model with a dynamic batch dimension.

    Args:
        model: Maps ``(n, C, th, tw)`` float32 tiles to ``(n, 1, h, w)`` float32
            (a :class:`MapAndScore` also to the score ``(n,)``, the second output).
        tile_shape: ``(C, th, tw)``.
        path: Target ``.onnx`` file (parameters embedded, no external data).
        opset: ONNX opset (>= 17).
        input_name: The graph input's name (a shared-backbone head reads ``features``).
        outputs: The graph outputs' names (default: :func:`output_names`).

    Raises:
        ValueError: For an opset below 17.
        RuntimeError: If the export fails.
    """
    if opset < 17:
        raise ValueError(f"opset: expected 17 or newer, got {opset}")
    names = outputs
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
            input_names=[input_name],
            output_names=output_names(model) if names is None else names,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
        )
    if program is None:  # pragma: no cover - dynamo export always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def export_like(template: Path, reference: nn.Module, model: nn.Module, path: Path) -> bool:
    """Write ``model``'s ONNX by swapping the weights in ``template``, the exported ONNX of ``reference``.

    Every location of a bundle has the same architecture: tracing it once and
    swapping the named weights is several times faster than exporting again.
    The swap is refused (returns False, nothing written) unless it is safe:
    both models have the same state keys; their non-persistent buffers (which
    the exporter folds into anonymous constants) are equal; every state tensor
    that differs from the reference is an initializer of the template under
    its own name, stored verbatim (not transformed by the exporter), with the
    same shape and dtype. The caller still checks the result numerically
    against the eager model.

    Args:
        template: ONNX file exported from ``reference``.
        reference: The model ``template`` was exported from.
        model: A model of the same architecture with other weights.
        path: Target ``.onnx`` file.

    Returns:
        True when written.
    """
    import onnx
    from onnx import numpy_helper

    state, ref_state = model.state_dict(), reference.state_dict()
    if state.keys() != ref_state.keys():
        return False
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        if name not in state and not (name in ref_buffers and torch.equal(buf, ref_buffers[name])):
            return False
    changed = {k for k, v in state.items() if not torch.equal(v, ref_state[k])}
    proto = onnx.load(str(template))
    swapped = set()
    for init in proto.graph.initializer:
        if init.name not in changed:
            continue  # the same tensor in both models: keep whatever the template holds
        # Swap only a tensor the template stores verbatim (the exporter may have transformed a
        # named weight, e.g. folded a batch norm into a convolution's weight).
        if not np.array_equal(numpy_helper.to_array(init), ref_state[init.name].detach().cpu().numpy()):
            return False
        new = numpy_helper.from_array(state[init.name].detach().cpu().contiguous().numpy(), init.name)
        if list(new.dims) != list(init.dims) or new.data_type != init.data_type:
            return False
        init.CopyFrom(new)
        swapped.add(init.name)
    if swapped != changed:
        return False  # a changed tensor was folded into something anonymous: only a fresh export is right
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return True


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full shape inference; raises ``onnx.checker.ValidationError``."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def compare_with_eager(model: nn.Module, path: Path, tile_shape: tuple[int, int, int], *, seed: int = 0) -> float:
    """Max abs difference of ONNX Runtime (CPU) vs the eager model on a random batch of 2.

    Args:
        model: The eager reference; a :class:`MapAndScore` compares the score output too.
        path: The exported ONNX file.
        tile_shape: ``(C, th, tw)``.
        seed: Seed of the random batch.

    Returns:
        The largest max abs difference of any output, relative to the map's
        eager range and to the score's eager magnitude (0 = identical).

    Raises:
        RuntimeError: If the ONNX outputs' shapes differ from the eager ones.
    """
    rng = np.random.default_rng(seed)
    return compare_outputs(model, path, rng.standard_normal((2, *tile_shape)).astype(np.float32))


def compare_outputs(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Max abs difference of ONNX Runtime (CPU) vs the eager model on the tiles ``x``.

    Args:
        model: The eager reference; a :class:`MapAndScore` compares the score output too.
        path: The exported ONNX file.
        x: float32 ``(n, C, th, tw)`` tiles.

    Returns:
        As :func:`compare_with_eager`.

    Raises:
        RuntimeError: If the ONNX outputs' shapes differ from the eager ones.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(x, dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(model)
    got = session.run(names, {INPUT_NAME: x})
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(x))
    refs = [t.numpy() for t in out] if isinstance(out, tuple) else [out.numpy()]
    worst = 0.0
    for name, g, ref in zip(names, got, refs, strict=True):
        if g.shape != ref.shape:
            raise RuntimeError(
                f"{path}: ONNX output {name!r} shape {g.shape} differs from the eager model's {ref.shape}"
            )
        # The map against its range; the score (two values) against its magnitude.
        span = float(ref.max() - ref.min()) if name == OUTPUT_NAME else float(np.abs(ref).max())
        span = span or 1.0
        worst = max(worst, float(np.abs(g - ref).max()) / span)
    return worst
