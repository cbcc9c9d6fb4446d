"""Fitting one location: stream its tiles into the run's detector and save its checkpoint (atomically).

A location's memory is its state plus what the detector keeps, whatever the grid. :func:`_fit_worker` is the
entry point of a worker process (:func:`tilead.trainer.ensemble.fit_ensemble`'s process pool, or a Ray task of
:mod:`tilead.trainer.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tilead.runtime import TileGrid, set_num_threads
from tilead.trainer.assignment import Assignment, fixed_assignment
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.checkpoints import location_metadata
from tilead.trainer.components import make_backbone, make_preprocessing
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.data import Sample
from tilead.trainer.detectors.base import create_detector, save_state
from tilead.trainer.model_table import run_assignment
from tilead.trainer.run_dir import RunPaths, read_run_record
from tilead.trainer.splits import holdout_split
from tilead.trainer.tiles import LocationTiles

log = logging.getLogger("tilead.trainer")


def fit_location(
    cfg: RunConfig,
    paths: RunPaths,
    index: int,
    samples: Sequence[Sample],
    grid: TileGrid,
    *,
    backbone: FeatureExtractor | None = None,
    progress: bool = True,
    assignment: Assignment | None = None,
) -> dict[str, Any]:
    """Fit one model's detector (on the union of its locations' tiles) and save its checkpoint.

    Args:
        cfg: Run config.
        paths: Run folder.
        index: Model index (the location index, row-major, when every location has its own model).
        samples: Good training images.
        grid: The tile grid.
        backbone: A prebuilt backbone (built from the config when None).
        progress: Show progress bars.
        assignment: Location -> model table (None: one model per location).

    Returns:
        A summary (location: the model's name, images: tiles fitted, seconds, state bytes, locations served).
    """
    start = time.perf_counter()
    table = assignment if assignment is not None else fixed_assignment("one_to_one", None, grid)
    name = table.names[index]
    group = table.groups[index]
    extractor = backbone if backbone is not None else make_backbone(cfg)
    prep = make_preprocessing(cfg, extractor)
    detector = create_detector(cfg, extractor, grid.tile_size)
    fit_samples, held = holdout_split(samples, detector.holdout_fraction, cfg.seed)
    turns = [table.transform(i) for i in group]  # each location's tiles in the model's orientation
    fit = LocationTiles(cfg, fit_samples, grid, prep, group, f"fit {name}", turns)
    holdout = LocationTiles(cfg, held, grid, prep, group, f"holdout {name}", turns)
    detector.work_dir = paths.partial(name)  # resumable progress inside the location, if the detector keeps any
    state = detector.fit(fit, holdout, progress=progress)
    seconds = time.perf_counter() - start
    meta = location_metadata(cfg, name, state.tiles, seconds)
    save_state(paths.checkpoint(name), detector, state, meta)
    shutil.rmtree(paths.partial(name), ignore_errors=True)
    with contextlib.suppress(OSError):
        paths.partial(name).parent.rmdir()  # only when no other location left progress there
    nbytes = state.nbytes
    log.info("fitted %s on %d tiles in %.1f s (state %.1f MiB)", name, state.tiles, seconds, nbytes / 2**20)
    summary = {"location": name, "images": state.tiles, "seconds": round(seconds, 3), "state_bytes": nbytes}
    if table.shared:
        summary["serves"] = [grid.location_names()[i] for i in group]
    return summary


def _fit_worker(config_path: str, root: str, index: int, samples: list[Sample], threads: int) -> dict[str, Any]:
    """Process-pool entry point: fit one model (index into the run's assignment) with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    set_num_threads(threads)
    cfg = load_config(Path(config_path))
    paths = RunPaths(Path(root))
    grid = read_run_record(paths).grid  # the grid train wrote before fitting, not re-derived from the images
    table = run_assignment(cfg, paths, grid)
    return fit_location(cfg, paths, index, samples, grid, progress=False, assignment=table)
