"""Per-location anomaly detectors behind one interface (see :mod:`tilead.trainer.detectors.base`).

Every non-private module of this package is imported on first use of the
registry and registers its :class:`~tilead.trainer.detectors.base.Detector`.
"""

from tilead.trainer.detectors.base import (
    Detector,
    LocationModel,
    LocationState,
    TileSource,
    create_detector,
    detector_class,
    families,
    load_state,
    register,
    save_state,
)

__all__ = [
    "Detector",
    "LocationModel",
    "LocationState",
    "TileSource",
    "create_detector",
    "detector_class",
    "families",
    "load_state",
    "register",
    "save_state",
]
