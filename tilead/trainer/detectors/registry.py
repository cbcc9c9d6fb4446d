"""What the two family registries share (config sections in :mod:`.sections`, detectors in :mod:`.base`).

Torch-free: config loading uses it without importing a detector.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

PACKAGE = "tilead.trainer.detectors"
"""The package whose sub-packages are the detector families."""

_T = TypeVar("_T", bound=type)


def add_family(registry: dict[str, _T], family: str, cls: _T, what: str) -> None:
    """Register ``cls`` for ``family`` (again is allowed for the same class, or a reloaded copy of it).

    Args:
        registry: Family name -> class.
        family: The family's name.
        cls: The class to register.
        what: How the error names the entry (``detector family``).

    Raises:
        ValueError: If another class already registered that family.
    """
    other = registry.get(family)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"{what} {family!r} is registered twice ({other.__name__}, {cls.__name__})")
    registry[family] = cls


def discover_families(module: str) -> None:
    """Import the ``module`` (``config``, ``detector``) of every family package; each registers itself."""
    package = importlib.import_module(PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{PACKAGE}.{info.name}.{module}")
