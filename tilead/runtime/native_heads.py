"""Native PaDiM heads of bf16 bundles: the C++ Mahalanobis kernel instead of the heads' ONNX graphs (#21).

A bf16 bundle (:mod:`tilead.exporter.bf16`) holds, next to each model's
``heads/<name>.onnx``, a ``heads/<name>.padim.npz`` (uncompressed ``np.savez``,
no pickles) with the same Gaussians:

* ``mean``: float32 ``(P, d)`` (``P = h * w`` map positions);
* ``packed``: float16 ``(P, d (d + 1) / 2)``, per position the upper triangle of the
  inverse covariance ``A`` row by row (row ``i``: ``A_ii``, then ``2 A_ij`` for ``j > i``;
  exact in fp16, since ``A`` is stored in fp16 and doubling is exact);
* ``blur``: float32 ``(2 r + 1,)`` Gaussian taps, empty without blur;
* ``size``: int64 ``(2,)``, the map's ``(h, w)``.

The manifest lists the files in ``native_heads`` (one per model, with sha256 and
bytes; :func:`tilead.runtime.bundle.parse_native_heads`). :class:`NativeHead` computes
what the head graph computes: the kernel's squared distances (``tilead._kernels.mahalanobis``:
AVX-512, AVX2+FMA+F16C or portable code, fp32 sums, float64 totals), clamped at 0, square root,
then the blur of :func:`tilead.trainer.maps.blur_map` (reflect padding, replicate when the
map is no larger than the radius; separable, here two small matrix products, :func:`blur_matrices`).

The kernel reads the Gaussians in a lane layout (:func:`to_lanes`): blocks of :data:`LANES` positions,
each triangle element of the block's positions side by side, so that one vector holds one element for
16 positions and the kernel needs neither horizontal sums nor masked row tails. :class:`LaneHead` is a
head converted once to that layout (:meth:`NativeHead.lanes`); the ``hybrid`` backend holds only it.
The file keeps the per-position layout. ``tilead._kernels.mahalanobis_rows`` is the previous kernel on
that layout, kept to measure against (``benchmarks/bench_head_layouts.py``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilead import _kernels
from tilead.atomic import atomic_write_bytes

NATIVE_SUFFIX = ".padim.npz"
KEYS = ("mean", "packed", "blur", "size")


def native_file(head_file: str) -> str:
    """``heads/<name>.padim.npz`` of a head graph's bundle-relative ``heads/<name>.onnx``."""
    stem = head_file[: -len(".onnx")] if head_file.endswith(".onnx") else head_file
    return stem + NATIVE_SUFFIX


def pack_upper(inv_cov: np.ndarray) -> np.ndarray:
    """Packed upper triangles with doubled off-diagonal of per-position matrices.

    Args:
        inv_cov: ``(P, d, d)`` (any float dtype; the symmetric part is what a quadratic form uses).

    Returns:
        float16 ``(P, d (d + 1) / 2)``: row ``i`` of ``S = (A + A^T) / 2`` from the diagonal on, the
        off-diagonal doubled (``A_ij + A_ji``), computed in float64 then rounded to fp16.

    Raises:
        ValueError: For another shape.
    """
    if inv_cov.ndim != 3 or inv_cov.shape[1] != inv_cov.shape[2]:
        raise ValueError(f"inv_cov: expected (P, d, d), got shape {inv_cov.shape}")
    d = int(inv_cov.shape[1])
    a = inv_cov.astype(np.float64)
    upper = a + a.transpose(0, 2, 1)
    diag = np.arange(d)
    upper[:, diag, diag] = a[:, diag, diag]
    rows, cols = np.triu_indices(d)
    return np.ascontiguousarray(upper[:, rows, cols].astype(np.float16))


LANES = 16
"""Positions per block of the kernel's lane layout (``kMahalanobisLanes`` in ``cpp_ext/src/cpu/mahalanobis.h``)."""


