"""The deployed post-processing: its statistics, and one frozen object holding every setting.

:class:`PostProcessor` is the post-processing after the models, as one value:
the grid, the blending weights, the seam smoothing (None: off), the
normalization statistics and thresholds, and the image-score rule. It is built
once, from a bundle (:meth:`PostProcessor.from_manifest`) or from a trainer
config's ``postprocess`` section as plain data (:meth:`PostProcessor.from_config`,
torch-free), and the Predictor, the trainer's eager inference and validation,
and calibration all run it; it crosses into C++ as one
``tilead._kernels.PostSpec`` (:meth:`PostProcessor.native`, the TensorRT
backend's device pipeline).

:class:`NormalizationStats` is what validation produces and what a bundle
carries: the stage (``image``, ``tile`` or ``none``), thresholds and min/max
ranges. :func:`postprocess_maps` runs the deployed post-processing on
per-location maps (untile, seam smoothing, normalization, thresholding),
so the trainer's evaluation and the Predictor share one code path.

Stages (DESIGN.md):

* ``image``: min/max and thresholds of the *merged* validation maps and image
  scores; ``n = clamp((x - t) / (max - min) + 0.5, 0, 1)``.
* ``tile``: every location's upsampled map is normalized with that
  location's own (threshold, min, max) before blending, so merged maps are
  already in [0, 1] with the pixel threshold at 0.5; image scores are then
  normalized with the image range and threshold of those merged maps.
* ``none``: raw values, compared with raw thresholds.

The image score is the max of the final map, or (bundle ``image_score``
``detector``) the detector's own per-tile score, max over the image's tiles
(:func:`image_scores_of_tiles`), normalized with the same formula and the
image range / threshold validation measured for that score
(:func:`score_images`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal, Protocol

import numpy as np

from tilead import _kernels
from tilead.runtime._checks import as_float, check_array, check_mapping, describe
from tilead.runtime.buffers import Allocate
from tilead.runtime.geometry import TileGrid
from tilead.runtime.postprocess import (
    BLEND_CODES,
    BlendWeights,
    FusedPass,
    NormalizedMaps,
    NormParams,
    SeamSmoothing,
    fused_postprocess_available,
    merge_maps,
    norm_params,
    normalize_maps,
    parse_seam,
    seam_to_dict,
    tile_norm_arrays,
)
from tilead.runtime.timing import StageTimes, timed

NormalizationStage = Literal["image", "tile", "none"]
STAGES: tuple[NormalizationStage, ...] = ("image", "tile", "none")
_KEYS = ("stage", "pixel_threshold", "image_threshold", "pixel_range", "image_range", "tile_stats")


RAW_LIMIT = 1e12
"""Largest magnitude of a raw threshold or range end (every detector here scores far below 1e6)."""
RELATIVE_WIDTH = 2.0**-20
"""A range narrower than this fraction of its magnitude is lost to float32 rounding (about 8 ulps)."""
MIN_WIDTH = 1e-9
"""Smallest accepted range width, whatever its magnitude."""


def _raw(value: object, name: str) -> float:
    """A finite raw score within :data:`RAW_LIMIT` (so float32 too)."""
    return as_float(value, name, low=-RAW_LIMIT, high=RAW_LIMIT)


def check_range(lo: float, hi: float, name: str) -> tuple[float, float]:
    """Validate a normalization range ``[lo, hi]`` as the float32 kernel will use it.

    Both ends are finite numbers within :data:`RAW_LIMIT`; the width is at
    least :data:`MIN_WIDTH` and :data:`RELATIVE_WIDTH` of the larger magnitude
    (a narrower range rounds to nothing in float32 or saturates every score).

    Raises:
        ValueError: Naming ``name`` and what was wrong.
    """
    lo, hi = _raw(lo, f"{name}[0]"), _raw(hi, f"{name}[1]")
    need = max(MIN_WIDTH, RELATIVE_WIDTH * max(abs(lo), abs(hi)))
    if not hi - lo >= need:
        raise ValueError(f"{name}: expected min < max with max - min >= {need:.3g}, got [{lo!r}, {hi!r}]")
    return lo, hi


def check_threshold_in_range(t: float, lo: float, hi: float, name: str) -> None:
    """Raise ValueError unless threshold ``t`` lies in ``[lo, hi]`` (up to a float32 rounding tolerance).

    A threshold outside its normalization range switches detection off (every
    score on one side of 0.5) or on; F1-adaptive thresholds may sit one float32
    step below the smallest score, hence the tolerance of ``1e-3`` of the width
    plus :data:`RELATIVE_WIDTH` of the magnitude.
    """
    tol = 1e-3 * (hi - lo) + RELATIVE_WIDTH * max(abs(lo), abs(hi))
    if not lo - tol <= t <= hi + tol:
        raise ValueError(f"{name}: the threshold {t!r} lies outside its normalization range [{lo!r}, {hi!r}]")


def _range(value: object, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name}: expected [min, max], got {describe(value)}")
    return check_range(value[0], value[1], name)


@dataclass(frozen=True)
class TileStats:
    """Per-location normalization (stage ``tile``), one value per location.

    Attributes:
        thresholds: Raw pixel threshold of each location.
        mins: Minimum raw map value of each location.
        maxs: Maximum raw map value of each location.
    """

    thresholds: tuple[float, ...]
    mins: tuple[float, ...]
    maxs: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.thresholds)
        if n == 0 or len(self.mins) != n or len(self.maxs) != n:
            raise ValueError(
                "tile_stats: expected equally long, non-empty thresholds, mins and maxs, got lengths "
                f"{len(self.thresholds)}, {len(self.mins)}, {len(self.maxs)}"
            )
        for i, (t, lo, hi) in enumerate(zip(self.thresholds, self.mins, self.maxs, strict=True)):
            check_range(lo, hi, f"tile_stats: location {i} has min, max")
            check_threshold_in_range(_raw(t, f"tile_stats.thresholds[{i}]"), lo, hi, f"tile_stats.thresholds[{i}]")

    def as_tuple(self) -> tuple[Sequence[float], Sequence[float], Sequence[float]]:
        """``(thresholds, mins, maxs)`` as :func:`untile_maps` takes them."""
        return self.thresholds, self.mins, self.maxs

    def to_dict(self) -> dict[str, list[float]]:
        """Plain-data form."""
        return {"thresholds": list(self.thresholds), "mins": list(self.mins), "maxs": list(self.maxs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TileStats:
        """Inverse of :meth:`to_dict`."""
        d = check_mapping(data, "tile_stats", ("thresholds", "mins", "maxs"), ("thresholds", "mins", "maxs"))
        for k in ("thresholds", "mins", "maxs"):
            if not isinstance(d[k], list):
                raise ValueError(f"tile_stats.{k}: expected a list of numbers, got {describe(d[k])}")
        return cls(*(tuple(_raw(v, f"tile_stats.{k}") for v in d[k]) for k in ("thresholds", "mins", "maxs")))


@dataclass(frozen=True)
class NormalizationStats:
    """Thresholds and ranges from validation.

    Attributes:
        stage: ``image``, ``tile`` or ``none``.
        pixel_threshold: Pixel threshold on the merged map (raw for ``image``
            and ``none``; 0.5 for ``tile``, whose merged maps are normalized).
        image_threshold: Image-score threshold, raw.
        pixel_range: ``(min, max)`` of merged maps (``image``; ``(0, 1)`` for
            ``tile``; None for ``none``).
        image_range: ``(min, max)`` of image scores (None for ``none``).
        tile_stats: Per-location statistics (``tile`` only).
    """

    stage: NormalizationStage
    pixel_threshold: float
    image_threshold: float
    pixel_range: tuple[float, float] | None = None
    image_range: tuple[float, float] | None = None
    tile_stats: TileStats | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or self.stage not in STAGES:
            raise ValueError(f"normalization stage: expected one of {', '.join(STAGES)}, got {describe(self.stage)}")
        pt = _raw(self.pixel_threshold, "pixel_threshold")
        it = _raw(self.image_threshold, "image_threshold")
        if self.stage == "none":
            if self.pixel_range is not None or self.image_range is not None:
                raise ValueError("normalization stage 'none' takes no pixel_range / image_range")
        elif self.pixel_range is None or self.image_range is None:
            raise ValueError(f"normalization stage {self.stage!r} needs pixel_range and image_range")
        else:
            for t, rng, name in ((pt, self.pixel_range, "pixel"), (it, self.image_range, "image")):
                lo, hi = check_range(rng[0], rng[1], f"{name}_range")
                check_threshold_in_range(t, lo, hi, f"{name}_threshold")
        if (self.stage == "tile") != (self.tile_stats is not None):
            raise ValueError("tile_stats: required for stage 'tile' and only for it")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (as stored in run folders and manifests)."""
        return {
            "stage": self.stage,
            "pixel_threshold": self.pixel_threshold,
            "image_threshold": self.image_threshold,
            "pixel_range": None if self.pixel_range is None else list(self.pixel_range),
            "image_range": None if self.image_range is None else list(self.image_range),
            "tile_stats": None if self.tile_stats is None else self.tile_stats.to_dict(),
        }

    @property
    def native(self) -> NormParams:
        """The normalization kernel's parameters (:func:`~tilead.runtime.postprocess.norm_params` of these)."""
        return norm_params(self.pixel_threshold, self.image_threshold, self.pixel_range, self.image_range)

    @property
    def tile_tuple(self) -> tuple[Sequence[float], Sequence[float], Sequence[float]] | None:
        """The per-location statistics as the kernels' wrappers take them, or None (stages ``image``, ``none``)."""
        return None if self.tile_stats is None else self.tile_stats.as_tuple()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormalizationStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: For unknown or missing keys and invalid values.
        """
        d = check_mapping(data, "normalization", _KEYS, ("stage", "pixel_threshold", "image_threshold"))
        tile = d.get("tile_stats")
        return cls(
            stage=d["stage"],
            pixel_threshold=_raw(d["pixel_threshold"], "pixel_threshold"),
            image_threshold=_raw(d["image_threshold"], "image_threshold"),
            pixel_range=_range(d.get("pixel_range"), "pixel_range"),
            image_range=_range(d.get("image_range"), "image_range"),
            tile_stats=None if tile is None else TileStats.from_dict(tile),
        )


def image_scores_of_tiles(tile_scores: np.ndarray) -> np.ndarray:
    """Image scores from a detector's per-tile scores: the max over an image's tiles.

    Args:
        tile_scores: float32 ``(locations, n)``.

    Returns:
        float32 ``(n,)``.

    Raises:
        ValueError: For another dtype or shape, or an empty array.
    """
    check_array(tile_scores, "tile_scores", dtypes=[np.float32], ndims=[2], contiguous=False)
    out: np.ndarray = tile_scores.max(axis=0)
    return out


def score_images(result: NormalizedMaps, raw_scores: np.ndarray, stats: NormalizationStats) -> NormalizedMaps:
    """Replace the map-max image scores of ``result`` with other raw image scores, normalized and thresholded.

    The scores go through the same normalization kernel as the maps' scores,
    with ``stats``' image range and threshold (which validation measured on
    these scores), so ``score`` and ``label`` mean what they mean for the map
    max.

    Args:
        result: Normalized maps of ``n`` images.
        raw_scores: float32 ``(n,)`` raw image scores (e.g. :func:`image_scores_of_tiles`).
        stats: Validation statistics.

    Returns:
        ``result`` with ``raw_scores``, ``scores`` and ``labels`` replaced.

    Raises:
        ValueError: If ``raw_scores`` is not float32 ``(n,)``.
    """
    check_array(raw_scores, "raw_scores", dtypes=[np.float32], ndims=[1], contiguous=False)
    if raw_scores.shape[0] != result.scores.shape[0]:
        raise ValueError(f"raw_scores: expected {result.scores.shape[0]} scores, got {raw_scores.shape[0]}")
    # A map with non-finite values keeps its image anomalous, whatever the other score says.
    chosen = np.where(result.finite, raw_scores, np.float32(np.nan)).astype(np.float32)
    scored = normalize_with_stats(chosen.reshape(-1, 1, 1), stats)
    return replace(result, raw_scores=scored.raw_scores, scores=scored.scores, labels=scored.labels)


def nonfinite_errors(maps: np.ndarray, grid: TileGrid, tile_scores: np.ndarray | None = None) -> tuple[str | None, ...]:
    """Per image, the locations whose model output holds NaN or infinity (None where all is finite).

    Args:
        maps: float32 ``(locations, n, h, w)`` raw per-location maps.
        grid: The tile grid (for the location names).
        tile_scores: float32 ``(locations, n)`` per-tile detector scores, or None.

    Returns:
        One entry per image, e.g. ``"non-finite model output (NaN or infinity) at location r1c1 (map)"``.
    """
    bad_maps = ~np.isfinite(maps).reshape(maps.shape[0], maps.shape[1], -1).all(axis=2)
    bad_scores = ~np.isfinite(tile_scores) if tile_scores is not None else np.zeros_like(bad_maps)
    names = grid.location_names()
    errors: list[str | None] = []
    for i in range(maps.shape[1]):
        where = []
        for loc in range(maps.shape[0]):
            outputs = [k for k, b in (("map", bad_maps[loc, i]), ("score", bad_scores[loc, i])) if b]
            if outputs:
                where.append(f"{names[loc]} ({' and '.join(outputs)})")
        errors.append(
            f"non-finite model output (NaN or infinity) at location{'s' if len(where) > 1 else ''} {', '.join(where)}"
            if where
            else None
        )
    return tuple(errors)


def _mark_nonfinite(result: NormalizedMaps, bad: np.ndarray, stats: NormalizationStats) -> NormalizedMaps:
    """Force images ``bad`` to the non-finite rule's result (raw NaN, most anomalous score, label True)."""
    raw = result.raw_scores.copy()
    scores = result.scores.copy()
    labels = result.labels.copy()
    raw[bad] = np.nan
    scores[bad] = np.inf if stats.stage == "none" else 1.0
    labels[bad] = True
    return replace(result, raw_scores=raw, scores=scores, labels=labels)


