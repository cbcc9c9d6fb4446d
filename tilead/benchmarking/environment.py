"""Facts about the machine and the installation a benchmark ran on."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Distributions whose versions go into every report (None where not installed).
LIBRARIES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "opencv-python-headless",
    "tensorrt",
    "tensorrt-lean-cu13",
    "torch",
    "timm",
)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`LIBRARIES`, read from package metadata (nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mib() -> float | None:
    """This process's peak resident set size so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def gpu_memory_used_mib() -> float | None:
    """Device memory in use on GPU 0 in MiB, from NVML (``nvidia-ml-py``), else None.

    This counts every process on the device, so it is reported as the device's
    use during the run, not as tilead's alone.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return float(info.used) / 2**20
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def environment() -> dict[str, Any]:
    """Machine and installation facts for a benchmark report."""
    from tilead import __version__
    from tilead.runtime import cuda_status

    status = cuda_status()
    return {
        "tilead": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "libraries": library_versions(),
        "cuda_kernels_built": status.built,
        "cuda_devices": list(status.devices),
        "cuda_error": status.error or None,
    }


def cuda_free_memory_mib(index: int = 0) -> float | None:
    """Free device memory on CUDA device ``index`` in MiB (``cudaMemGetInfo`` through the extension), else None.

    None where the extension has no CUDA build or no usable device. Like NVML's figure it is device-wide:
    the difference between two readings is what this process (or another) allocated in between.
    """
    try:
        from tilead import _kernels

        free, _ = _kernels.cuda.memory_info(index)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return float(free) / 2**20


def process_memory_mib() -> dict[str, float]:
    """This process's ``VmRSS`` (resident now) and ``VmHWM`` (peak so far) in MiB, from ``/proc/self/status``.

    ``VmHWM`` is this process's own peak: unlike ``ru_maxrss`` it does not carry a parent's peak over ``exec``.

    Raises:
        RuntimeError: Where ``/proc/self/status`` lacks either line (not Linux).
    """
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024.0
    if len(out) != 2:
        raise RuntimeError("no VmRSS and VmHWM lines in /proc/self/status (Linux only)")
    return out
