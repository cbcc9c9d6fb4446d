"""The thumbnail branch: one more model on the whole image, downscaled, fused with the tiled map.

A large defect that spans several tiles (bottle's ``broken_large``, an uneven
surface) is seen whole by one model fitted on whole images resized to
``size`` x ``size`` (issue #20, HiAD's low-resolution branch). At run time:

1. :func:`thumbnail_tiles`: every image is resized to ``size`` x ``size`` with
   the runtime's image resize (:func:`tilead.runtime.image_resize.resize_image`,
   the resize training uses) and preprocessed by the tile kernel as a grid of
   one tile: float32 ``(1, n, C, size, size)``;
2. the backend runs ``thumbnail.onnx`` on it beside the tiles: raw maps ``(n, h, w)``;
3. :func:`upsample` brings them to the image size (bilinear, align_corners=False);
4. :meth:`ThumbnailBranch.fuse` normalizes each branch with its own validation
   statistics, ``z = (x - t) / (max - min) + 0.5`` (not clamped, so nothing
   saturates before the fusion), and fuses ``max(z_tiled, z_thumb)`` or
   ``weight * z_tiled + (1 - weight) * z_thumb`` (the weight chosen by validation).

The fused map then takes the place of the merged tiled map: the bundle's
``normalization`` statistics were measured on fused validation maps, so the
usual normalization, thresholds and image score (max of the map) apply
unchanged. A NaN or infinity in either branch stays NaN in the fused map
(the non-finite rule then makes the image anomalous).

Torch-free: numpy and the ``tilead._kernels`` twins only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tilead import _kernels
from tilead.runtime._checks import as_float, as_int, as_pair, check_array, check_mapping, describe
from tilead.runtime.files import LocationFile, parse_location_file
from tilead.runtime.geometry import MAX_SIDE, TileGrid
from tilead.runtime.image_resize import resize_image
from tilead.runtime.postprocess import resize_maps
from tilead.runtime.postprocessor import check_range, check_threshold_in_range
from tilead.runtime.preprocess import InputOrder, Preprocessing, tile_images

Fusion = Literal["max", "weighted"]
FUSIONS: tuple[Fusion, ...] = ("max", "weighted")
THUMBNAIL_FILE = "thumbnail.onnx"
THUMBNAIL_NAME = "thumbnail"
"""The thumbnail model's name in messages, timings and the manifest entry."""
MIN_SIZE = 32
"""Smallest thumbnail side (a backbone with stride 32 needs at least one cell)."""