def postprocess_maps(
    maps: np.ndarray,
    grid: TileGrid,
    stats: NormalizationStats,
    *,
    weights: BlendWeights = "uniform",
    seam: SeamSmoothing | None = None,
    device: str = "cpu",
    timer: StageTimes | None = None,
    tile_scores: np.ndarray | None = None,
    inplace: bool = False,
    fuse: Callable[[np.ndarray], np.ndarray] | None = None,
    allocate: Allocate | None = None,
    fused: FusedPass | None = None,
) -> tuple[np.ndarray, NormalizedMaps]:
    """Merge per-location maps and normalize them: the deployed post-processing.

    Args:
        maps: float32 ``(locations, n, h, w)`` raw per-location maps.
        grid: The tile grid.
        stats: Validation statistics.
        weights: Blending of overlaps.
        seam: Seam smoothing, or None.
        device: ``"cpu"`` or ``"cuda"``.
        timer: Collects stage times (``untile``, ``seam``, ``crop``, ``normalize``; with ``inplace`` on the CPU
            for a grid whose canvas is the image, ``untile`` is the fused pass of untile, seams and
            normalization, :func:`~tilead.runtime.postprocess.merge_normalize_maps`, and ``normalize``
            the image scores' bookkeeping after it).
        tile_scores: float32 ``(locations, n)``: the detector's own per-tile
            scores, which then give the image scores (:func:`image_scores_of_tiles`)
            instead of the map max; None for the map max.
        inplace: Normalize into the merged maps (no second image-size buffer;
            ``merged`` is then the normalized maps too): for callers that only keep ``result``.
        fuse: Called on the merged maps float32 ``(n, H, W)`` before normalization; returns the
            maps to normalize instead (the thumbnail branch's fusion,
            :meth:`tilead.runtime.thumbnail.ThumbnailBranch.fuse`; ``merged`` is then the fused maps).
        allocate: Where the image-size arrays (canvas, maps, masks) come from: ``np.empty`` by default,
            the Predictor's :meth:`~tilead.runtime.buffers.LeasePool.take` to reuse them across calls.
        fused: The fused pass built once for these very settings (:attr:`PostProcessor.fused_pass`), used
            where the fused pass runs; None: built here.

    Returns:
        ``(merged, result)``: the merged maps before normalization (float32
        ``(n, H, W)``; already tile-normalized for stage ``tile``) and the
        normalized maps, masks, scores and labels. An image any of whose
        locations output NaN or infinity (map or score) follows the
        non-finite rule (:mod:`tilead.runtime.postprocess`): anomalous, raw
        score NaN, and ``result.errors`` names the locations; the pixels of
        such a location's tile are NaN in ``merged`` and anomalous in the masks.
    """
    errors: tuple[str | None, ...] | None = None
    finite_maps = bool(np.isfinite(maps).all())
    if not finite_maps or (tile_scores is not None and not np.isfinite(tile_scores).all()):
        errors = nonfinite_errors(maps, grid, tile_scores)
        if not finite_maps:
            # Every non-finite value as NaN, which survives blending and per-tile normalization
            # (clamp would turn an infinity into a plausible 0 or 1).
            maps = np.where(np.isfinite(maps), maps, np.float32(np.nan)).astype(np.float32)
    tile_stats = stats.tile_tuple
    if inplace and fuse is None and fused_postprocess_available(grid, device):
        # One pass: untile, seams and normalization (stage "untile"), the same values as the stages in turn.
        with timed(timer, "untile"):
            if fused is None:
                fused = FusedPass.build(grid, stats.native, weights=weights, seam=seam, tile_stats=tile_stats)
            result = fused.run(maps, allocate)
        merged = result.maps
    else:
        merged = merge_maps(
            maps, grid, weights=weights, seam=seam, tile_stats=tile_stats, device=device, timer=timer, allocate=allocate
        )
        if fuse is not None:
            with timed(timer, "fuse"):
                merged = fuse(merged)
        with timed(timer, "normalize"):
            result = normalize_with_stats(merged, stats, device=device, inplace=inplace, allocate=allocate)
    with timed(timer, "normalize"):
        if tile_scores is not None:
            result = score_images(result, image_scores_of_tiles(tile_scores), stats)
        if errors is not None:
            bad = np.array([e is not None for e in errors], dtype=bool)
            result = replace(_mark_nonfinite(result, bad, stats), errors=errors)
        return merged, result


