"""The tiled ensemble: fitting every location, and running it in PyTorch.

Fitting goes location by location (or ``train.workers`` locations at a time
in separate processes, or one Ray task per location with ``train.backend:
ray``, see :mod:`tilead.trainer.distributed`): the training images are streamed in batches, cut by
the runtime's tile kernel (exactly the Predictor's preprocessing), and only
the current location's block is streamed (:class:`LocationTiles`) into the
run's detector (:mod:`tilead.trainer.detectors`, selected by
``model.family``), which fits that location. Memory is therefore one
location's state plus what the detector keeps, whatever the grid. A location's
checkpoint is written (atomically) as soon as it is done, so an interrupted
run loses at most the location in progress and ``--resume`` skips the rest.

:func:`location_maps` is the trainer's eager PyTorch inference: per-location
raw maps ``(locations, n, h, w)`` that the runtime's ``merge_maps`` turns into
image maps (validation and evaluation both use it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import tilead
from tilead.runtime import Preprocessing, TileGrid, location_name, set_num_threads, tile_images
from tilead.runtime.timing import StageTimes, timed
from tilead.trainer.assignment import Assignment, fixed_assignment, mean_embeddings, resolve_assignment
from tilead.trainer.backbones import FeatureExtractor, build_backbone, describe_backbone
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.data import DatasetSplits, Sample
from tilead.trainer.detectors.base import (
    LocationModel,
    create_detector,
    detector_class,
    load_state,
    save_state,
)
from tilead.trainer.distributed import fit_ray, maybe_inject_fault
from tilead.trainer.images import ImageLoader
from tilead.trainer.io import read_metadata
from tilead.trainer.run_dir import RunPaths

log = logging.getLogger("tilead.trainer")


def make_backbone(cfg: RunConfig) -> FeatureExtractor:
    """The run's frozen backbone (channels-last, which is faster on CPU), checked by the detector.

    Raises:
        ValueError: If the detector rejects the backbone's layers for its settings.
    """
    b = cfg.model.backbone
    extractor = build_backbone(b.name, b.layers, b.weights)
    detector_class(cfg.model.family).check_backbone(extractor.info, cfg.model)
    return extractor.to(memory_format=torch.channels_last)


def make_preprocessing(cfg: RunConfig, extractor: FeatureExtractor) -> Preprocessing:
    """Tile preprocessing: the backbone's mean/std, RGB model input."""
    channels = 1 if cfg.data.color == "gray" else 3
    mean = extractor.info.mean[:channels]
    std = extractor.info.std[:channels]
    return Preprocessing(mean=mean, std=std, channels=channels, color_order="RGB", dtype="float32")


@dataclass(frozen=True)
class Splits:
    """Which images fit the models and which give the statistics."""

    fit: tuple[Sample, ...]
    validation: tuple[Sample, ...]
    test: tuple[Sample, ...]
    description: dict[str, Any]


def make_splits(cfg: RunConfig, splits: DatasetSplits) -> Splits:
    """Apply the validation config to the discovered dataset.

    ``holdout`` and ``synthetic`` draw the same seeded fraction of the good
    training images (at least one, and at least two are left to fit);
    ``same_as_test`` needs a test set.

    Raises:
        ValueError: If too few training images remain, or ``same_as_test`` has no test images.
    """
    train = tuple(splits.train)
    v = cfg.validation
    desc: dict[str, Any]
    if v.split == "same_as_test":
        if not splits.test:
            raise ValueError(
                "validation.split 'same_as_test': the dataset has no test images (good images only); "
                "use validation.split: synthetic (held-out good images plus synthetic defects) or holdout"
            )
        desc = {
            "split": "same_as_test",
            "note": "statistics and thresholds come from the test set (as anomalib's same_as_test); "
            "threshold-dependent test metrics are therefore optimistic",
        }
        fit, val = train, tuple(splits.test)
    else:
        n_val = max(1, round(len(train) * v.holdout_fraction))
        if len(train) - n_val < 2:
            raise ValueError(
                f"validation.holdout_fraction {v.holdout_fraction}: only {len(train)} training images, "
                f"holding out {n_val} leaves fewer than 2 to fit"
            )
        rng = np.random.default_rng(cfg.seed)
        chosen = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        val = tuple(s for i, s in enumerate(train) if i in chosen)
        fit = tuple(s for i, s in enumerate(train) if i not in chosen)
        desc = {
            "split": v.split,
            "note": f"{n_val} good training images held out (seed {cfg.seed}); they are not used for fitting"
            + ("; synthetic defects are drawn into copies of them" if v.split == "synthetic" else ""),
        }
    desc.update(
        {
            "fit_images": len(fit),
            "validation_images": len(val),
            "validation_anomalous": sum(s.label for s in val),
            "test_images": len(splits.test),
        }
    )
    return Splits(fit, val, tuple(splits.test), desc)


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
    ) -> None:
        self.cfg = cfg
        self.samples = tuple(samples)
        self.grid = grid
        self.prep = prep
        self.indices = (index,) if isinstance(index, int) else tuple(index)
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
            for index in self.indices:
                yield _to_torch(np.ascontiguousarray(tiles[index]))
            if n == 0:
                maybe_inject_fault(location_name(*self.grid.locations()[self.index]))  # a no-op unless testing


