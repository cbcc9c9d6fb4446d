"""Overlay pictures: moved to the torch-free :mod:`tilead.viz.overlays` (kept here as an alias)."""

from tilead.viz.overlays import overlay, pick_overlays

__all__ = ["overlay", "pick_overlays"]