def to_lanes(rows: np.ndarray) -> np.ndarray:
    """Per-position rows in the kernel's lane layout: ``(P, k)`` to ``(ceil(P / LANES), k, LANES)``.

    Position ``p`` lands at ``[p // LANES, :, p % LANES]``; the last block's lanes past ``P`` are zeros.

    Args:
        rows: ``(P, k)``, any dtype (kept).

    Returns:
        C-contiguous ``(B, k, LANES)``, ``B = ceil(P / LANES)``.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows: expected (P, k), got shape {rows.shape}")
    p, k = rows.shape
    blocks = -(-p // LANES)
    padded = np.zeros((blocks * LANES, k), dtype=rows.dtype)
    padded[:p] = rows
    return np.ascontiguousarray(padded.reshape(blocks, LANES, k).transpose(0, 2, 1))


def from_lanes(lanes: np.ndarray, positions: int) -> np.ndarray:
    """The inverse of :func:`to_lanes`: ``(B, k, LANES)`` to C-contiguous ``(positions, k)``."""
    blocks, k, _ = lanes.shape
    return np.ascontiguousarray(lanes.transpose(0, 2, 1).reshape(blocks * LANES, k)[:positions])


def squared_distances(features: np.ndarray, mean: np.ndarray, packed: np.ndarray, path: str = "auto") -> np.ndarray:
    """The kernel: float32 ``(n, P)`` squared Mahalanobis distances (see ``tilead._kernels.mahalanobis``).

    Takes the file's per-position layout and converts it on every call (:func:`to_lanes`); a head that runs
    many times converts once (:class:`LaneHead`).

    Args:
        features: float32 ``(n, d, P)`` (made C-contiguous float32 here when it is not).
        mean: float32 ``(P, d)``.
        packed: float16 ``(P, d (d + 1) / 2)`` (:func:`pack_upper`).
        path: ``auto``, ``scalar``, ``avx2`` or ``avx512`` (:func:`tilead._kernels.mahalanobis_paths`).
    """
    return lane_distances(features, to_lanes(mean), to_lanes(packed), path)


def lane_distances(
    features: np.ndarray, mean_lanes: np.ndarray, packed_lanes: np.ndarray, path: str = "auto"
) -> np.ndarray:
    """:func:`squared_distances` on Gaussians already in the lane layout (:func:`to_lanes`).

    Args:
        features: float32 ``(n, d, P)`` (made C-contiguous float32 here when it is not).
        mean_lanes: float32 ``(ceil(P / LANES), d, LANES)``.
        packed_lanes: float16 ``(ceil(P / LANES), d (d + 1) / 2, LANES)``.
        path: As for :func:`squared_distances`.

    Returns:
        float32 ``(n, P)``.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"features: expected (n, d, P), got shape {x.shape}")
    out = np.empty((x.shape[0], x.shape[2]), dtype=np.float32)
    _kernels.mahalanobis(x, mean_lanes, packed_lanes, out, path)
    return out


def blur_matrix(size: int, kernel: np.ndarray, reflect: bool = True) -> np.ndarray:
    """The blur along one axis of ``size`` samples as a ``(size, size)`` matrix in ``kernel``'s dtype.

    Row ``y`` holds the taps ``kernel[t]`` at the source of padded sample ``y + t - r`` (``r = (len(kernel) - 1) /
    2``): reflect padding (NumPy's ``reflect``, the edge not repeated; needs ``size > r``), else replicate.
    """
    r = (len(kernel) - 1) // 2
    src = np.arange(-r, size + r)
    if reflect and size > 1:
        period = 2 * (size - 1)
        src = np.abs(src) % period
        src = np.where(src >= size, period - src, src)
    else:
        src = np.clip(src, 0, size - 1)
    matrix = np.zeros((size, size), dtype=kernel.dtype)
    for t, k in enumerate(kernel):
        np.add.at(matrix, (np.arange(size), src[t : t + size]), k)
    return matrix


