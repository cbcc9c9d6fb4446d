"""The Predictor's backends: one protocol, one module per backend, and the registry that names them.

* :mod:`~tilead.runtime.backends.base`: the protocol (:class:`Backend`,
  :class:`InferenceBackend`, :class:`PipelineBackend`), :class:`BackendRequest`
  and the per-location loop the inference-only backends share.
* :mod:`~tilead.runtime.backends.onnxruntime`: ONNX Runtime sessions (CPU, or CUDA).
* :mod:`~tilead.runtime.backends.openvino`: OpenVINO on the CPU.
* :mod:`~tilead.runtime.backends.hybrid`: a bf16 bundle's backbone on OpenVINO in bfloat16,
  its heads on ONNX Runtime (CPU; what ``auto`` picks for a bf16 bundle).
* :mod:`~tilead.runtime.backends.tensorrt`: the native TensorRT pipeline on the
  extension's device pipeline (:mod:`~tilead.runtime.backends.tensorrt_modules`:
  importing TensorRT, its API, clear errors).

A backend module is imported only when a Predictor asks for it, so a missing
optional package (openvino, tensorrt) is an error for that backend alone. To add
a backend: write its module with a ``create(request) -> Backend`` factory and
add one :class:`BackendSpec` line to :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tilead.runtime._checks import describe
from tilead.runtime.backends.base import (
    Backend,
    BackendRequest,
    BranchOutputs,
    Capabilities,
    InferenceBackend,
    LocationOutputs,
    PipelineBackend,
)


@dataclass(frozen=True)
class BackendSpec:
    """One registry entry.

    Attributes:
        name: What ``Predictor(backend=...)`` takes.
        module: Module holding ``create(request: BackendRequest) -> Backend`` (imported on first use).
        devices: Devices it runs on (checked before the bundle is read).
        reads_onnx: It loads the bundle's ONNX models (the request carries their bytes);
            False for backends that run other files (TensorRT's engines).
        bf16_backbone: It can run a ``shared_backbone`` bundle's backbone in bfloat16
            (``Predictor(bf16_backbone=True)``; the backend checks the CPU).
    """

    name: str
    module: str
    devices: tuple[str, ...]
    reads_onnx: bool = True
    bf16_backbone: bool = False

    def create(self, request: BackendRequest) -> Backend:
        """Import the backend's module and build the backend."""
        backend: Backend = importlib.import_module(self.module).create(request)
        return backend


REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("onnxruntime", "tilead.runtime.backends.onnxruntime", ("cpu", "cuda")),
        BackendSpec("openvino", "tilead.runtime.backends.openvino", ("cpu",), bf16_backbone=True),
        BackendSpec("tensorrt", "tilead.runtime.backends.tensorrt", ("cuda",), reads_onnx=False),
        BackendSpec("hybrid", "tilead.runtime.backends.hybrid", ("cpu",), bf16_backbone=True),
    )
}
DEFAULT = "onnxruntime"
"""What ``backend="auto"`` selects (for a bf16 bundle on a CPU: :data:`BF16_DEFAULT`)."""
BF16_DEFAULT = "hybrid"
"""What ``backend="auto"`` selects for a bundle whose heads were refit on OpenVINO (``model.precision`` ``bf16`` or
``int8_bf16``: :attr:`tilead.runtime.bundle.Manifest.openvino_refit`)."""


def names() -> tuple[str, ...]:
    """``auto`` and every registered backend, as ``Predictor(backend=...)`` accepts them."""
    return ("auto", *REGISTRY)


def resolve(name: str, device: str) -> BackendSpec:
    """The registry entry for ``name`` (``auto``: :data:`DEFAULT`) on ``device``.

    Raises:
        ValueError: For an unknown name, or a device the backend does not run on.
    """
    if not isinstance(name, str) or (name != "auto" and name not in REGISTRY):
        raise ValueError(f"backend: expected one of {', '.join(repr(n) for n in names())}, got {describe(name)}")
    spec = REGISTRY[DEFAULT if name == "auto" else name]
    if device not in spec.devices:
        raise ValueError(
            f"backend={spec.name!r} runs on device={' or '.join(repr(d) for d in spec.devices)}, "
            f"got device={describe(device)}"
        )
    return spec


__all__ = [
    "DEFAULT",
    "REGISTRY",
    "Backend",
    "BackendRequest",
    "BackendSpec",
    "BranchOutputs",
    "Capabilities",
    "InferenceBackend",
    "LocationOutputs",
    "PipelineBackend",
    "names",
    "resolve",
]
