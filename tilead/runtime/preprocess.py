"""Preprocessing: uint8 camera images to normalized model-input tiles.

The tile kernel reads uint8 HWC images (1 or 3 channels, BGR or RGB), applies
the edge policy (pad / resize) on the fly, reorders channels, normalizes with
the model's mean and std, and writes float32 or float16 tiles straight into a
``(locations, n, channels, tile_h, tile_w)`` buffer: block ``l`` is the batch
for location ``l``'s model.

For a model that converts and normalizes its input itself (an OpenVINO backbone
compiled for uint8 tiles, issue #21), :func:`tile_images_u8` cuts the same tiles
without normalization: uint8, channels last, a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tilead import _kernels
from tilead.runtime._checks import as_float, check_array, check_mapping, check_shape, describe
from tilead.runtime.devices import kernel_family
from tilead.runtime.geometry import TileGrid

ColorOrder = Literal["RGB", "BGR"]
InputOrder = Literal["RGB", "BGR", "GRAY"]
TileDType = Literal["float32", "float16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KEYS = ("mean", "std", "channels", "color_order", "dtype")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input.

    A model-input value is ``(pixel / 255 - mean[c]) / std[c]`` for model
    channel ``c``.

    Attributes:
        mean: Per model channel, on the 0..1 scale (ImageNet by default).
        std: Per model channel, on the 0..1 scale, all positive.
        channels: Channels the model takes (1 or 3). A gray image feeding a
            3-channel model is replicated into all three.
        color_order: Channel order the model takes, ``"RGB"`` or ``"BGR"``.
        dtype: Element type of the tiles, ``"float32"`` or ``"float16"``.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    color_order: ColorOrder = "RGB"
    dtype: TileDType = "float32"

    def __post_init__(self) -> None:
        if type(self.channels) is not int or self.channels not in (1, 3):
            raise ValueError(f"preprocessing.channels: expected 1 or 3, got {describe(self.channels)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, Sequence) or len(values) != self.channels:
                raise ValueError(
                    f"preprocessing.{name}: expected {self.channels} numbers (one per model channel), "
                    f"got {describe(values)}"
                )
            low = 1e-6 if name == "std" else -1e6
            object.__setattr__(
                self,
                name,
                tuple(as_float(v, f"preprocessing.{name}[{i}]", low=low, high=1e6) for i, v in enumerate(values)),
            )
        if not isinstance(self.color_order, str) or self.color_order not in ("RGB", "BGR"):
            raise ValueError(f"preprocessing.color_order: expected 'RGB' or 'BGR', got {describe(self.color_order)}")
        if not isinstance(self.dtype, str) or self.dtype not in ("float32", "float16"):
            raise ValueError(f"preprocessing.dtype: expected 'float32' or 'float16', got {describe(self.dtype)}")

    @property
    def scale(self) -> list[float]:
        """Per-channel multiplier applied to the raw uint8 value."""
        return [1.0 / (255.0 * s) for s in self.std]

    @property
    def bias(self) -> list[float]:
        """Per-channel offset added after scaling."""
        return [-m / s for m, s in zip(self.mean, self.std, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written into manifests."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "color_order": self.color_order,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ValueError: For unknown keys or invalid values.
        """
        kwargs = dict(check_mapping(data, "preprocessing", _KEYS))
        for key in ("mean", "std"):
            if key in kwargs and isinstance(kwargs[key], list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def as_image_batch(images: np.ndarray, grid: TileGrid) -> np.ndarray:
    """View uint8 images as a ``(n, height, width, channels)`` batch.

    Args:
        images: ``(H, W)`` gray, ``(H, W, C)`` or ``(n, H, W, C)`` uint8 with
            ``C`` in {1, 3} and ``(H, W)`` equal to the grid's image size.
        grid: The tile grid.

    Returns:
        A 4-D view of the same memory.

    Raises:
        ValueError: For a wrong dtype, rank, channel count or image size, or
            non-contiguous memory.
    """
    check_array(images, "images", dtypes=[np.uint8], ndims=[2, 3, 4])
    batch = images
    if images.ndim == 2:
        batch = images[None, :, :, None]
    elif images.ndim == 3:
        batch = images[None]
    channels = batch.shape[3]
    if channels not in (1, 3):
        raise ValueError(
            f"images: expected 1 or 3 channels in the last dimension, got {channels} (shape {images.shape})"
        )
    if batch.shape[1:3] != grid.image_size:
        h, w = grid.image_size
        raise ValueError(
            f"images: expected height x width {h} x {w} (the grid's image_size), "
            f"got {batch.shape[1]} x {batch.shape[2]}"
        )
    return batch


def tile_shape(grid: TileGrid, n: int, preprocessing: Preprocessing) -> tuple[int, int, int, int, int]:
    """Shape ``(locations, n, channels, tile_h, tile_w)`` of a tile buffer."""
    return (grid.num_locations, n, preprocessing.channels, *grid.tile_size)


def tile_shape_u8(grid: TileGrid, n: int, preprocessing: Preprocessing) -> tuple[int, int, int, int, int]:
    """Shape ``(locations, n, tile_h, tile_w, channels)`` of a uint8 tile buffer (:func:`tile_images_u8`)."""
    return (grid.num_locations, n, *grid.tile_size, preprocessing.channels)


def uint8_tiles_fit(grid: TileGrid) -> bool:
    """Whether :func:`tile_images_u8` can cut this grid: a direct edge policy (``shift``, ``pad``), not ``resize``.

    ``resize`` samples the image bilinearly, between the uint8 levels; such grids keep the float tiles.
    """
    return grid.edge != "resize"


def tile_images_u8(
    images: np.ndarray | Sequence[np.ndarray],
    grid: TileGrid,
    preprocessing: Preprocessing | None = None,
    *,
    input_order: InputOrder = "BGR",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cut images into uint8 channels-last tiles, the pixels as they are, for models that normalize them themselves.

    The tiles :func:`tile_images` would make before normalization: channels in the model's order (gray
    replicated for a 3-channel model), 0 off the image (edge policy ``pad``). A model compiled with
    :func:`tilead.runtime.backends.openvino.uint8_input` computes ``(pixel / 255 - mean[c]) / std[c]``
    from them itself. CPU only.

    Args:
        images: uint8 ``(H, W)``, ``(H, W, C)`` or ``(n, H, W, C)``, ``C`` in {1, 3}, at the grid's image size;
            or a list of ``n`` such ``(H, W[, C])`` images of one channel count, tiled where they are (a batch
            is never stacked into one array first: 12.6 MB of copying per 2048x2048 image, issue #21).
        grid: The tile grid; its edge policy ``shift`` or ``pad`` (:func:`uint8_tiles_fit`).
        preprocessing: The model's channels and channel order (its mean, std and dtype are not used here).
        input_order: As for :func:`tile_images`.
        out: Optional C-contiguous uint8 buffer ``(locations, n, tile_h, tile_w, channels)``, written in place.

    Returns:
        uint8 ``(locations, n, tile_h, tile_w, channels)``; ``out`` when given.

    Raises:
        ValueError: For invalid images, orders or buffers, or a grid whose edge policy is ``resize``.
    """
    prep = preprocessing if preprocessing is not None else Preprocessing()
    if not uint8_tiles_fit(grid):
        raise ValueError("uint8 tiles need the edge policy 'shift' or 'pad'; 'resize' resamples between uint8 levels")
    batch: np.ndarray | list[np.ndarray]
    if isinstance(images, np.ndarray):
        stacked = as_image_batch(images, grid)
        batch, n, channels = stacked, stacked.shape[0], stacked.shape[3]
    else:
        if len(images) == 0:
            raise ValueError("images: expected at least one image, got an empty list")
        batch = [as_image_batch(image, grid)[0] for image in images]
        n, channels = len(batch), batch[0].shape[2]
        if any(image.shape[2] != channels for image in batch):
            got = sorted({image.shape[2] for image in batch})
            raise ValueError(f"images: expected one channel count for the whole list, got {got}")
    swap = _check_order(channels, input_order, prep)
    out = _tile_buffer(out, tile_shape_u8(grid, n, prep), np.uint8, "(locations, n, tile_h, tile_w, channels)")
    _kernels.tile_images_u8(batch, grid.native, out, swap)
    return out


def _tile_buffer(out: np.ndarray | None, shape: tuple[int, ...], dtype: Any, layout: str) -> np.ndarray:
    """A new tile buffer of ``shape`` and ``dtype``, or ``out`` once checked against them (``layout`` names the axes).

    Raises:
        ValueError: For a buffer of another dtype, rank or shape, or a read-only one.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    check_array(out, "out", dtypes=[dtype], ndims=[5], writable=True)
    check_shape(out, "out", shape, layout)
    return out


def _check_order(in_channels: int, input_order: str, prep: Preprocessing) -> bool:
    """Check the images' channel order against the model's; whether red and blue swap on the way.

    Raises:
        ValueError: For an unknown order, ``"GRAY"`` with colour images, or colour images for a gray model.
    """
    if input_order not in ("RGB", "BGR", "GRAY"):
        raise ValueError(f"input_order: expected 'RGB', 'BGR' or 'GRAY', got {describe(input_order)}")
    if input_order == "GRAY" and in_channels != 1:
        raise ValueError(f"input_order: 'GRAY' needs 1-channel images, got {in_channels} channels")
    if in_channels == 3 and prep.channels == 1:
        raise ValueError("images: the model takes 1 channel but the images have 3; convert them to gray first")
    return in_channels == 3 and input_order != "GRAY" and input_order != prep.color_order


def tile_images(
    images: np.ndarray,
    grid: TileGrid,
    preprocessing: Preprocessing | None = None,
    *,
    input_order: InputOrder = "BGR",
    out: np.ndarray | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Cut images into normalized tiles, one block per location.

    Args:
        images: uint8 ``(H, W)``, ``(H, W, C)`` or ``(n, H, W, C)``, ``C`` in
            {1, 3}, at the grid's image size.
        grid: The tile grid.
        preprocessing: Normalization, model channels and order, tile dtype.
        input_order: Channel order of 3-channel ``images``: ``"BGR"``
            (OpenCV's) or ``"RGB"``. 1-channel images are gray whatever this
            says; ``"GRAY"`` asserts that they are.
        out: Optional C-contiguous buffer of shape
            ``(locations, n, channels, tile_h, tile_w)`` and the
            preprocessing dtype, written in place (e.g. a model's input).
        device: ``"cpu"`` or ``"cuda"`` (host-staged CUDA twin).

    Returns:
        The tile buffer ``(locations, n, channels, tile_h, tile_w)``;
        ``out`` when given.

    Raises:
        ValueError: For invalid images, orders or buffers.
    """
    prep = preprocessing if preprocessing is not None else Preprocessing()
    batch = as_image_batch(images, grid)
    swap = _check_order(batch.shape[3], input_order, prep)
    out = _tile_buffer(
        out, tile_shape(grid, batch.shape[0], prep), prep.dtype, "(locations, n, channels, tile_h, tile_w)"
    )
    kernel_family(device).tile_images(batch, grid.native, out, prep.scale, prep.bias, swap)
    return out
