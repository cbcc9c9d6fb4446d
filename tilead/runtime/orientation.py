"""Tile orientations of a shared model (task assignment ``cluster`` with ``orient``; issue #20).

A model shared by several tile locations is fitted on their tiles brought into one
orientation: each location keeps one of the 8 symmetries of the square (flips and
90-degree rotations), applied to its tiles before the model; the model's map is
transformed back. Index ``t`` is ``4 * flip + quarter_turns``: the left-right mirror
first (``t >= 4``), then ``t % 4`` counter-clockwise quarter turns (``numpy.rot90``).
Non-square tiles allow only the transforms that keep the shape (:data:`SHAPE_KEEPING`).
"""

from __future__ import annotations

import numpy as np

COUNT = 8
"""Symmetries of the square: identity, 3 rotations, 4 mirrors."""
SHAPE_KEEPING = (0, 2, 4, 6)
"""Identity, half turn, left-right mirror, up-down mirror: the transforms of a non-square tile."""


def allowed(height: int, width: int) -> tuple[int, ...]:
    """The transforms of a ``height x width`` tile: all 8 when square, else :data:`SHAPE_KEEPING`."""
    return tuple(range(COUNT)) if height == width else SHAPE_KEEPING


def _check(x: np.ndarray, t: int) -> None:
    if not 0 <= t < COUNT:
        raise ValueError(f"orientation: expected a transform index in [0, {COUNT}), got {t}")
    if x.ndim < 2:
        raise ValueError(f"orientation: expected an array of at least 2 dimensions (..., h, w), got {x.shape}")
    if t % 2 and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"orientation: transform {t} (a quarter turn) needs square tiles, got {x.shape[-2:]}")


def apply(x: np.ndarray, t: int) -> np.ndarray:
    """Transform the last two axes.

    Args:
        x: ``(..., h, w)``.
        t: Transform index (see the module docstring).

    Returns:
        A view ``(..., h, w)`` (``(..., w, h)`` never occurs: quarter turns need ``h == w``).

    Raises:
        ValueError: For ``t`` outside ``[0, 8)`` or a quarter turn of a non-square array.
    """
    _check(x, t)
    y = np.flip(x, axis=-1) if t >= 4 else x
    return np.rot90(y, k=t % 4, axes=(-2, -1))


def invert(x: np.ndarray, t: int) -> np.ndarray:
    """Undo :func:`apply` on the last two axes (``invert(apply(x, t), t) == x``)."""
    _check(x, t)
    y = np.rot90(x, k=-(t % 4), axes=(-2, -1))
    return np.flip(y, axis=-1) if t >= 4 else y