def blur_maps(
    maps: np.ndarray, kernel: np.ndarray, matrices: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Separable Gaussian blur of ``(n, 1, h, w)`` maps, as :func:`tilead.trainer.maps.blur_map` does.

    Reflect padding by the radius ``r = (len(kernel) - 1) / 2``, replicate padding when ``min(h, w) <= r``
    (the trainer pads both axes alike, so the rule follows the smaller side). Computed in the maps' dtype
    (float32 at run time; float64 for the exporter's exact reference) as two matrix products, along each row
    then along each column (:func:`blur_matrix`): one BLAS call each instead of a NumPy pass per tap.

    Args:
        maps: ``(n, 1, h, w)``.
        kernel: ``(2 r + 1,)`` taps.
        matrices: ``(rows (h, h), columns (w, w))`` from :func:`blur_matrices` for these maps, to reuse them.
    """
    h, w = maps.shape[-2:]
    rows, cols = matrices if matrices is not None else blur_matrices((h, w), kernel.astype(maps.dtype))
    out: np.ndarray = np.matmul(rows, np.matmul(maps, cols.T))
    return out


def blur_matrices(size: tuple[int, int], kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (h, h), columns (w, w))`` blur matrices of ``(h, w)`` maps (:func:`blur_matrix`).

    The padding follows the smaller side, as the trainer's: reflect on both axes when ``min(h, w) > r``, else
    replicate on both.
    """
    h, w = size
    reflect = min(h, w) > (len(kernel) - 1) // 2
    return blur_matrix(h, kernel, reflect), blur_matrix(w, kernel, reflect)


@dataclass(frozen=True)
class NativeHead:
    """One model's Gaussians for the kernel (see the module docstring).

    Attributes:
        mean: float32 ``(P, d)``.
        packed: float16 ``(P, d (d + 1) / 2)``.
        blur: float32 ``(2 r + 1,)``, or ``(0,)``: no blur.
        size: The map's ``(h, w)``, ``h * w = P``.
    """

    mean: np.ndarray
    packed: np.ndarray
    blur: np.ndarray
    size: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.size
        if h < 1 or w < 1:
            raise ValueError(f"size: expected a positive (h, w), got {self.size}")
        if self.mean.dtype != np.float32 or self.mean.ndim != 2 or self.mean.shape[0] != h * w:
            raise ValueError(f"mean: expected float32 ({h * w}, d), got {self.mean.dtype} {self.mean.shape}")
        d = int(self.mean.shape[1])
        if d < 1:
            raise ValueError("mean: expected at least one feature, got d = 0")
        tri = d * (d + 1) // 2
        if self.packed.dtype != np.float16 or self.packed.shape != (h * w, tri):
            raise ValueError(
                f"packed: expected float16 ({h * w}, {tri}) (d = {d}), got {self.packed.dtype} {self.packed.shape}"
            )
        if self.blur.dtype != np.float32 or self.blur.ndim != 1 or (self.blur.size and self.blur.size % 2 == 0):
            raise ValueError(f"blur: expected float32 (2 r + 1,) taps or (0,), got {self.blur.dtype} {self.blur.shape}")
        for name in ("mean", "packed", "blur"):
            value = getattr(self, name)
            if not np.isfinite(value).all():
                raise ValueError(f"{name}: expected finite values, got NaN or infinity")
            object.__setattr__(self, name, np.ascontiguousarray(value))

    @property
    def channels(self) -> int:
        """``d``, the features per position."""
        return int(self.mean.shape[1])

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "native head") -> NativeHead:
        """Parse a ``.padim.npz`` (no pickles).

        Raises:
            ValueError: Naming ``where`` and what is wrong (not an npz, keys, dtypes, shapes, values).
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                keys = sorted(npz.files)
                if keys != sorted(KEYS):
                    raise ValueError(f"expected the arrays {list(KEYS)}, got {keys}")
                arrays = {k: np.asarray(npz[k]) for k in KEYS}
            size = arrays["size"]
            if size.shape != (2,) or size.dtype.kind not in "iu":
                raise ValueError(f"size: expected 2 integers (h, w), got {size.dtype} {size.shape}")
            return cls(arrays["mean"], arrays["packed"], arrays["blur"], (int(size[0]), int(size[1])))
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{where}: not a valid PaDiM head file ({err})") from None

    def to_bytes(self) -> bytes:
        """The ``.padim.npz`` bytes (uncompressed ``np.savez``)."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, packed=self.packed, blur=self.blur, size=np.asarray(self.size, dtype=np.int64))
        return buf.getvalue()

    def save(self, path: Path) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically (:func:`tilead.atomic.atomic_write_bytes`)."""
        atomic_write_bytes(path, self.to_bytes())

    def lanes(self) -> LaneHead:
        """This head in the kernel's lane layout (:class:`LaneHead`), what the ``hybrid`` backend runs."""
        return LaneHead(to_lanes(self.mean), to_lanes(self.packed), self.blur, self.size)

    def __call__(self, features: np.ndarray, path: str = "auto") -> np.ndarray:
        """The head's map, as its ONNX graph computes it (through :meth:`lanes`, converted on every call).

        Args:
            features: float32 ``(n, d, h, w)``.
            path: The kernel's code path (:func:`squared_distances`).

        Returns:
            float32 ``(n, 1, h, w)``.

        Raises:
            ValueError: For features of another shape.
        """
        return self.lanes()(features, path)


@dataclass(frozen=True)
class LaneHead:
    """A :class:`NativeHead` in the kernel's lane layout, converted once (:meth:`NativeHead.lanes`).

    The kernel reads each block of :data:`LANES` positions' triangles as vectors across the positions,
    so it needs no horizontal sum and no masked row tail (``cpp_ext/src/cpu/mahalanobis.cpp``). Holds
    only this layout: the same bytes as the file's, plus at most ``LANES - 1`` padded positions.

    Attributes:
        mean_lanes: float32 ``(B, d, LANES)``, ``B = ceil(h * w / LANES)``.
        packed_lanes: float16 ``(B, d (d + 1) / 2, LANES)``.
        blur: float32 ``(2 r + 1,)``, or ``(0,)``: no blur.
        size: The map's ``(h, w)``.
        blur_matrices: The blur's ``(rows, columns)`` matrices (:func:`blur_matrices`), None without blur.
    """

    mean_lanes: np.ndarray
    packed_lanes: np.ndarray
    blur: np.ndarray
    size: tuple[int, int]
    blur_matrices: tuple[np.ndarray, np.ndarray] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        h, w = self.size
        blocks = -(-h * w // LANES)
        shape = self.mean_lanes.shape
        if self.mean_lanes.dtype != np.float32 or len(shape) != 3 or (shape[0], shape[2]) != (blocks, LANES):
            raise ValueError(f"mean_lanes: expected float32 ({blocks}, d, {LANES}), got {self.mean_lanes.shape}")
        d = int(self.mean_lanes.shape[1])
        want = (blocks, d * (d + 1) // 2, LANES)
        if self.packed_lanes.dtype != np.float16 or self.packed_lanes.shape != want:
            raise ValueError(f"packed_lanes: expected float16 {want}, got {self.packed_lanes.shape}")
        # Built once: the blur is two small matrix products.
        object.__setattr__(self, "blur_matrices", blur_matrices(self.size, self.blur) if self.blur.size else None)

    @property
    def channels(self) -> int:
        """``d``, the features per position."""
        return int(self.mean_lanes.shape[1])

    def __call__(self, features: np.ndarray, path: str = "auto") -> np.ndarray:
        """The head's map, as its ONNX graph computes it.

        Args:
            features: float32 ``(n, d, h, w)``.
            path: The kernel's code path (:func:`squared_distances`).

        Returns:
            float32 ``(n, 1, h, w)``: the kernel's squared distances, clamped at 0, square root, blur.

        Raises:
            ValueError: For features of another shape.
        """
        h, w = self.size
        if features.ndim != 4 or features.shape[1:] != (self.channels, h, w):
            raise ValueError(f"features: expected (n, {self.channels}, {h}, {w}), got shape {tuple(features.shape)}")
        n = int(features.shape[0])
        sq = lane_distances(features.reshape(n, self.channels, h * w), self.mean_lanes, self.packed_lanes, path)
        np.maximum(sq, 0.0, out=sq)
        np.sqrt(sq, out=sq)
        maps = sq.reshape(n, 1, h, w)
        return blur_maps(maps, self.blur, self.blur_matrices) if self.blur_matrices is not None else maps
