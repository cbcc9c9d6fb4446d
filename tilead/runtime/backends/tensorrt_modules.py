"""Importing the TensorRT runtime, the API the backend relies on, and clear errors where it or a GPU is missing.

The runtime side prefers the full ``tensorrt`` package when it is installed and
otherwise uses the lean runtime from PyPI (``pip install tensorrt-lean-cu13``,
module ``tensorrt_lean``), which can run the version-compatible engines
``tilead-export --trt`` builds. Building is the exporter's
(:mod:`tilead.exporter.engines`, with its own API lists).

:data:`RUNTIME_API` lists every class member and enum member the backend
touches; a test checks them against the installed lean module, so an API
change in a new TensorRT fails here, not on a factory GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tilead.runtime.bundle import BundleError, Manifest
from tilead.runtime.devices import cuda_status, kernel_family

INSTALL_RUNTIME = (
    "install the TensorRT runtime: pip install tensorrt-lean-cu13 (CUDA 13; tensorrt-lean-cu12 for CUDA 12), "
    "or the full tensorrt package; on Jetson it comes with JetPack (python3-libnvinfer)"
)
# (class, member) pairs the backend uses on a runtime module (full or lean).
RUNTIME_API: tuple[tuple[str, str], ...] = (
    ("Logger", "WARNING"),
    ("Runtime", "deserialize_cuda_engine"),
    ("Runtime", "engine_host_code_allowed"),
    ("ICudaEngine", "create_execution_context"),
    ("ICudaEngine", "num_io_tensors"),
    ("ICudaEngine", "get_tensor_name"),
    ("ICudaEngine", "get_tensor_mode"),
    ("ICudaEngine", "get_tensor_dtype"),
    ("ICudaEngine", "get_tensor_profile_shape"),
    ("ICudaEngine", "get_tensor_shape"),
    ("ICudaEngine", "num_optimization_profiles"),
    ("ICudaEngine", "device_memory_size_v2"),
    ("ExecutionContextAllocationStrategy", "USER_MANAGED"),
    ("IExecutionContext", "set_device_memory"),
    ("IExecutionContext", "set_input_shape"),
    ("IExecutionContext", "set_tensor_address"),
    ("IExecutionContext", "execute_async_v3"),
    ("TensorIOMode", "INPUT"),
    ("TensorIOMode", "OUTPUT"),
    ("DataType", "FLOAT"),
)


class TensorRTUnavailableError(RuntimeError):
    """TensorRT, its builder, or a usable GPU is missing; the message says what and how to get it."""


def major_version(module: ModuleType) -> int:
    """The major version of an imported TensorRT module."""
    return int(str(module.__version__).split(".")[0])


def missing_api(module: ModuleType, api: tuple[tuple[str, str], ...]) -> list[str]:
    """The ``Class.member`` names of ``api`` that ``module`` lacks."""
    missing = []
    for cls, member in api:
        owner = getattr(module, cls, None)
        if owner is None or not hasattr(owner, member):
            missing.append(f"{cls}.{member}")
    return missing


def import_runtime() -> ModuleType:
    """The TensorRT runtime module: ``tensorrt`` if installed, else ``tensorrt_lean``.

    Raises:
        TensorRTUnavailableError: If neither imports, or the module lacks an API the backend needs.
    """
    errors = []
    for name in ("tensorrt", "tensorrt_lean"):
        try:
            module = __import__(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
            continue
        missing = missing_api(module, RUNTIME_API)
        if missing:
            raise TensorRTUnavailableError(
                f"{name} {getattr(module, '__version__', '?')} lacks {', '.join(missing)}, which the TensorRT backend "
                "uses; tilead supports TensorRT 10 and 11"
            )
        return module
    raise TensorRTUnavailableError(f"backend='tensorrt' needs TensorRT ({'; '.join(errors)}): {INSTALL_RUNTIME}")


def require_gpu() -> tuple[str, str]:
    """Name and compute capability (``"major.minor"``) of CUDA device 0.

    Raises:
        TensorRTUnavailableError: Without the extension's CUDA build or a usable device, saying which.
    """
    try:
        kernel_family("cuda")  # raises saying why the CUDA kernels cannot run here
    except RuntimeError as err:
        raise TensorRTUnavailableError(f"TensorRT needs an NVIDIA GPU and tilead's CUDA kernels: {err}") from None
    status = cuda_status()
    return parse_device_name(status.devices[0])


def parse_device_name(text: str) -> tuple[str, str]:
    """``"NVIDIA H100 80GB HBM3 (sm_90)"`` to ``("NVIDIA H100 80GB HBM3", "9.0")``.

    Raises:
        ValueError: If the text has no ``(sm_XY)`` suffix.
    """
    name, sep, rest = text.rpartition(" (sm_")
    digits = rest.rstrip(")")
    if not sep or not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"device name {text!r}: expected 'NAME (sm_XY)'")
    return name, f"{digits[:-1]}.{digits[-1]}"


def require_per_location(bundle: Path, manifest: Manifest) -> None:
    """Refuse a bundle the native TensorRT path cannot run: a shared backbone, oriented tiles, a thumbnail too large.

    Shared models (``grid.assignment`` other than ``one_to_one``: one engine per model, each location's context
    made from its model's engine) and a thumbnail branch (one more engine, with the device pipeline's area resize
    and fusion) run.

    Raises:
        BundleError: For a ``shared_backbone`` layout (its engines would need a backbone stage before the heads),
            oriented locations (``cluster`` with ``orient``: the device tile and untile kernels do not flip or
            rotate a location's tiles and maps), or a thumbnail larger than the image on either side (the device
            pipeline resizes it by area only).
    """
    if manifest.layout != "per_location":
        raise BundleError(
            f"{bundle}: this bundle has the {manifest.layout!r} layout (one backbone graph, per-location heads), "
            "which the native TensorRT backend and engine builder do not handle; use backend='onnxruntime' or "
            "'openvino', or export the run with --layout per_location for TensorRT"
        )
    turned = [loc.name for i, loc in enumerate(manifest.locations) if manifest.transform(i)]
    if turned:
        raise BundleError(
            f"{bundle}: this bundle orients the tiles of {len(turned)} locations ({', '.join(turned[:4])}"
            f"{', ...' if len(turned) > 4 else ''}) before their shared model (grid.assignment cluster with orient), "
            "which the native TensorRT pipeline does not do (its tile and untile kernels neither flip nor rotate); "
            "use backend='onnxruntime' (its TensorRT execution provider on a GPU) or 'openvino', or train the "
            "clusters without orient"
        )
    branch = manifest.thumbnail
    height, width = manifest.grid.image_size
    if branch is not None and branch.size > min(height, width):
        raise BundleError(
            f"{bundle}: the thumbnail branch resizes the {height} x {width} image up to {branch.size} x "
            f"{branch.size}; the native TensorRT pipeline resizes on the device by area only (shrinking), so it "
            "needs thumbnail.size at most the image's smaller side; use backend='onnxruntime' or 'openvino' for "
            "this bundle"
        )
