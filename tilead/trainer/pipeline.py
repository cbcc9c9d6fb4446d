"""Train runs: what ``tilead-train`` calls.

:func:`train` discovers the data, fits every location (resumably), computes
the normalization statistics on merged validation maps and writes the run
folder. Evaluation is :mod:`tilead.trainer.evaluation`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tilead.runtime import Preprocessing, TileGrid
from tilead.runtime.postprocessor import (
    NormalizationStats,
    image_scores_of_tiles,
)
from tilead.runtime.thumbnail import fuser
from tilead.synthesis import SyntheticDefect, synthesize_defects
from tilead.trainer.assignment import load_assignment
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.checkpoints import load_location_models
from tilead.trainer.components import (
    make_backbone,
    make_preprocessing,
    run_grid,
    run_summary,
    setup_threads,
)
from tilead.trainer.config import ConfigError, RunConfig, load_config, save_config
from tilead.trainer.data import Sample, discover
from tilead.trainer.ensemble import fit_ensemble
from tilead.trainer.images import ImageLoader
from tilead.trainer.inference import location_forward
from tilead.trainer.io import atomic_write_json, atomic_write_png
from tilead.trainer.run_dir import RunPaths, attach_log, detach_log, peak_rss_mib, prepare_run, read_json
from tilead.trainer.run_dir import update_run_json as _update
from tilead.trainer.splits import Splits, make_splits
from tilead.trainer.thumbnail import choose_branch, fit_thumbnail, load_thumbnail_model, thumbnail_forward
from tilead.trainer.validation import check_validation_count, compute_stats

log = logging.getLogger("tilead.trainer")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    paths: RunPaths
    fitted_now: int
    seconds: float
    stats: NormalizationStats


def train(cfg: RunConfig, output: Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fit a tiled ensemble and its validation statistics.

    Args:
        cfg: Validated config.
        output: Run folder.
        resume: Continue an interrupted run in ``output``.
        progress: Show progress bars.

    Returns:
        The run folder, how many locations were fitted now, time and stats.
    """
    start = time.perf_counter()
    # Data and grid problems stop the run before anything is written.
    dataset = discover(cfg.data)
    splits = make_splits(cfg, dataset)
    v = cfg.validation
    good_only = v.split != "same_as_test"
    what = "good validation images" if good_only else "validation images"
    check_validation_count(len(splits.validation), v.split, v.min_images, v.force, what)  # before anything is written
    loader = ImageLoader(cfg.data)
    grid = run_grid(cfg, loader, list(splits.fit) + list(splits.validation))
    splits = decode_all(loader, splits, cfg.eval.batch_size, progress)  # every image, before any fitting
    check_validation_count(len(splits.validation), v.split, v.min_images, v.force, what)
    saved = saved_normalization(output) if resume else None  # before prepare_run writes this config over it
    paths = prepare_run(cfg, output, resume=resume)
    handler = attach_log(paths)
    try:
        setup_threads(cfg)
        log.info("train: config %s, output %s, resume=%s", cfg.name, paths.root, resume)
        extractor = make_backbone(cfg)
        prep = make_preprocessing(cfg, extractor)
        summary = run_summary(cfg, grid, extractor, prep)
        summary["splits"] = splits.description
        _update(paths, status="fitting", **summary)
        log.info(
            "grid %dx%d of %s over %s (%s); %d fit images, validation: %s",
            grid.rows,
            grid.cols,
            grid.tile_size,
            grid.image_size,
            grid.edge,
            len(splits.fit),
            splits.description["split"],
        )
        t_fit = time.perf_counter()
        fitted = fit_ensemble(cfg, paths, splits.fit, grid, progress=progress)
        thumb_fit = None
        if cfg.model.thumbnail is not None:
            thumb_fit = fit_thumbnail(cfg, paths, splits.fit, extractor, prep, progress=progress)
        fit_seconds = time.perf_counter() - t_fit
        cfg, group_sizes = resolve_normalization(cfg, paths, grid)  # 'auto' for clusters: their sizes are known now
        normalization_warning = cfg.image_normalization_warning(group_sizes)
        for note in (normalization_change(cfg, saved, group_sizes), normalization_warning):
            if note is not None:
                log.warning("%s", note)
        previous = read_json(paths.run_json).get("fit_locations", {})
        previous.update({f["location"]: f for f in fitted})
        _update(
            paths, status="validating", fit_locations=previous, **({"fit_thumbnail": thumb_fit} if thumb_fit else {})
        )

        try:
            stats, info, labels, synthetic, forced, val_seconds = _validate(
                cfg, paths, grid, extractor, prep, loader, splits, progress, what
            )
        except Exception as err:
            _update(paths, status="validation_failed", error=f"{type(err).__name__}: {err}")
            log.error(
                "validation failed (%s); the fitted locations are kept: fix the cause and rerun with --resume "
                "to validate again without refitting",
                err,
            )
            raise
        description = dict(splits.description)
        description.update(
            {
                "validation_images": int(labels.size),
                "validation_good": int((~labels).sum()),
                "validation_anomalous": int(labels.sum()),
                "false_alarm_estimate": info["false_alarm_estimate"],
            }
        )
        if synthetic is not None:
            description["synthetic"] = synthetic
        if forced:
            description["warning"] = forced
            log.warning("%s", forced)
        info["split"] = description
        info["normalization_default"] = cfg.grid.assignment.default_normalization(group_sizes)  # what 'auto' gives
        if group_sizes is not None:
            info["group_sizes"] = list(group_sizes)
        if normalization_warning is not None:
            info["normalization_warning"] = normalization_warning
        branch = info.pop("thumbnail_branch", None)
        atomic_write_json(
            paths.stats,
            {"normalization": stats.to_dict(), "validation": info, **({"thumbnail": branch} if branch else {})},
        )
        seconds = time.perf_counter() - start
        _update(
            paths,
            status="trained",
            error=None,
            splits=description,
            timings={
                "fit_s": round(fit_seconds, 2),
                "validation_s": round(val_seconds, 2),
                "train_s": round(seconds, 2),
            },
            peak_rss_mib_train=round(peak_rss_mib(), 1),
            skipped_files=[[str(p), why] for p, why in loader.skipped],
        )
        log.info("train: done in %.1f s (fit %.1f s, validation %.1f s)", seconds, fit_seconds, val_seconds)
        return TrainResult(paths, len(fitted), seconds, stats)
    finally:
        detach_log(handler)


