"""``tilead-info``: what this installation of tilead can do on this machine."""

from __future__ import annotations

import json
import platform

import click
import numpy as np

from tilead import __version__, _kernels
from tilead.runtime import cuda_status, get_num_threads
from tilead.runtime.cpu_features import int8_arithmetic

INT8_PATHS: dict[str | None, str] = {
    "dot_product": "8-bit dot product (VNNI/AMX)",
    "saturating": "AVX2, saturating 16-bit sums (8-bit-weight INT8 bundles must be exported on such a CPU)",
    None: "unknown",
}
"""``cpu_int8``: how this CPU computes INT8 convolutions (:func:`tilead.runtime.cpu_features.int8_arithmetic`)."""


def collect() -> dict[str, object]:
    """Versions, the extension's build, its CPU code paths (tiling, INT8 convolutions) and CUDA status."""
    status = cuda_status()
    return {
        "tilead": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_threads": get_num_threads(),
        "cpu_tile_path": _kernels.cpu_simd(),
        "cpu_int8": INT8_PATHS[int8_arithmetic()],
        "cuda_built": status.built,
        "cuda_architectures": status.architectures,
        "cuda_devices": list(status.devices),
        "cuda_error": status.error,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def main(as_json: bool) -> None:
    """Print tilead's version, kernel build and CUDA status on this machine."""
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        click.echo(f"{key:20s} {value if value != '' else '-'}")
    if info["cuda_built"] and not info["cuda_devices"]:
        click.echo("CUDA kernels are compiled in, but no CUDA device is usable here; the CPU kernels run.")