def normalize_with_stats(
    merged: np.ndarray,
    stats: NormalizationStats,
    *,
    device: str = "cpu",
    inplace: bool = False,
    allocate: Allocate | None = None,
) -> NormalizedMaps:
    """Normalize and threshold merged maps with validation statistics.

    Args:
        merged: float32 ``(n, H, W)`` merged maps (tile-normalized for stage ``tile``).
        stats: Validation statistics.
        device: ``"cpu"`` or ``"cuda"``.
        inplace: Write the normalized values into ``merged``.
        allocate: Where the output maps and masks come from (default ``np.empty``).

    Returns:
        Normalized maps, masks, scores and labels.
    """
    return normalize_maps(
        merged,
        pixel_threshold=stats.pixel_threshold,
        image_threshold=stats.image_threshold,
        pixel_range=stats.pixel_range,
        image_range=stats.image_range,
        inplace=inplace,
        device=device,
        allocate=allocate,
    )


ImageScore = Literal["max", "detector"]
IMAGE_SCORES: tuple[ImageScore, ...] = ("max", "detector")
"""Image-score rules: the max of the final map, or the detector's own per-tile score (max over the image's tiles)."""
CONFIG_KEYS = ("weights", "seam", "normalization", "image_score")
"""Keys of the trainer config's ``postprocess`` section (:meth:`PostProcessor.from_config`)."""
DEFAULT_SEAM = SeamSmoothing()
"""Seam smoothing when a config section does not say (sigma 2, width 0.1, as anomalib)."""