def holdout_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split fit images into ``(fit, holdout)`` for a detector that asks for a holdout.

    ``fraction`` 0 holds out nothing; otherwise a seeded ``max(1, round(n * fraction))``.

    Raises:
        ValueError: If fewer than 2 images would be left to fit.
    """
    if fraction <= 0:
        return list(samples), []
    n = len(samples)
    n_hold = max(1, round(n * fraction))
    if n - n_hold < 2:
        raise ValueError(f"detector holdout fraction {fraction}: {n} fit images, holding out {n_hold} leaves < 2")
    rng = np.random.default_rng(seed + 7919)  # independent of the validation split's draw
    chosen = set(rng.choice(n, size=n_hold, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen]


def location_metadata(cfg: RunConfig, location: str, count: int, seconds: float) -> dict[str, str]:
    """String metadata stored in a location checkpoint (:func:`save_state` adds the detector's format and family)."""
    return {
        "location": location,
        "fit_key": cfg.fit_key(),
        "images": str(count),
        "seconds": f"{seconds:.3f}",
        "tilead_version": tilead.__version__,
    }


def checkpoint_done(paths: RunPaths, cfg: RunConfig, location: str) -> bool:
    """Whether a location's checkpoint exists, loads and belongs to this config."""
    path = paths.checkpoint(location)
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except ValueError:
        log.warning("checkpoint %s is unreadable; refitting that location", path)
        return False
    return meta.get("fit_key") == cfg.fit_key()


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
    fit = LocationTiles(cfg, fit_samples, grid, prep, group, f"fit {name}")
    holdout = LocationTiles(cfg, held, grid, prep, group, f"holdout {name}")
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
    grid = cfg.grid.build(dataset_image_size(ImageLoader(cfg.data), samples))
    table = run_assignment(cfg, RunPaths(Path(root)), grid)
    return fit_location(cfg, RunPaths(Path(root)), index, samples, grid, progress=False, assignment=table)


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
        return location_embeddings(cfg, samples, grid, extractor if extractor is not None else make_backbone(cfg))

    return resolve_assignment(a.mode, a.k, cfg.seed, grid, paths.root, embed if samples else None)


def dataset_image_size(loader: ImageLoader, samples: Sequence[Sample]) -> tuple[int, int]:
    """The size every image is brought to: configured, or the common native size (checked)."""
    size = loader.output_size
    return size if size is not None else loader.probe_size(samples)


def total_threads(cfg: RunConfig) -> int:
    """Torch threads in total for this run."""
    return cfg.train.threads or len(os.sched_getaffinity(0))


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


def load_location_models(
    cfg: RunConfig,
    paths: RunPaths,
    grid: TileGrid,
    extractor: FeatureExtractor,
    *,
    export: bool = False,
    with_score: bool = False,
) -> list[LocationModel]:
    """Every location's module, from its checkpoint (``export``: the variant traced to ONNX).

    ``with_score``: the export variant also computes the detector's own image
    score (see :meth:`Detector.build`). Locations sharing a model (``grid.assignment``)
    get the same module object.

    Raises:
        FileNotFoundError: If a model has no checkpoint (training unfinished).
        ValueError: If a checkpoint belongs to another config or detector.
    """
    table = run_assignment(cfg, paths, grid)
    models = load_models(cfg, paths, grid, extractor, table, export=export, with_score=with_score)
    return [models[m] for m in table.location_model]


def load_models(
    cfg: RunConfig,
    paths: RunPaths,
    grid: TileGrid,
    extractor: FeatureExtractor,
    table: Assignment,
    *,
    export: bool = False,
    with_score: bool = False,
) -> list[LocationModel]:
    """Every model's module in ``table``'s order, from its checkpoint (see :func:`load_location_models`)."""
    detector = create_detector(cfg, extractor, grid.tile_size)
    models = []
    for name in table.names:
        path = paths.checkpoint(name)
        if not path.is_file():
            raise FileNotFoundError(f"model {name} has no checkpoint ({path}); finish training with --resume")
        state, meta = load_state(path, detector)
        if meta.get("fit_key") != cfg.fit_key():
            raise ValueError(f"checkpoint {path} was fitted with another config (fit key {meta.get('fit_key')})")
        models.append(detector.build(state, export=export, with_score=with_score))
    return models


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


def run_summary(cfg: RunConfig, grid: TileGrid, extractor: FeatureExtractor, prep: Preprocessing) -> dict[str, Any]:
    """Static description of the ensemble for ``run.json``."""
    detector = create_detector(cfg, extractor, grid.tile_size)
    return {
        "tilead_version": tilead.__version__,
        "torch_version": torch.__version__,
        "fit_key": cfg.fit_key(),
        "grid": grid.to_dict(),
        "grid_shape": [grid.rows, grid.cols],
        "locations": grid.location_names(),
        "preprocessing": prep.to_dict(),
        "backbone": describe_backbone(extractor),
        "model": detector.summary(),
    }
