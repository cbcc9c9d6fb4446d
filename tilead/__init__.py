"""tilead: tiled-ensemble anomaly detection for high-resolution industrial inspection.

Embed the runtime with ``from tilead import runtime``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilead")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