class DeployedSettings(Protocol):
    """What :meth:`PostProcessor.from_manifest` reads from a verified manifest (``bundle.Manifest``).

    A structural type, so that this module does not import the bundle module (which imports this one).
    """

    @property
    def grid(self) -> TileGrid: ...  # noqa: D102
    @property
    def weights(self) -> BlendWeights: ...  # noqa: D102
    @property
    def seam(self) -> SeamSmoothing | None: ...  # noqa: D102
    @property
    def stats(self) -> NormalizationStats: ...  # noqa: D102
    @property
    def image_score(self) -> str: ...  # noqa: D102


@dataclass(frozen=True)
class PostProcessor:
    """Every post-processing setting after the models, built once: what validation measured is what runs.

    Attributes:
        grid: The tile grid.
        weights: Blending of overlaps, ``uniform`` or ``feather``.
        seam: Seam smoothing, or None: off (settings that smooth nothing, a
            sigma or width of 0, are stored as None, so None is the one "off").
        stats: Normalization statistics and thresholds; None before validation
            has measured them (then only :meth:`merge` runs).
        image_score: ``max`` (of the final map) or ``detector`` (the
            detector's per-tile scores, given to :meth:`apply`).

    Raises:
        ValueError: For a value of the wrong type or out of range, or per-location
            statistics (stage ``tile``) for another number of locations than the grid's.
    """

    grid: TileGrid
    weights: BlendWeights = "uniform"
    seam: SeamSmoothing | None = None
    stats: NormalizationStats | None = None
    image_score: ImageScore = "max"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, TileGrid):
            raise ValueError(f"grid: expected a TileGrid, got {describe(self.grid)}")
        if not isinstance(self.weights, str) or self.weights not in BLEND_CODES:
            raise ValueError(f"weights: expected 'uniform' or 'feather', got {describe(self.weights)}")
        if self.seam is not None and not isinstance(self.seam, SeamSmoothing):
            raise ValueError(f"seam: expected SeamSmoothing or None (off), got {describe(self.seam)}")
        if self.seam is not None and not self.seam.enabled:
            object.__setattr__(self, "seam", None)
        if self.stats is not None:
            if not isinstance(self.stats, NormalizationStats):
                raise ValueError(f"stats: expected NormalizationStats or None, got {describe(self.stats)}")
            tile = self.stats.tile_stats
            if tile is not None and len(tile.thresholds) != self.grid.num_locations:
                raise ValueError(
                    f"stats.tile_stats: expected {self.grid.num_locations} values (one per location of the "
                    f"{self.grid.rows}x{self.grid.cols} grid), got {len(tile.thresholds)}"
                )
        if not isinstance(self.image_score, str) or self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score: expected 'max' or 'detector', got {describe(self.image_score)}")

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_manifest(cls, manifest: DeployedSettings) -> PostProcessor:
        """The post-processing a verified bundle deploys (its grid, ``postprocess`` and ``normalization``)."""
        return cls(manifest.grid, manifest.weights, manifest.seam, manifest.stats, manifest.image_score)  # type: ignore[arg-type]

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], grid: TileGrid, stats: NormalizationStats | None = None
    ) -> PostProcessor:
        """The post-processing of a trainer config, from its ``postprocess`` section as plain data.

        Torch-free: the trainer passes ``cfg.postprocess.model_dump()``.

        Args:
            section: Keys ``weights`` (default ``uniform``), ``seam`` (a mapping read by
                :func:`~tilead.runtime.postprocess.parse_seam`, or None; default sigma 2,
                width 0.1), ``normalization`` (the stage) and ``image_score`` (default ``max``).
            grid: The run's tile grid.
            stats: The run's validation statistics, or None before validation.

        Raises:
            ValueError: For unknown keys or invalid values, or statistics of another stage
                than the section's ``normalization``.
        """
        d = check_mapping(section, "postprocess", CONFIG_KEYS)
        stage = d.get("normalization")
        if "normalization" in d and (not isinstance(stage, str) or stage not in STAGES):
            raise ValueError(f"postprocess.normalization: expected one of {', '.join(STAGES)}, got {describe(stage)}")
        if stats is not None and stage is not None and stats.stage != stage:
            raise ValueError(f"stats: stage {stats.stage!r}, but the config's postprocess.normalization is {stage!r}")
        seam = parse_seam(d["seam"], "postprocess.seam") if "seam" in d else DEFAULT_SEAM
        return cls(grid, d.get("weights", "uniform"), seam, stats, d.get("image_score", "max"))

    def with_stats(self, stats: NormalizationStats) -> PostProcessor:
        """The same settings with validation's statistics."""
        return replace(self, stats=stats)

    def manifest_section(self) -> dict[str, Any]:
        """The bundle manifest's ``postprocess`` entry (``weights``, ``seam`` or null, ``image_score``)."""
        return {"weights": self.weights, "seam": seam_to_dict(self.seam), "image_score": self.image_score}

    def _stats(self) -> NormalizationStats:
        if self.stats is None:
            raise ValueError("PostProcessor: no normalization statistics yet (build it with stats, or with_stats)")
        return self.stats

    @cached_property
    def fused_pass(self) -> FusedPass | None:
        """The fused CPU pass with these settings (:class:`~tilead.runtime.postprocess.FusedPass`), built once.

        None where it does not run: without statistics, or for a grid whose canvas is not the image.
        """
        stats = self.stats
        if stats is None or not fused_postprocess_available(self.grid, "cpu"):
            return None
        tile = stats.tile_tuple
        return FusedPass.build(self.grid, stats.native, weights=self.weights, seam=self.seam, tile_stats=tile)

    def native(self) -> _kernels.PostSpec:
        """The one spec object the C++ side takes (``tilead._kernels.PostSpec``; the device pipeline's).

        Raises:
            ValueError: Without statistics.
        """
        stats = self._stats()
        thresholds, scales = tile_norm_arrays(stats.tile_tuple, self.grid)
        seam = _kernels.SeamSpec.off() if self.seam is None else self.seam.native
        return _kernels.PostSpec(
            BLEND_CODES[self.weights],
            [] if thresholds is None else thresholds.tolist(),
            [] if scales is None else scales.tolist(),
            seam,
            stats.native,
        )

    # -- running ----------------------------------------------------------------------------------

    def merge(
        self,
        maps: np.ndarray,
        *,
        tile_stats: TileStats | None = None,
        device: str = "cpu",
        timer: StageTimes | None = None,
        fuse: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Untile, smooth seams and crop or resize to the image (:func:`~tilead.runtime.postprocess.merge_maps`).

        Args:
            maps: float32 ``(locations, n, h, w)`` or ``(locations, n, 1, h, w)``.
            tile_stats: Per-location statistics to normalize each tile with before blending
                (validation's stage ``tile``, before the full statistics exist); None: those of
                :attr:`stats` (stage ``tile``), else none.
            device: ``"cpu"`` or ``"cuda"``.
            timer: Collects ``untile``, ``seam``, ``crop`` (and ``fuse``).
            fuse: The thumbnail branch's fusion of the merged maps (see :func:`postprocess_maps`), or None.

        Returns:
            float32 ``(n, H, W)`` (fused when ``fuse`` is given).
        """
        if tile_stats is None and self.stats is not None:
            tile_stats = self.stats.tile_stats
        merged = merge_maps(
            maps,
            self.grid,
            weights=self.weights,
            seam=self.seam,
            tile_stats=None if tile_stats is None else tile_stats.as_tuple(),
            device=device,
            timer=timer,
        )
        if fuse is None:
            return merged
        with timed(timer, "fuse"):
            return fuse(merged)

    def normalize(self, merged: np.ndarray, *, device: str = "cpu", inplace: bool = False) -> NormalizedMaps:
        """Normalize and threshold merged maps (:func:`normalize_with_stats`).

        Raises:
            ValueError: Without statistics, or for invalid maps.
        """
        return normalize_with_stats(merged, self._stats(), device=device, inplace=inplace)

    def apply(
        self,
        maps: np.ndarray,
        *,
        tile_scores: np.ndarray | None = None,
        device: str = "cpu",
        timer: StageTimes | None = None,
        inplace: bool = False,
        fuse: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Allocate | None = None,
    ) -> tuple[np.ndarray, NormalizedMaps]:
        """The whole post-processing of per-location maps (:func:`postprocess_maps` with these settings).

        Args:
            maps: float32 ``(locations, n, h, w)`` raw per-location maps.
            tile_scores: float32 ``(locations, n)``: the detector's per-tile scores, which then give
                the image scores; None for the map max.
            device: ``"cpu"`` or ``"cuda"``.
            timer: Collects ``untile``, ``seam``, ``crop``, ``normalize``.
            inplace: Normalize into the merged maps (see :func:`postprocess_maps`).
            fuse: The thumbnail branch's fusion of the merged maps (see :func:`postprocess_maps`), or None.
            allocate: Where the image-size arrays come from (see :func:`postprocess_maps`).

        Returns:
            ``(merged, result)`` as :func:`postprocess_maps`.

        Raises:
            ValueError: Without statistics, or for invalid maps or scores.
        """
        return postprocess_maps(
            maps,
            self.grid,
            self._stats(),
            weights=self.weights,
            seam=self.seam,
            device=device,
            timer=timer,
            tile_scores=tile_scores,
            inplace=inplace,
            fuse=fuse,
            allocate=allocate,
            fused=self.fused_pass if fuse is None and device == "cpu" else None,
        )
