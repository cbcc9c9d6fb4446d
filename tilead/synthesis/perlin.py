"""Perlin (gradient) noise in NumPy.

Classic 2-D Perlin noise: random unit gradients on a lattice of ``res``
cells, dot products with the offsets of each pixel from the four corners of
its cell, blended with the quintic fade ``6t^5 - 15t^4 + 10t^3``. Values lie
in about ``[-0.7, 0.7]`` and are 0 on the lattice points.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fractal_noise", "perlin_noise"]


def _fade(t: np.ndarray) -> np.ndarray:
    out: np.ndarray = t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
    return out


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One octave of Perlin noise.

    Args:
        shape: Output ``(height, width)``, each at least 1.
        res: Lattice cells ``(rows, cols)`` over the output, each at least 1.
        rng: Source of the random gradients.

    Returns:
        float64 ``(height, width)``.

    Raises:
        ValueError: If a size is not positive.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if min(h, w) < 1 or min(ry, rx) < 1:
        raise ValueError(f"perlin_noise: expected positive shape and res, got shape {shape}, res {res}")
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h, dtype=np.float64) + 0.5) * (ry / h)
    x = (np.arange(w, dtype=np.float64) + 0.5) * (rx / w)
    y0 = np.minimum(np.floor(y).astype(np.int64), ry - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), rx - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    iy, ix = y0[:, None], x0[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        out: np.ndarray = gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)
        return out

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    result: np.ndarray = top * (1 - uy) + bottom * uy
    return result


def fractal_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator, octaves: int = 3
) -> np.ndarray:
    """Sum of ``octaves`` Perlin octaves, each of twice the lattice resolution and half the amplitude.

    Args:
        shape: Output ``(height, width)``.
        res: Lattice cells of the first octave.
        rng: Source of the random gradients.
        octaves: Number of octaves, at least 1.

    Returns:
        float64 ``(height, width)``.
    """
    if octaves < 1:
        raise ValueError(f"fractal_noise: expected at least 1 octave, got {octaves}")
    total = np.zeros((int(shape[0]), int(shape[1])), dtype=np.float64)
    amplitude = 1.0
    for k in range(octaves):
        total += amplitude * perlin_noise(shape, (res[0] * 2**k, res[1] * 2**k), rng)
        amplitude *= 0.5
    return total
