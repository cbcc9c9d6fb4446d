"""The run's location -> model table (issue #20, ``grid.assignment``): made on first use, then read.

:mod:`tilead.trainer.assignment` holds the torch-free rules (modes, k-means, the saved table); this module
adds what needs the backbone: each location's mean embedding of its training tiles (``cluster``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from tilead.runtime import Preprocessing, TileGrid
from tilead.trainer.assignment import Assignment, AssignmentError, mean_embeddings, resolve_assignment
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.components import make_backbone, make_preprocessing
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.images import ImageLoader
from tilead.trainer.run_dir import RunPaths
from tilead.trainer.tiles import _location_tiles, _to_torch

EMBED_IMAGES = 64
"""Most fit images (evenly spaced) whose tiles give the per-location mean embeddings of ``cluster``."""


def location_embeddings(
    cfg: RunConfig, samples: Sequence[Sample], grid: TileGrid, extractor: FeatureExtractor
) -> np.ndarray:
    """Every location's mean embedding of its training tiles: the backbone's layers averaged over positions.

    Uses at most :data:`EMBED_IMAGES` of ``samples`` (evenly spaced).

    Returns:
        float64 ``(locations, d)`` with ``d`` the summed channels of the backbone's layers.
    """
    picks = np.unique(np.linspace(0, len(samples) - 1, num=min(EMBED_IMAGES, len(samples))).round().astype(int))
    chosen = [samples[i] for i in picks] if samples else []
    prep = make_preprocessing(cfg, extractor)
    loader = ImageLoader(cfg.data)

    def batches() -> Iterator[np.ndarray]:
        for batch in loader.iter_batches(chosen, cfg.train.batch_size):
            tiles = _location_tiles(batch.images, grid, prep, cfg.data.channel_order)
            count, n = tiles.shape[:2]
            flat = _to_torch(np.ascontiguousarray(tiles.reshape(count * n, *tiles.shape[2:])))
            with torch.inference_mode():
                pooled = torch.cat([f.float().mean(dim=(2, 3)) for f in extractor(flat)], dim=1)
            yield pooled.numpy().reshape(count, n, -1)

    return mean_embeddings(batches(), grid.num_locations)


MEAN_TILE_STEP = 8
"""``cluster`` with ``orient`` compares mean tiles sampled every this many pixels."""


def location_mean_tiles(cfg: RunConfig, samples: Sequence[Sample], grid: TileGrid, prep: Preprocessing) -> np.ndarray:
    """Every location's mean normalized training tile, sampled every :data:`MEAN_TILE_STEP` pixels.

    Uses at most :data:`EMBED_IMAGES` of ``samples`` (evenly spaced). No backbone: the mean of transformed
    tiles is the transformed mean, so orientations can be compared on it exactly.

    Returns:
        float64 ``(locations, C, ceil(th / step), ceil(tw / step))``.
    """
    picks = np.unique(np.linspace(0, len(samples) - 1, num=min(EMBED_IMAGES, len(samples))).round().astype(int))
    chosen = [samples[i] for i in picks] if samples else []
    loader = ImageLoader(cfg.data)
    total: np.ndarray | None = None
    count = 0
    for batch in loader.iter_batches(chosen, cfg.train.batch_size):
        tiles = _location_tiles(batch.images, grid, prep, cfg.data.channel_order)  # (L, n, C, th, tw)
        s = tiles[..., ::MEAN_TILE_STEP, ::MEAN_TILE_STEP].astype(np.float64).sum(axis=1)
        total = s if total is None else total + s
        count += tiles.shape[1]
    if total is None:
        raise AssignmentError("cluster: no training tiles to average")
    return total / count


def run_assignment(
    cfg: RunConfig,
    paths: RunPaths,
    grid: TileGrid,
    samples: Sequence[Sample] = (),
    extractor: FeatureExtractor | None = None,
) -> Assignment:
    """The run's location -> model table (:func:`tilead.trainer.assignment.resolve_assignment`).

    Made (and saved as ``assignment.json``) on first use; ``cluster`` then
    embeds ``samples`` with ``extractor`` (or the config's backbone).
    """
    a = cfg.grid.assignment

    def embed() -> np.ndarray:
        backbone = extractor if extractor is not None else make_backbone(cfg)
        if a.orient:
            return location_mean_tiles(cfg, samples, grid, make_preprocessing(cfg, backbone))
        return location_embeddings(cfg, samples, grid, backbone)

    return resolve_assignment(a.mode, a.k, cfg.seed, grid, paths.root, embed if samples else None, orient=a.orient)