def saved_normalization(output: Path) -> str | None:
    """The normalization stage of the run config saved in ``output``.

    None: no run there, an unreadable config (left to :func:`~tilead.trainer.run_dir.prepare_run`, which reports
    it), or a stage not resolved yet (``auto``: a ``cluster`` run stopped before its fit was done).
    """
    path = RunPaths(Path(output)).config
    if not path.is_file():
        return None
    try:
        stage = load_config(path).postprocess.normalization
    except (ConfigError, OSError):
        return None
    return None if stage == "auto" else stage


def resolve_normalization(cfg: RunConfig, paths: RunPaths, grid: TileGrid) -> tuple[RunConfig, tuple[int, ...] | None]:
    """``postprocess.normalization: auto`` of a fitted ``cluster`` run resolved from its clusters' sizes.

    Clusters made from the data (``cluster`` with ``k >= 2``) are known once the fit has written
    ``assignment.json``: ``auto`` then becomes ``tile`` where their models serve different numbers of
    locations, else ``image`` (:meth:`~tilead.trainer.config.AssignmentConfig.default_normalization`), and the
    run's ``config.yaml`` is saved again with the stage, as for every other assignment.

    Returns:
        The config (resolved) and the locations each model serves (None unless the groups come from the data).

    Raises:
        RuntimeError: If a cluster run has no ``assignment.json`` after its fit.
    """
    if not cfg.grid.assignment.groups_from_data:
        return cfg, None
    assignment = load_assignment(paths.root, grid.num_locations)
    if assignment is None:
        raise RuntimeError(f"{paths.root}: the fit wrote no assignment.json for grid.assignment cluster")
    sizes = tuple(len(g) for g in assignment.groups)
    if cfg.postprocess.normalization != "auto":
        return cfg, sizes
    stage = cfg.grid.assignment.default_normalization(sizes)
    assert stage is not None  # the sizes are known
    resolved = cfg.with_normalization(stage)
    save_config(resolved, paths.config)
    equal = "the same number of" if stage == "image" else "different numbers of"
    log.info(
        "postprocess.normalization auto -> %s: the %d clusters serve %s locations (%s)",
        stage,
        len(sizes),
        equal,
        ", ".join(str(n) for n in sizes),
    )
    return resolved, sizes