@dataclass(frozen=True)
class BranchStats:
    """One branch's validation statistics, the affine map of its per-branch normalization.

    Attributes:
        threshold: Raw pixel threshold of the branch on validation.
        min: Smallest raw map value on validation.
        max: Largest raw map value on validation.
    """

    threshold: float
    min: float
    max: float

    def __post_init__(self) -> None:
        lo, hi = check_range(self.min, self.max, "branch [min, max]")
        check_threshold_in_range(float(self.threshold), lo, hi, "branch threshold")

    def normalize(self, maps: np.ndarray) -> np.ndarray:
        """``(x - threshold) / (max - min) + 0.5`` in float32, not clamped (a new array)."""
        scale = np.float32(self.scale)
        out: np.ndarray = (maps - np.float32(self.threshold)) * scale + np.float32(0.5)
        return out.astype(np.float32, copy=False)

    @property
    def scale(self) -> float:
        """``1 / (max - min)`` as :meth:`normalize` multiplies by it (rounded to float32)."""
        return float(np.float32(1.0 / (self.max - self.min)))

    def to_dict(self) -> dict[str, float]:
        """Plain-data form."""
        return {"threshold": self.threshold, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: object, where: str) -> BranchStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: Naming ``where`` and the bad key.
        """
        d = check_mapping(data, where, ("threshold", "min", "max"), ("threshold", "min", "max"))
        try:
            return cls(*(as_float(d[k], f"{where}.{k}") for k in ("threshold", "min", "max")))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class ThumbnailBranch:
    """The thumbnail branch of a run or bundle (the manifest's ``thumbnail`` entry).

    Attributes:
        size: Side of the square the whole image is resized to.
        fusion: ``max`` or ``weighted``.
        weight: Weight of the tiled branch for ``weighted`` (in ``[0, 1]``; the
            thumbnail gets ``1 - weight``); None for ``max``.
        map_size: ``(h, w)`` of the thumbnail model's output map.
        tiled: The tiled branch's statistics (on merged maps, tile-normalized for stage ``tile``).
        thumbnail: The thumbnail branch's statistics (on its upsampled maps).
        file: ``thumbnail.onnx`` with its sha256 and size (bundles), None in a run folder.
    """

    size: int
    fusion: Fusion
    weight: float | None
    map_size: tuple[int, int]
    tiled: BranchStats
    thumbnail: BranchStats
    file: LocationFile | None = None

    def __post_init__(self) -> None:
        as_int(self.size, "thumbnail.size", minimum=MIN_SIZE, maximum=MAX_SIDE)
        if not isinstance(self.fusion, str) or self.fusion not in FUSIONS:
            raise ValueError(f"thumbnail.fusion: expected 'max' or 'weighted', got {describe(self.fusion)}")
        if self.fusion == "weighted":
            as_float(self.weight, "thumbnail.weight", low=0.0, high=1.0)
        elif self.weight is not None:
            raise ValueError(f"thumbnail.weight: only fusion 'weighted' takes a weight, got {describe(self.weight)}")
        h, w = as_pair(list(self.map_size), "thumbnail.map_size", maximum=MAX_SIDE)
        if h > self.size or w > self.size:
            raise ValueError(f"thumbnail.map_size: expected at most {self.size} x {self.size}, got {h} x {w}")

    @property
    def grid(self) -> TileGrid:
        """The one-tile grid the resized image is preprocessed with."""
        return TileGrid((self.size, self.size), self.size, self.size, "shift")

    def fuse(self, tiled: np.ndarray, thumbnail: np.ndarray) -> np.ndarray:
        """Fuse the merged tiled maps with the upsampled thumbnail maps.

        Args:
            tiled: float32 ``(n, H, W)`` merged tiled maps (tile-normalized for stage ``tile``).
            thumbnail: float32 ``(n, H, W)`` thumbnail maps at the image size (:func:`upsample`).

        Returns:
            float32 ``(n, H, W)``: each branch normalized with its own statistics, then fused.

        Raises:
            ValueError: For other dtypes or shapes.
        """
        check_array(tiled, "tiled", dtypes=[np.float32], ndims=[3], contiguous=False)
        check_array(thumbnail, "thumbnail", dtypes=[np.float32], ndims=[3], contiguous=False)
        if tiled.shape != thumbnail.shape:
            raise ValueError(
                f"thumbnail: maps of shape {thumbnail.shape}, expected the tiled maps' shape {tiled.shape}"
            )
        a, b = self.tiled.normalize(tiled), self.thumbnail.normalize(thumbnail)
        if self.fusion == "max":
            out: np.ndarray = np.maximum(a, b)  # NaN in either stays NaN
        else:
            w = np.float32(self.weight)
            out = w * a + (np.float32(1.0) - w) * b
        return np.ascontiguousarray(out, dtype=np.float32)

    def fuse_spec(self) -> Any:
        """The fusion as the kernels take it (``tilead._kernels.FuseSpec``): the float32 values :meth:`fuse` uses."""
        return _kernels.FuseSpec(
            float(np.float32(self.tiled.threshold)),
            self.tiled.scale,
            float(np.float32(self.thumbnail.threshold)),
            self.thumbnail.scale,
            self.fusion == "weighted",
            float(np.float32(self.weight)) if self.weight is not None else 0.0,
        )

    def native(self) -> Any:
        """The branch as the TensorRT backend's DevicePipeline takes it (``tilead._kernels.ThumbnailSpec``)."""
        return _kernels.ThumbnailSpec(self.grid.native, self.map_size[0], self.map_size[1], self.fuse_spec())

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the manifest's ``thumbnail`` entry; without ``file`` in a run folder)."""
        out: dict[str, Any] = {
            "size": self.size,
            "fusion": self.fusion,
            "weight": self.weight,
            "map_size": list(self.map_size),
            "stats": {"tiled": self.tiled.to_dict(), "thumbnail": self.thumbnail.to_dict()},
        }
        if self.file is not None:
            out.update({"file": self.file.file, "sha256": self.file.sha256, "bytes": self.file.bytes})
        return out

    @classmethod
    def from_dict(cls, data: object, *, with_file: bool = True) -> ThumbnailBranch:
        """Inverse of :meth:`to_dict`.

        Args:
            data: The JSON value.
            with_file: Require ``file``, ``sha256`` and ``bytes`` (a bundle's entry); False: refuse them (a run's).

        Raises:
            ValueError: Naming the bad key.
        """
        keys = ("size", "fusion", "weight", "map_size", "stats")
        files = ("file", "sha256", "bytes")
        d = check_mapping(data, "thumbnail", keys + files if with_file else keys, keys + files if with_file else keys)
        size = as_int(d["size"], "thumbnail.size", minimum=MIN_SIZE, maximum=MAX_SIDE)
        if not isinstance(d["map_size"], list):
            raise ValueError(f"thumbnail.map_size: expected [height, width], got {describe(d['map_size'])}")
        map_size = as_pair(d["map_size"], "thumbnail.map_size", maximum=MAX_SIDE)
        stats = check_mapping(d["stats"], "thumbnail.stats", ("tiled", "thumbnail"), ("tiled", "thumbnail"))
        weight = d["weight"]
        if weight is not None:
            weight = as_float(weight, "thumbnail.weight", low=0.0, high=1.0)
        file = None
        if with_file:
            entry = {"name": THUMBNAIL_NAME, **{k: d[k] for k in files}}
            file = parse_location_file(entry, "thumbnail", THUMBNAIL_NAME, THUMBNAIL_FILE)
        return cls(
            size=size,
            fusion=d["fusion"],
            weight=weight,
            map_size=map_size,
            tiled=BranchStats.from_dict(stats["tiled"], "thumbnail.stats.tiled"),
            thumbnail=BranchStats.from_dict(stats["thumbnail"], "thumbnail.stats.thumbnail"),
            file=file,
        )


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Every image of a uint8 batch resized to ``size`` x ``size`` as training resizes (area when shrinking).

    Args:
        images: uint8 ``(n, H, W, C)``.
        size: The thumbnail side.

    Returns:
        uint8 ``(n, size, size, C)``, C-contiguous.
    """
    check_array(images, "images", dtypes=[np.uint8], ndims=[4], contiguous=False)
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = resize_image(image, (size, size))
    return out


def thumbnail_tiles(
    images: np.ndarray, size: int, preprocessing: Preprocessing, *, input_order: InputOrder = "BGR"
) -> np.ndarray:
    """The thumbnail model's input: images resized to ``size`` x ``size``, preprocessed as one tile each.

    Args:
        images: uint8 ``(n, H, W, C)``.
        size: The thumbnail side.
        preprocessing: The bundle's preprocessing (mean, std, color order).
        input_order: Channel order of ``images`` (``GRAY`` for one channel).

    Returns:
        float32 ``(1, n, C, size, size)`` (one "location").
    """
    small = resize_batch(images, size)
    grid = TileGrid((size, size), size, size, "shift")
    return tile_images(small, grid, preprocessing, input_order=input_order)


def upsample(maps: np.ndarray, image_size: tuple[int, int], *, device: str = "cpu") -> np.ndarray:
    """Thumbnail maps to the image size: one bilinear resize (align_corners=False).

    Args:
        maps: float32 ``(n, h, w)`` or ``(n, 1, h, w)`` raw thumbnail maps.
        image_size: ``(H, W)``.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        float32 ``(n, H, W)``.
    """
    check_array(maps, "thumbnail maps", dtypes=[np.float32], ndims=[3, 4], contiguous=False)
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"thumbnail maps: expected (n, 1, h, w), got shape {maps.shape}")
        maps = maps[:, 0]
    return resize_maps(np.ascontiguousarray(maps), image_size, device=device)


def fuser(branch: ThumbnailBranch, thumbnail: np.ndarray, *, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """The ``fuse`` step of :func:`tilead.runtime.postprocessor.postprocess_maps` for these thumbnail maps.

    Args:
        branch: The thumbnail branch.
        thumbnail: float32 ``(n, h, w)`` raw thumbnail maps of the same images as the tiled maps.
        device: ``"cpu"`` or ``"cuda"`` (the upsampling kernel's twin).

    Returns:
        merged tiled maps float32 ``(n, H, W)`` -> fused maps float32 ``(n, H, W)``.
    """

    def fuse(merged: np.ndarray) -> np.ndarray:
        return branch.fuse(merged, upsample(thumbnail, (merged.shape[1], merged.shape[2]), device=device))

    return fuse


def parse_thumbnail(data: Mapping[str, Any] | None) -> ThumbnailBranch | None:
    """The manifest's ``thumbnail`` entry (None or absent: no thumbnail branch)."""
    return None if data is None else ThumbnailBranch.from_dict(data, with_file=True)
