"""Post-processing: per-location maps to one thresholded full-resolution map.

The stages, each a checked wrapper over one kernel (CPU twin or CUDA twin):

1. :func:`untile_maps` upsamples every location's map (bilinear,
   align_corners=False) to the tile size and blends overlaps (``uniform``
   average or ``feather`` ramps), optionally normalizing each location first
   (normalization stage ``tile``).
2. :func:`smooth_seams` replaces the pixels in a band around every interior
   tile edge with a Gaussian-blurred value (anomalib's rule: band half-width
   ``int(tile * width)``, kernel size ``2 * int(4 * sigma + 0.5) + 1``,
   reflect padding).
3. :meth:`TileGrid.canvas_to_image <tilead.runtime.geometry.TileGrid.canvas_to_image>`
   crops (``pad``) or resizes (``resize``) the canvas back to the image size.
4. :func:`normalize_maps` applies ``clamp((x - t) / (max - min) + 0.5, 0, 1)``,
   thresholds at 0.5 and reduces each image's score (max of the map).

The non-finite rule (issue #16): a NaN or infinite raw map value is a model
failure, never "normal". The kernels make such a pixel anomalous (normalized
value 1, mask set) and such an image anomalous: raw score NaN, image score
1.0 after min-max normalization (``+inf`` in raw mode), label True.

:func:`merge_maps` runs 1-3 in that order, as the trainer's validation and the
Predictor both do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tilead import _kernels
from tilead.runtime._checks import as_float, as_pair, check_array, check_mapping, check_shape, describe
from tilead.runtime.buffers import Allocate, fresh
from tilead.runtime.devices import kernel_family
from tilead.runtime.geometry import TileGrid
from tilead.runtime.timing import StageTimes, timed

BlendWeights = Literal["uniform", "feather"]
BLEND_CODES = {"uniform": _kernels.BLEND_UNIFORM, "feather": _kernels.BLEND_FEATHER}
MAX_SEAM_SIGMA = float(_kernels.MAX_SEAM_SIGMA)
"""Largest seam sigma (15.8: kernel radius ``int(4 * sigma + 0.5)`` within the CUDA twin's 64), defined once in
``cpp_ext/include/tilead/seam.h`` and read from the extension."""


@dataclass(frozen=True)
class SeamSmoothing:
    """Seam smoothing settings (anomalib-compatible).

    "Off" is written one way in every API: ``seam=None`` (plain data: ``null``,
    or a sigma or width of 0, which :func:`parse_seam` reads as None). Settings
    with a sigma or width of 0 smooth nothing (:attr:`enabled` is False);
    :class:`~tilead.runtime.postprocessor.PostProcessor` stores them as None.

    Attributes:
        sigma: Gaussian sigma in pixels, in ``[0, MAX_SEAM_SIGMA]`` (15.8).
        width: Band half-width as a fraction of the tile size, in ``[0, 1]``.
    """

    sigma: float = 2.0
    width: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", as_float(self.sigma, "seam.sigma", low=0.0, high=MAX_SEAM_SIGMA))
        object.__setattr__(self, "width", as_float(self.width, "seam.width", low=0.0, high=1.0))

    @property
    def enabled(self) -> bool:
        """Whether these settings smooth anything (sigma and width both above 0)."""
        return self.sigma > 0 and self.width > 0

    @property
    def native(self) -> _kernels.SeamSpec:
        """The kernels' form, ``tilead._kernels.SeamSpec`` (its constructor checks the same limits)."""
        return _kernels.SeamSpec(self.sigma, self.width)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return {"sigma": self.sigma, "width": self.width}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeamSmoothing:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: For unknown keys or invalid values.
        """
        return cls(**dict(check_mapping(data, "seam", ("sigma", "width"))))


def parse_seam(data: object, name: str = "seam") -> SeamSmoothing | None:
    """Seam settings from plain data (a config section or a manifest): the one parser of both.

    Args:
        data: ``None`` / ``null`` (off) or a mapping with optional ``sigma``
            (default 2.0) and ``width`` (default 0.1).
        name: What the data is called in error messages.

    Returns:
        The settings, or None (off) for ``None`` and for a sigma or width of 0.

    Raises:
        ValueError: For a non-mapping, unknown keys, or values outside ``[0, MAX_SEAM_SIGMA]`` / ``[0, 1]``.
    """
    if data is None:
        return None
    d = check_mapping(data, name, ("sigma", "width"))
    default = SeamSmoothing()
    sigma = as_float(d.get("sigma", default.sigma), f"{name}.sigma", low=0.0, high=MAX_SEAM_SIGMA)
    width = as_float(d.get("width", default.width), f"{name}.width", low=0.0, high=1.0)
    return SeamSmoothing(sigma, width) if sigma > 0 and width > 0 else None


def seam_to_dict(seam: SeamSmoothing | None) -> dict[str, Any] | None:
    """Plain-data form of optional settings: None (off) for None and for settings that smooth nothing."""
    return seam.to_dict() if seam is not None and seam.enabled else None


@dataclass(frozen=True)
class NormalizedMaps:
    """Result of :func:`normalize_maps`.

    Attributes:
        maps: ``(n, H, W)`` float32 normalized maps (raw maps when no range
            was given).
        masks: ``(n, H, W)`` bool, pixels above the threshold.
        raw_scores: ``(n,)`` float32, max of each raw map.
        scores: ``(n,)`` float32, image scores (normalized when an image range
            was given).
        labels: ``(n,)`` bool, image is anomalous.
        errors: Per image, what was wrong with the model output (e.g. the
            locations whose output held NaN or infinity), None where nothing
            was; None when not collected (then :meth:`error` describes
            non-finite raw scores generically).
    """

    maps: np.ndarray
    masks: np.ndarray
    raw_scores: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    errors: tuple[str | None, ...] | None = None

    @property
    def finite(self) -> np.ndarray:
        """Per image (bool ``(n,)``): the model output was finite everywhere (its raw score is not NaN)."""
        out: np.ndarray = np.isfinite(self.raw_scores)
        return out

    def error(self, index: int) -> str | None:
        """What was wrong with image ``index``'s model output, or None.

        Args:
            index: Image index in the batch.
        """
        if self.errors is not None and self.errors[index] is not None:
            return self.errors[index]
        if not np.isfinite(self.raw_scores[index]):
            return NONFINITE_OUTPUT
        return None


NONFINITE_OUTPUT = "non-finite model output (NaN or infinity) in the anomaly map"


def _maps_4d(maps: np.ndarray, grid: TileGrid) -> np.ndarray:
    check_array(maps, "maps", dtypes=[np.float32], ndims=[4, 5])
    if maps.ndim == 5:
        if maps.shape[2] != 1:
            raise ValueError(
                f"maps: a 5-D map batch must have 1 channel (locations, n, 1, h, w), got shape {maps.shape}"
            )
        maps = maps.reshape(maps.shape[0], maps.shape[1], maps.shape[3], maps.shape[4])
    if maps.shape[0] != grid.num_locations:
        raise ValueError(
            f"maps: expected {grid.num_locations} locations in dimension 0 (grid {grid.rows}x{grid.cols}), "
            f"got {maps.shape[0]}"
        )
    return maps


def tile_norm_arrays(
    tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None, grid: TileGrid
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-location ``(threshold, 1 / (max - min))`` float32 arrays of stage ``tile``, or ``(None, None)``.

    Raises:
        ValueError: Unless there is one finite value per location and max > min everywhere.
    """
    if tile_stats is None:
        return None, None
    if not isinstance(tile_stats, (tuple, list)) or len(tile_stats) != 3:
        raise ValueError(
            f"tile_stats: expected (thresholds, mins, maxs), one value per location each, got {describe(tile_stats)}"
        )
    t, lo, hi = (np.asarray(v, dtype=np.float64) for v in tile_stats)
    for name, arr in (("thresholds", t), ("mins", lo), ("maxs", hi)):
        if arr.shape != (grid.num_locations,):
            raise ValueError(
                f"tile_stats {name}: expected {grid.num_locations} values (one per location), got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"tile_stats {name}: expected finite values")
    if np.any(hi <= lo):
        bad = int(np.argmax(hi <= lo))
        raise ValueError(
            f"tile_stats: max must exceed min at every location; location {bad} has {lo[bad]} >= {hi[bad]}"
        )
    return t.astype(np.float32), (1.0 / (hi - lo)).astype(np.float32)


def untile_maps(
    maps: np.ndarray,
    grid: TileGrid,
    *,
    weights: BlendWeights = "uniform",
    tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    out: np.ndarray | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Blend per-location maps into canvas maps.

    Args:
        maps: float32 ``(locations, n, h, w)`` or ``(locations, n, 1, h, w)``
            at the model's output resolution (any ``h, w >= 1``).
        grid: The tile grid the maps were computed on.
        weights: ``"uniform"`` (plain average of overlapping tiles) or
            ``"feather"`` (linear cross-fade across each overlap).
        tile_stats: Per-location ``(thresholds, mins, maxs)`` to normalize
            each tile's upsampled values before blending (stage ``tile``).
        out: Optional float32 ``(n, canvas_h, canvas_w)`` buffer.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        float32 ``(n, canvas_h, canvas_w)``.

    Raises:
        ValueError: For invalid maps, weights, statistics or buffers.
    """
    maps4 = _maps_4d(maps, grid)
    if weights not in BLEND_CODES:
        raise ValueError(f"weights: expected 'uniform' or 'feather', got {describe(weights)}")
    loc_threshold, loc_scale = tile_norm_arrays(tile_stats, grid)
    shape = (maps4.shape[1], *grid.canvas_size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        check_array(out, "out", dtypes=[np.float32], ndims=[3], writable=True)
        check_shape(out, "out", shape, "(n, canvas_h, canvas_w)")
    kernel_family(device).untile_maps(maps4, grid.native, out, BLEND_CODES[weights], loc_threshold, loc_scale)
    return out


def smooth_seams(
    maps: np.ndarray,
    grid: TileGrid,
    seam: SeamSmoothing | None,
    *,
    inplace: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Gaussian-smooth the bands around interior tile edges.

    Args:
        maps: float32 ``(n, canvas_h, canvas_w)`` or ``(canvas_h, canvas_w)``.
        grid: The tile grid.
        seam: Smoothing settings; None is off (the maps come back unchanged), as everywhere.
        inplace: Modify ``maps`` instead of returning a smoothed copy.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        The smoothed maps (``maps`` itself when ``inplace``).

    Raises:
        ValueError: For invalid maps or settings.
    """
    if seam is not None and not isinstance(seam, SeamSmoothing):
        raise ValueError(f"seam: expected SeamSmoothing or None (off), got {describe(seam)}")
    check_array(maps, "maps", dtypes=[np.float32], ndims=[2, 3], writable=inplace)
    result = maps if inplace else maps.copy()
    batch = result[None] if result.ndim == 2 else result
    check_shape(batch[0], "maps[0]", grid.canvas_size, "(canvas_h, canvas_w)")
    if seam is not None and seam.enabled:
        kernel_family(device).smooth_seams(batch, grid.native, seam.native)
    return result


def resize_maps(maps: np.ndarray, size: int | tuple[int, int], *, device: str = "cpu") -> np.ndarray:
    """Bilinear resize (align_corners=False, as ``F.interpolate``) of float32 maps.

    Args:
        maps: float32 ``(n, h, w)``.
        size: Output ``(height, width)`` or one int.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        float32 ``(n, height, width)``.
    """
    check_array(maps, "maps", dtypes=[np.float32], ndims=[3])
    h, w = as_pair(size, "size")
    out = np.empty((maps.shape[0], h, w), dtype=np.float32)
    kernel_family(device).resize_maps(maps, out)
    return out


def merge_maps(
    maps: np.ndarray,
    grid: TileGrid,
    *,
    weights: BlendWeights = "uniform",
    seam: SeamSmoothing | None = None,
    tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    device: str = "cpu",
    timer: StageTimes | None = None,
    allocate: Allocate | None = None,
) -> np.ndarray:
    """Untile, smooth seams and return image-size maps.

    Args:
        maps: float32 ``(locations, n, h, w)`` or ``(locations, n, 1, h, w)``.
        grid: The tile grid.
        weights: ``"uniform"`` or ``"feather"``.
        seam: Seam smoothing; None is off.
        tile_stats: Per-location normalization (stage ``tile``), or None.
        device: ``"cpu"`` or ``"cuda"``.
        timer: Collects the time of stages ``untile``, ``seam`` and ``crop``.
        allocate: Where the canvas and image-size maps come from (default ``np.empty``; the
            Predictor's :meth:`~tilead.runtime.buffers.LeasePool.take` reuses them across calls).

    Returns:
        float32 ``(n, H, W)``.
    """
    alloc = fresh if allocate is None else allocate
    n = _maps_4d(maps, grid).shape[1]
    with timed(timer, "untile"):
        canvas = alloc((n, *grid.canvas_size), "float32")
        merged = untile_maps(maps, grid, weights=weights, tile_stats=tile_stats, device=device, out=canvas)
    if seam is not None and seam.enabled:
        with timed(timer, "seam"):
            smooth_seams(merged, grid, seam, inplace=True, device=device)
    with timed(timer, "crop"):
        if grid.canvas_size == grid.image_size:
            return grid.canvas_to_image(merged, device=device)
        return grid.canvas_to_image(merged, device=device, out=alloc((n, *grid.image_size), "float32"))


NormParams = _kernels.NormSpec
"""The normalization kernel's parameters (``tilead._kernels.NormSpec``)."""


def fused_postprocess_available(grid: TileGrid, device: str) -> bool:
    """Whether :func:`merge_normalize_maps` can run: on the CPU, for a grid whose canvas is the image."""
    return device == "cpu" and grid.canvas_size == grid.image_size


@dataclass(frozen=True, eq=False)
class FusedPass:
    """The fused post-processing pass's settings, checked and converted for the kernel once.

    :func:`merge_normalize_maps` builds one per call; a
    :class:`~tilead.runtime.postprocessor.PostProcessor` keeps one, so that a ``predict`` call goes from the
    models' maps to the kernel with no more Python than the outputs' allocation. That Python runs right
    after the heads, with its objects out of the caches: measured at batch 1 on bottle (a 2-core Zen 4),
    the checks and conversions before the kernel took 0.33 ms there against 0.07 ms back to back
    (docs/cpu_speed.md, "The post-processing pass's Python").

    Attributes:
        grid: The tile grid (canvas = image).
        params: Normalization parameters (:func:`norm_params`).
        weights: The blend weights' kernel code.
        loc_threshold: Per-location thresholds (stage ``tile``), or None.
        loc_scale: Per-location ``1 / (max - min)`` (stage ``tile``), or None.
        seam: The seam smoothing's kernel spec (``SeamSpec.off()`` when off).
    """

    grid: TileGrid
    params: NormParams
    weights: int
    loc_threshold: np.ndarray | None
    loc_scale: np.ndarray | None
    seam: Any

    @classmethod
    def build(
        cls,
        grid: TileGrid,
        params: NormParams,
        *,
        weights: BlendWeights = "uniform",
        seam: SeamSmoothing | None = None,
        tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    ) -> FusedPass:
        """Check the settings and convert them for the kernel.

        Raises:
            ValueError: For invalid weights or statistics, or a grid whose canvas is not the image.
        """
        if grid.canvas_size != grid.image_size:
            raise ValueError(
                f"grid: the fused post-processing needs a canvas equal to the image, got canvas {grid.canvas_size} "
                f"for image {grid.image_size}; use merge_maps and normalize_maps"
            )
        if weights not in BLEND_CODES:
            raise ValueError(f"weights: expected 'uniform' or 'feather', got {describe(weights)}")
        if seam is not None and not isinstance(seam, SeamSmoothing):
            raise ValueError(f"seam: expected SeamSmoothing or None (off), got {describe(seam)}")
        loc_threshold, loc_scale = tile_norm_arrays(tile_stats, grid)
        spec = _kernels.SeamSpec.off() if seam is None or not seam.enabled else seam.native
        return cls(grid, params, BLEND_CODES[weights], loc_threshold, loc_scale, spec)

    def run(self, maps: np.ndarray, allocate: Allocate | None = None) -> NormalizedMaps:
        """The pass on ``maps``: float32 ``(locations, n, h, w)`` or ``(locations, n, 1, h, w)``.

        Raises:
            ValueError: For maps of another dtype, rank or number of locations (the kernel checks the rest).
        """
        maps4 = _maps_4d(maps, self.grid)
        alloc = fresh if allocate is None else allocate
        n = maps4.shape[1]
        size = self.grid.image_size
        out = alloc((n, *size), "float32")
        masks = alloc((n, *size), "uint8")
        raw = np.empty(n, dtype=np.float32)
        scores = np.empty(n, dtype=np.float32)
        _kernels.postprocess_maps(
            maps4,
            self.grid.native,
            out,
            masks,
            raw,
            scores,
            self.weights,
            self.loc_threshold,
            self.loc_scale,
            self.seam,
            self.params,
        )
        return NormalizedMaps(out, masks.view(np.bool_), raw, scores, labels_of(scores, self.params))


def merge_normalize_maps(
    maps: np.ndarray,
    grid: TileGrid,
    params: NormParams,
    *,
    weights: BlendWeights = "uniform",
    seam: SeamSmoothing | None = None,
    tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    allocate: Allocate | None = None,
) -> NormalizedMaps:
    """Untile, smooth seams and normalize in one pass over the output (CPU, canvas = image).

    The same values as :func:`untile_maps`, :func:`smooth_seams` and :func:`normalize_maps` in turn
    (the fused kernel runs the same row code, ``tilead._kernels.postprocess_maps``), without the
    canvas: each output row is untiled into a small ring of rows, its seam pixels smoothed there and
    the row normalized and thresholded straight into the outputs, so the image-size maps are written
    once instead of being written, rewritten and read back. (:class:`FusedPass` with these settings.)

    Args:
        maps: float32 ``(locations, n, h, w)`` or ``(locations, n, 1, h, w)``.
        grid: The tile grid; its canvas must be the image (:func:`fused_postprocess_available`).
        params: Normalization parameters (:func:`norm_params`).
        weights: ``"uniform"`` or ``"feather"``.
        seam: Seam smoothing; None is off.
        tile_stats: Per-location normalization (stage ``tile``), or None.
        allocate: Where the maps and masks come from (default ``np.empty``).

    Returns:
        The normalized maps float32 ``(n, H, W)``, masks, raw and normalized scores, and labels.

    Raises:
        ValueError: For invalid maps, weights or statistics, or a grid whose canvas is not the image.
    """
    fused = FusedPass.build(grid, params, weights=weights, seam=seam, tile_stats=tile_stats)
    return fused.run(maps, allocate)


def norm_params(
    pixel_threshold: float,
    image_threshold: float,
    pixel_range: tuple[float, float] | None,
    image_range: tuple[float, float] | None,
) -> NormParams:
    """The normalization kernel's parameters, ``NormSpec(mode, pt, pmin, pmax, it, imin, imax)``.

    Raises:
        ValueError: For non-finite thresholds, one range without the other, or min >= max.
    """
    pt = as_float(pixel_threshold, "pixel_threshold")
    it = as_float(image_threshold, "image_threshold")
    if (pixel_range is None) != (image_range is None):
        raise ValueError("pixel_range and image_range: give both (min-max normalization) or neither (raw values)")
    if pixel_range is None or image_range is None:
        return _kernels.NormSpec(_kernels.NORM_NONE, pt, 0.0, 0.0, it, 0.0, 0.0)
    pmin, pmax = (as_float(v, "pixel_range") for v in pixel_range)
    imin, imax = (as_float(v, "image_range") for v in image_range)
    if not pmax > pmin:
        raise ValueError(f"pixel_range: expected min < max, got ({pmin}, {pmax})")
    if not imax > imin:
        raise ValueError(f"image_range: expected min < max, got ({imin}, {imax})")
    return _kernels.NormSpec(_kernels.NORM_MINMAX, pt, pmin, pmax, it, imin, imax)


def labels_of(scores: np.ndarray, params: NormParams) -> np.ndarray:
    """Image labels from normalized scores: above 0.5 after min-max normalization, else above the raw threshold."""
    out: np.ndarray = scores > (0.5 if params.mode == _kernels.NORM_MINMAX else params.image_threshold)
    return out


def normalize_maps(
    maps: np.ndarray,
    *,
    pixel_threshold: float,
    image_threshold: float,
    pixel_range: tuple[float, float] | None = None,
    image_range: tuple[float, float] | None = None,
    inplace: bool = False,
    device: str = "cpu",
    allocate: Allocate | None = None,
) -> NormalizedMaps:
    """Normalize, threshold and score maps.

    With ranges (min-max normalization, anomalib's formula):
    ``n = clamp((x - t) / (max - min) + 0.5, 0, 1)``; a pixel is anomalous
    when its normalized value exceeds 0.5, an image when its normalized score
    does. Without ranges the raw values are kept and compared with the
    thresholds directly. Non-finite values make the pixel and the image
    anomalous (module docstring: the non-finite rule).

    Args:
        maps: float32 ``(n, H, W)`` or ``(H, W)`` raw anomaly maps.
        pixel_threshold: Raw pixel threshold.
        image_threshold: Raw image-score threshold.
        pixel_range: ``(min, max)`` of raw map values, or None.
        image_range: ``(min, max)`` of raw image scores, or None. Give both
            ranges or neither.
        inplace: Write normalized values into ``maps``.
        device: ``"cpu"`` or ``"cuda"``.
        allocate: Where the output maps (unless ``inplace``) and masks come from (default ``np.empty``).

    Returns:
        The normalized maps, masks, raw and normalized scores, and labels.

    Raises:
        ValueError: For invalid maps, thresholds or ranges.
    """
    check_array(maps, "maps", dtypes=[np.float32], ndims=[2, 3], writable=inplace)
    batch = maps[None] if maps.ndim == 2 else maps
    params = norm_params(pixel_threshold, image_threshold, pixel_range, image_range)
    alloc = fresh if allocate is None else allocate
    out = batch if inplace else alloc(batch.shape, "float32")
    n = batch.shape[0]
    masks = alloc(batch.shape, "uint8")
    raw = np.empty(n, dtype=np.float32)
    scores = np.empty(n, dtype=np.float32)
    kernel_family(device).normalize_maps(batch, out, masks, raw, scores, params)
    labels = labels_of(scores, params)
    return NormalizedMaps(out, masks.view(np.bool_), raw, scores, labels)
