"""The tiled ensemble's fit: every location not yet done, in process, in worker processes or on Ray.

Fitting goes location by location (or ``train.workers`` locations at a time
in separate processes, or one Ray task per location with ``train.backend:
ray``, see :mod:`tilead.trainer.distributed`): the training images are streamed in batches, cut by
the runtime's tile kernel (exactly the Predictor's preprocessing), and only
the current location's block is streamed (:class:`~tilead.trainer.tiles.LocationTiles`) into the
run's detector (:mod:`tilead.trainer.detectors`, selected by
``model.family``), which fits that location. Memory is therefore one
location's state plus what the detector keeps, whatever the grid. A location's
checkpoint is written (atomically) as soon as it is done, so an interrupted
run loses at most the location in progress and ``--resume`` skips the rest.

One location's fit is :func:`tilead.trainer.fit.fit_location`; the eager
inference is :mod:`tilead.trainer.inference`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from tqdm.auto import tqdm

from tilead.runtime import TileGrid
from tilead.trainer.checkpoints import checkpoint_done
from tilead.trainer.components import make_backbone, total_threads
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.distributed import fit_ray
from tilead.trainer.fit import _fit_worker, fit_location
from tilead.trainer.model_table import run_assignment
from tilead.trainer.run_dir import RunPaths

log = logging.getLogger("tilead.trainer")


def fit_ensemble(
    cfg: RunConfig, paths: RunPaths, fit_samples: Sequence[Sample], grid: TileGrid, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Fit every model not yet done (one per location unless ``grid.assignment`` shares them); return the summaries."""
    table = run_assignment(cfg, paths, grid, fit_samples)
    if table.shared:
        log.info("assignment %s: %d models for %d locations", table.mode, table.num_models, grid.num_locations)
    names = table.names
    todo = [i for i, name in enumerate(names) if not checkpoint_done(paths, cfg, name)]
    skipped = len(names) - len(todo)
    if skipped:
        log.info("resume: %d of %d models already fitted, %d to go", skipped, len(names), len(todo))
    if not todo:
        return []
    if cfg.train.backend == "ray":
        return fit_ray(cfg, paths, todo, fit_samples, progress=progress)
    threads = total_threads(cfg)
    workers = min(cfg.train.workers, len(todo))
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="locations", unit="loc", disable=not progress, position=0)
    try:
        if workers == 1:
            torch.set_num_threads(threads)
            extractor = make_backbone(cfg)
            for i in todo:
                results.append(
                    fit_location(
                        cfg, paths, i, fit_samples, grid, backbone=extractor, progress=progress, assignment=table
                    )
                )
                bar.update(1)
        else:
            per = max(1, threads // workers)
            ctx = get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [
                    pool.submit(_fit_worker, str(paths.config), str(paths.root), i, list(fit_samples), per)
                    for i in todo
                ]
                for fut in futures:
                    results.append(fut.result())
                    bar.update(1)
    finally:
        bar.close()
    return results
