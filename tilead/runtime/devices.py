"""Which kernel twin runs a call: the CPU twins or the host-staged CUDA twins."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from tilead import _kernels
from tilead.runtime._checks import describe

Device = Literal["cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class CudaStatus:
    """What the extension knows about CUDA on this machine.

    Attributes:
        built: The extension was compiled with the CUDA twins.
        architectures: Architectures compiled in (CMake syntax, comma-separated).
        device_count: CUDA devices the runtime can use (0 when none).
        error: The CUDA runtime's explanation when it found no usable device,
            e.g. ``cudaErrorInsufficientDriver`` (code 35) on a machine
            without a GPU driver; empty otherwise.
        devices: Names and compute capabilities of the visible devices.
    """

    built: bool
    architectures: str
    device_count: int
    error: str
    devices: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> bool:
        """True when CUDA kernels can run here."""
        return self.built and self.device_count > 0


def cuda_status() -> CudaStatus:
    """Query the extension and the CUDA runtime (never raises)."""
    built = bool(_kernels.cuda.is_built())
    count, error = _kernels.cuda.device_count()
    names = tuple(str(_kernels.cuda.device_name(i)) for i in range(count)) if built else ()
    return CudaStatus(built, str(_kernels.cuda.architectures()), int(count), str(error), names)


def kernel_family(device: str) -> Any:
    """Return the extension namespace whose kernels run on ``device``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``tilead._kernels`` (CPU twins) or ``tilead._kernels.cuda`` (CUDA twins).

    Raises:
        ValueError: For an unknown device name.
        RuntimeError: For ``"cuda"`` when the extension was built without
            CUDA or no CUDA device is usable; the message says why.
    """
    if device == "cpu":
        return _kernels
    if device == "cuda":
        status = cuda_status()
        if not status.built:
            raise RuntimeError(
                "device='cuda' needs the CUDA kernels, but tilead._kernels was built without CUDA "
                "(no nvcc at build time, or TILEAD_CUDA=OFF); reinstall with nvcc on PATH and TILEAD_CUDA=ON"
            )
        if status.device_count == 0:
            raise RuntimeError(
                f"device='cuda' but no CUDA device is usable on this machine: {status.error or 'none found'}"
            )
        return _kernels.cuda
    raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {describe(device)}")


def set_num_threads(n: int) -> None:
    """Set the number of threads the CPU kernels use (``n <= 0``: all CPUs this process may use)."""
    _kernels.set_num_threads(int(n))


def get_num_threads() -> int:
    """Number of threads the CPU kernels use (when called from this thread: see :func:`thread_budget`)."""
    return int(_kernels.get_num_threads())


@contextmanager
def thread_budget(n: int | None) -> Iterator[None]:
    """Run the CPU kernels called from this thread with at most ``n`` threads (None: no budget).

    The budget belongs to the calling thread only (concurrent callers keep theirs) and
    overrides :func:`set_num_threads` inside the block; the previous budget comes back after it.
    """
    if n is None:
        yield
        return
    before = int(_kernels.get_thread_budget())
    _kernels.set_thread_budget(max(1, int(n)))
    try:
        yield
    finally:
        _kernels.set_thread_budget(before)
