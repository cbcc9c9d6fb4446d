"""The trainer's eager PyTorch inference of the ensemble: per-location raw maps ``(locations, n, h, w)``.

:func:`location_forward` is the ensemble as a function of a uint8 batch; :func:`collect_maps` gathers the maps of
any such function (the eager ensemble or the runtime Predictor) over images loaded in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from tilead.runtime import Preprocessing, TileGrid
from tilead.runtime.timing import StageTimes, timed
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.images import ImageLoader
from tilead.trainer.tiles import _location_tiles, _to_torch


def collect_maps(
    cfg: RunConfig,
    samples: Sequence[Sample],
    forward: Callable[[np.ndarray], np.ndarray],
    *,
    batch_size: int,
    with_masks: bool = False,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[Sample]]:
    """Load ``samples`` in batches and gather per-location maps of any ensemble runner.

    Args:
        cfg: Run config (data settings).
        samples: Images to run.
        forward: uint8 ``(n, H, W, C)`` batch to float32 maps ``(locations, n, h, w)``
            (the eager PyTorch ensemble, or the runtime Predictor).
        batch_size: Images per batch.
        with_masks: Also load ground-truth masks.
        progress: Progress bar label, or None.

    Returns:
        ``(maps, masks, samples)``: raw maps float32 ``(locations, n, h, w)``,
        masks bool ``(n, H, W)`` or None, the samples actually loaded (bad
        files may be skipped).

    Raises:
        ValueError: If no image could be loaded.
    """
    loader = ImageLoader(cfg.data)
    chunks: list[np.ndarray] = []
    mask_chunks: list[np.ndarray] = []
    kept: list[Sample] = []
    for batch in loader.iter_batches(samples, batch_size, with_masks=with_masks, progress=progress):
        chunks.append(forward(batch.images))
        if with_masks and batch.masks is not None:
            mask_chunks.append(batch.masks)
        kept.extend(batch.samples)
    if not chunks:
        raise ValueError("no images could be loaded for inference")
    maps = np.concatenate(chunks, axis=1)
    masks = np.concatenate(mask_chunks, axis=0) if with_masks else None
    return maps, masks, kept


def location_maps(
    cfg: RunConfig,
    models: Sequence[LocationModel],
    samples: Sequence[Sample],
    grid: TileGrid,
    prep: Preprocessing,
    *,
    batch_size: int,
    with_masks: bool = False,
    progress: str | None = None,
    scores: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[Sample]]:
    """Eager PyTorch inference of the ensemble.

    Args:
        cfg: Run config (data settings).
        models: One model per location, row-major.
        samples: Images to run.
        grid: The tile grid.
        prep: Tile preprocessing.
        batch_size: Images per batch.
        with_masks: Also load ground-truth masks.
        progress: Progress bar label, or None.
        scores: Collects the detector's own per-tile image scores (see :func:`location_forward`).

    Returns:
        As :func:`collect_maps`.
    """
    forward = location_forward(cfg, models, grid, prep, scores=scores)
    return collect_maps(cfg, samples, forward, batch_size=batch_size, with_masks=with_masks, progress=progress)


def location_forward(
    cfg: RunConfig,
    models: Sequence[LocationModel],
    grid: TileGrid,
    prep: Preprocessing,
    *,
    timer: StageTimes | None = None,
    scores: list[np.ndarray] | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """The eager ensemble as a function: uint8 ``(n, H, W, C)`` to maps ``(locations, n, h, w)``.

    Tiles are cut by the runtime's tile kernel; every location's model runs on
    its tile batch, one location after the other (torch's intra-op threads).

    Args:
        cfg: Run config (channel order, feature stride).
        models: One model per location, row-major.
        grid: The tile grid.
        prep: Tile preprocessing.
        timer: Collects ``tile``, ``inference`` and ``location:<name>`` times.
        scores: When given and the detector has its own image score
            (:attr:`LocationModel.has_image_score`, e.g. PatchCore's
            reweighted score), every call appends the per-tile scores,
            float32 ``(locations, n)``; otherwise it stays empty.
    """
    names = grid.location_names()
    with_scores = scores is not None and all(m.has_image_score for m in models)

    def forward(images: np.ndarray) -> np.ndarray:
        with timed(timer, "tile"):
            tiles = _location_tiles(images, grid, prep, cfg.data.channel_order)
        out: np.ndarray | None = None
        tile_scores = np.empty((len(models), images.shape[0]), dtype=np.float32)
        with timed(timer, "inference"), torch.inference_mode():
            for i, model in enumerate(models):
                with timed(timer, f"location:{names[i]}"):
                    if with_scores:
                        t_map, t_score = model.forward_with_score(_to_torch(tiles[i]))
                        tile_scores[i] = t_score.numpy()
                    else:
                        t_map = model(_to_torch(tiles[i]))
                    m = t_map[:, 0].numpy()
                if out is None:
                    out = np.empty((len(models), *m.shape), dtype=np.float32)
                out[i] = m
        assert out is not None
        if scores is not None and with_scores:
            scores.append(tile_scores)
        return out

    return forward