def normalization_change(cfg: RunConfig, saved: str | None, group_sizes: Sequence[int] | None = None) -> str | None:
    """A note when ``--resume`` validates a run again with another normalization stage than it had, else None.

    Args:
        cfg: The resolved config the run is validated with now.
        saved: The stage in the run's saved ``config.yaml`` (:func:`saved_normalization`), None for a new run.
        group_sizes: A cluster run's group sizes (:func:`resolve_normalization`): what ``auto`` gives depends
            on them. A stage equal to what ``auto`` gives is said to come from it.

    Saved run configs hold the resolved stage, so a run validated with ``image`` keeps it when resumed with its
    own ``config.yaml``; a config file whose ``auto`` resolves differently (a ``cluster`` run validated with
    ``image`` before ``auto`` existed, if its clusters differ in size) changes it, and this note says so.
    """
    new = cfg.postprocess.normalization
    if saved is None or saved == new:
        return None
    why = (
        f"the default 'auto' gives {new!r} for grid.assignment {cfg.grid.assignment.mode}"
        if new == cfg.grid.assignment.default_normalization(group_sizes)
        else "set in this config"
    )
    return (
        f"--resume: postprocess.normalization changes from {saved!r} (the run's saved config.yaml) to {new!r} "
        f"({why}); the statistics are measured again with {new!r}, so bundles exported before no longer match "
        f"the run. To keep {saved!r}: resume with --config RUN/config.yaml or --set postprocess.normalization={saved}"
    )


