"""Importing TensorRT, the API tilead relies on, and clear errors where it or a GPU is missing.

The runtime side prefers the full ``tensorrt`` package when it is installed and
otherwise uses the lean runtime from PyPI (``pip install tensorrt-lean-cu13``,
module ``tensorrt_lean``), which can run the version-compatible engines
``tilead-export --trt`` builds. Building needs the full package's ``Builder``.

:data:`RUNTIME_API` and :data:`BUILDER_API` list every class member and enum
member the backend and the builder touch; a test checks them against the
installed lean module (which carries the enums but not the builder classes),
so an API change in a new TensorRT fails here, not on a factory GPU.
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
INSTALL_BUILDER = (
    "building engines needs the full TensorRT with its builder: pip install tensorrt-cu13 (or tensorrt-cu12) on "
    "the target machine, or JetPack's python3-libnvinfer on Jetson; the lean runtime cannot build"
)

# (class, member) pairs the backend uses on a runtime module (full or lean).
RUNTIME_API: tuple[tuple[str, str], ...] = (
    ("Logger", "WARNING"),
    ("Runtime", "deserialize_cuda_engine"),
    ("ICudaEngine", "create_execution_context"),
    ("ICudaEngine", "num_io_tensors"),
    ("ICudaEngine", "get_tensor_name"),
    ("ICudaEngine", "get_tensor_mode"),
    ("ICudaEngine", "get_tensor_dtype"),
    ("ICudaEngine", "get_tensor_profile_shape"),
    ("IExecutionContext", "set_input_shape"),
    ("IExecutionContext", "set_tensor_address"),
    ("IExecutionContext", "execute_async_v3"),
    ("TensorIOMode", "INPUT"),
    ("TensorIOMode", "OUTPUT"),
    ("DataType", "FLOAT"),
)

# Enum members the builder sets, per TensorRT major version. TensorRT 11 builds
# strongly typed networks only: BuilderFlag has no FP16 (precision comes from the
# ONNX's types), so FP16 means an FP16 ONNX.
BUILDER_ENUMS: dict[int, tuple[tuple[str, str], ...]] = {
    10: (
        ("BuilderFlag", "FP16"),
        ("BuilderFlag", "VERSION_COMPATIBLE"),
        ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"),
        ("MemoryPoolType", "WORKSPACE"),
    ),
    11: (
        ("BuilderFlag", "VERSION_COMPATIBLE"),
        ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"),
        ("MemoryPoolType", "WORKSPACE"),
    ),
}
# Builder classes and their members (only in the full package).
BUILDER_API: tuple[tuple[str, str], ...] = (
    ("Builder", "create_network"),
    ("Builder", "create_builder_config"),
    ("Builder", "create_optimization_profile"),
    ("Builder", "build_serialized_network"),
    ("OnnxParser", "parse"),
    ("IBuilderConfig", "set_flag"),
    ("IBuilderConfig", "set_memory_pool_limit"),
    ("IBuilderConfig", "add_optimization_profile"),
    ("IBuilderConfig", "create_timing_cache"),
    ("IBuilderConfig", "set_timing_cache"),
    ("IBuilderConfig", "get_timing_cache"),
    ("IOptimizationProfile", "set_shape"),
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


def import_builder() -> ModuleType:
    """The full ``tensorrt`` module with its builder.

    Raises:
        TensorRTUnavailableError: If it is not installed or is not TensorRT 10 or 11.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(f"--trt needs the TensorRT builder ({err}): {INSTALL_BUILDER}") from None
    major = major_version(trt)
    if major not in BUILDER_ENUMS:
        raise TensorRTUnavailableError(
            f"tensorrt {trt.__version__}: tilead builds engines with TensorRT 10 or 11, got major version {major}"
        )
    missing = missing_api(trt, BUILDER_API + BUILDER_ENUMS[major])
    if missing:
        raise TensorRTUnavailableError(f"tensorrt {trt.__version__} lacks {', '.join(missing)}, which the builder uses")
    module: ModuleType = trt
    return module


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


def require_map_only(bundle: Path, manifest: Manifest) -> None:
    """Refuse a bundle the native TensorRT path cannot run: one that deploys the detector's own image score.

    Raises:
        BundleError: For ``postprocess.image_score`` ``detector`` (graphs with a second output ``score``).
    """
    if manifest.image_score == "detector":
        raise BundleError(
            f"{bundle}: this bundle deploys the detector's own image score (postprocess.image_score 'detector', "
            "a second graph output), which the native TensorRT backend and engine builder do not handle yet; use "
            "backend='onnxruntime' (CPU, or device='cuda' with onnxruntime-gpu), or export the run with "
            "postprocess.image_score 'max'"
        )
