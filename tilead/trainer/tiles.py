"""Tiles as the trainer streams them: cut by the runtime's tile kernel (exactly the Predictor's preprocessing)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from tilead.runtime import Preprocessing, TileGrid, location_name, orientation, tile_images
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.faults import maybe_inject_fault
from tilead.trainer.images import ImageLoader


def _location_tiles(images: np.ndarray, grid: TileGrid, prep: Preprocessing, input_order: str) -> np.ndarray:
    """All locations' tiles of a batch: float32 ``(L, n, C, th, tw)``."""
    order = "GRAY" if images.shape[3] == 1 else input_order
    return tile_images(images, grid, prep, input_order=order)  # type: ignore[arg-type]


def _to_torch(block: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(block).contiguous(memory_format=torch.channels_last)


class LocationTiles:
    """One location's normalized tiles of some images: a re-iterable :class:`~tilead.trainer.detectors.TileSource`.

    Every pass re-reads the images (in order) and cuts them with the runtime's
    tile kernel, exactly as the Predictor does; batches are float32
    ``(n, C, th, tw)`` channels-last tensors. With several location indices
    (a model shared by those locations, :mod:`tilead.trainer.assignment`) every
    image batch yields one batch per location, so a pass covers the union of their tiles.
    """

    def __init__(
        self,
        cfg: RunConfig,
        samples: Sequence[Sample],
        grid: TileGrid,
        prep: Preprocessing,
        index: int | Sequence[int],
        label: str,
        transforms: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.samples = tuple(samples)
        self.grid = grid
        self.prep = prep
        self.indices = (index,) if isinstance(index, int) else tuple(index)
        # Orientation of each location's tiles (tilead.runtime.orientation; cluster with orient), 0: as cut.
        self.transforms = tuple(transforms) if transforms is not None else (0,) * len(self.indices)
        if len(self.transforms) != len(self.indices):
            raise ValueError(f"transforms: expected one per location ({len(self.indices)}), got {len(self.transforms)}")
        self.index = self.indices[0]
        self.label = label
        self.batch_size = cfg.train.batch_size
        self.num_images = len(self.samples) * len(self.indices)  # tiles per pass (TileSource.num_images)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size) * len(self.indices)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.samples:
            return
        loader = ImageLoader(self.cfg.data)
        for n, batch in enumerate(loader.iter_batches(self.samples, self.batch_size)):
            tiles = _location_tiles(batch.images, self.grid, self.prep, self.cfg.data.channel_order)
            for index, t in zip(self.indices, self.transforms, strict=True):
                yield _to_torch(np.ascontiguousarray(orientation.apply(tiles[index], t)))
            if n == 0:
                maybe_inject_fault(location_name(*self.grid.locations()[self.index]))  # a no-op unless testing