def _validate(
    cfg: RunConfig,
    paths: RunPaths,
    grid: TileGrid,
    extractor: FeatureExtractor,
    prep: Preprocessing,
    loader: ImageLoader,
    splits: Splits,
    progress: bool,
    what: str,
) -> tuple[NormalizationStats, dict[str, Any], np.ndarray, dict[str, Any] | None, str, float]:
    """Validation maps (held-out or test images, plus synthetic defects) to statistics.

    Returns:
        ``(stats, info, labels, synthetic summary or None, forced-warning, seconds)``.
    """
    v = cfg.validation
    t_val = time.perf_counter()
    models = load_location_models(cfg, paths, grid, extractor)
    tile_scores: list[np.ndarray] = []
    forward = location_forward(
        cfg, models, grid, prep, scores=tile_scores if cfg.postprocess.image_score == "detector" else None
    )
    images, masks, kept = _load_all(loader, splits.validation, cfg.eval.batch_size, progress)
    labels = np.array([s.label for s in kept], dtype=bool)
    forced = check_validation_count(len(kept), v.split, v.min_images, v.force, what)  # after skipped files
    synthetic: dict[str, Any] | None = None
    if cfg.validation.split == "synthetic":
        defects = synthesize_defects(
            list(images),
            seed=cfg.seed,
            per_image=cfg.validation.synthetic_per_image,
            kinds=cfg.validation.synthetic_kinds,
            tile_size=grid.tile_size,
        )
        synthetic = synthetic_summary(defects, grid.tile_size, cfg.validation.synthetic_per_image)
        synthetic["examples"] = _save_examples(paths, defects, cfg.validation.synthetic_examples, cfg)
        images = np.concatenate([images, np.stack([d.image for d in defects])], axis=0)
        masks = np.concatenate([masks, np.stack([d.mask for d in defects])], axis=0)
        labels = np.concatenate([labels, np.ones(len(defects), dtype=bool)])
        del defects
    maps = _run_batches(forward, images, cfg.eval.batch_size, "validation" if progress else None)
    fuse: Callable[[np.ndarray], np.ndarray] | None = None
    chosen: dict[str, Any] = {}
    if cfg.model.thumbnail is not None:  # the thumbnail branch: its maps, then its statistics and fusion on merge
        small = thumbnail_forward(cfg, load_thumbnail_model(cfg, paths, extractor), prep)
        thumbnail_maps = _run_batches(
            small, images, cfg.eval.batch_size, "validation (thumbnail)" if progress else None
        )

        def fuse(merged: np.ndarray) -> np.ndarray:
            branch, how = choose_branch(cfg, merged, thumbnail_maps[0], masks, labels)
            chosen.update(branch=branch, info=how)
            return fuser(branch, thumbnail_maps[0])(merged)

    del images
    stats, info = compute_stats(
        maps,
        masks,
        labels,
        cfg.postprocess.processor(grid),
        stage=cfg.postprocess.stage,
        good_quantile=cfg.validation.good_quantile,
        image_scores=image_scores_of_tiles(np.concatenate(tile_scores, axis=1)) if tile_scores else None,
        target_false_alarm=v.target_false_alarm if v.split == "synthetic" else None,
        pixel_false_positive=v.pixel_false_positive if v.split == "synthetic" else None,
        fuse=fuse,
    )
    if chosen:
        info["thumbnail"] = chosen["info"]
        info["thumbnail_branch"] = chosen["branch"].to_dict()  # stats.json's "thumbnail" (train() moves it there)
    val_seconds = time.perf_counter() - t_val
    return stats, info, labels, synthetic, forced, val_seconds


def decode_all(loader: ImageLoader, splits: Splits, batch_size: int, progress: bool) -> Splits:
    """Decode every fit and validation image (and mask) once, before any location is fitted.

    A bad file stops the run here, before the run folder is written; with ``data.skip_bad_files`` it is
    listed once in ``loader.skipped`` and left out of both lists (the counts in the split description
    follow), so fitting and validation see the same files.

    Raises:
        DatasetError: For an unreadable file (without ``skip_bad_files``).
        ValueError: If fewer than 2 fit images are left.
    """
    items = list(splits.fit) + list(splits.validation)
    for _ in loader.iter_batches(items, batch_size, with_masks=True, progress="decode images" if progress else None):
        pass
    if not loader.skipped:
        return splits
    bad = {p for p, _ in loader.skipped}
    fit = tuple(s for s in splits.fit if s.path not in bad)
    validation = tuple(s for s in splits.validation if s.path not in bad)
    if len(fit) < 2:
        raise ValueError(f"only {len(fit)} readable training images left after skipping {len(bad)} bad files")
    description = {
        **splits.description,
        "fit_images": len(fit),
        "validation_images": len(validation),
        "validation_anomalous": sum(s.label for s in validation),
        "skipped_files": len(bad),
    }
    return dataclasses.replace(splits, fit=fit, validation=validation, description=description)


def _load_all(
    loader: ImageLoader, samples: Sequence[Sample], batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[Sample]]:
    """Decode ``samples`` with their masks: uint8 ``(n, H, W, C)``, bool ``(n, H, W)``, the samples kept.

    Raises:
        ValueError: If no image could be loaded.
    """
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kept: list[Sample] = []
    label = "decode validation" if progress else None
    for batch in loader.iter_batches(samples, batch_size, with_masks=True, progress=label):
        images.append(batch.images)
        assert batch.masks is not None
        masks.append(batch.masks)
        kept.extend(batch.samples)
    if not kept:
        raise ValueError("validation: none of the validation images could be loaded")
    return np.concatenate(images, axis=0), np.concatenate(masks, axis=0), kept


def _run_batches(
    forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int, progress: str | None
) -> np.ndarray:
    """Maps float32 ``(locations, n, h, w)`` of uint8 ``images`` ``(n, H, W, C)``, ``batch_size`` at a time."""
    starts = range(0, images.shape[0], batch_size)
    chunks = [
        forward(np.ascontiguousarray(images[i : i + batch_size]))
        for i in tqdm(starts, desc=progress or "", unit="batch", disable=progress is None)
    ]
    return np.concatenate(chunks, axis=1)


def synthetic_summary(defects: Sequence[SyntheticDefect], tile_size: tuple[int, int], per_image: int) -> dict[str, Any]:
    """Counts per kind and the size distribution of synthetic defects (for ``stats.json`` / ``run.json``)."""
    areas = np.array([d.area for d in defects], dtype=np.float64)
    tile_area = float(tile_size[0] * tile_size[1])
    qs = (0.0, 0.1, 0.5, 0.9, 1.0)
    names = ("min", "p10", "median", "p90", "max")
    return {
        "generator": "tilead.synthesis.synthesize_defects",
        "defects": len(defects),
        "per_image": per_image,
        "kinds": dict(Counter(d.kind for d in defects)),
        "area_px": {n: round(float(np.quantile(areas, q)), 1) for n, q in zip(names, qs, strict=True)},
        "area_of_tile": {n: round(float(np.quantile(areas, q)) / tile_area, 6) for n, q in zip(names, qs, strict=True)},
        "mask": "exact: the pixels the defect changed in at least one channel",
    }


def _save_examples(paths: RunPaths, defects: Sequence[SyntheticDefect], count: int, cfg: RunConfig) -> list[str]:
    """Write up to ``count`` defects (image and mask PNG; kinds interleaved) under ``RUN/synthetic_examples``."""
    folder = paths.root / "synthetic_examples"
    by_kind: dict[str, list[int]] = {}
    for i, d in enumerate(defects):
        by_kind.setdefault(d.kind, []).append(i)
    order = [i for group in zip_longest(*by_kind.values()) for i in group if i is not None]
    written: list[str] = []
    for i in order[:count]:
        d = defects[i]
        image = d.image
        if image.shape[2] == 3 and cfg.data.channel_order == "RGB":
            image = image[..., ::-1]
        stem = f"{len(written):02d}_{d.kind}_src{d.source}"
        atomic_write_png(folder / f"{stem}.png", np.ascontiguousarray(image))
        atomic_write_png(folder / f"{stem}_mask.png", d.mask.astype(np.uint8) * 255)
        written.append(f"{folder.name}/{stem}.png")
    return written


def validation_summary(stats_path: Path) -> str:
    """One line for people: the split, its image counts and the false-alarm estimate (from ``stats.json``)."""
    split = read_json(stats_path).get("validation", {}).get("split", {})
    fa = split.get("false_alarm_estimate", {})
    text = (
        f"{split.get('split', '?')}: {split.get('validation_good', '?')} good + "
        f"{split.get('validation_anomalous', '?')} anomalous images"
    )
    syn = split.get("synthetic")
    if syn:
        text += " (synthetic: " + ", ".join(f"{k} {n}" for k, n in syn["kinds"].items()) + ")"
    if fa.get("false_alarm_rate") is not None:
        text += (
            f"; false alarms on good parts ~{fa['false_alarm_rate']:.1%} ({fa['false_alarms']}/{fa['good_images']}, "
            "in-sample estimate)"
        )
    if fa.get("miss_rate") is not None:
        text += f"; misses {fa['misses']}/{fa['anomalous_images']}"
    if split.get("warning"):
        text += f"; WARNING {split['warning']}"
    return text
