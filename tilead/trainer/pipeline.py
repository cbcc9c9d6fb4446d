"""Train and evaluate runs: what ``tilead-train`` and ``tilead-eval`` call.

:func:`train` discovers the data, fits every location (resumably), computes
the normalization statistics on merged validation maps and writes the run
folder. :func:`evaluate` reloads a run, runs the test set through the eager
PyTorch ensemble and the runtime's post-processing, and writes metrics,
per-image results and overlays.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tilead.runtime import Preprocessing, TileGrid, resize_maps, set_num_threads
from tilead.runtime.stats import (
    NormalizationStats,
    image_scores_of_tiles,
    normalize_with_stats,
    postprocess_maps,
    score_images,
)
from tilead.runtime.thumbnail import ThumbnailBranch, fuser
from tilead.synthesis import SyntheticDefect, synthesize_defects
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.data import DataConfig, Sample, discover
from tilead.trainer.ensemble import (
    Splits,
    collect_maps,
    dataset_image_size,
    fit_ensemble,
    load_location_models,
    location_forward,
    location_maps,
    make_backbone,
    make_preprocessing,
    make_splits,
    run_summary,
    total_threads,
)
from tilead.trainer.images import ImageLoader
from tilead.trainer.io import atomic_write_json, atomic_write_png, atomic_write_text
from tilead.trainer.metrics import auroc, f1_at_threshold
from tilead.trainer.metrics import evaluate as compute_metrics
from tilead.trainer.report import overlay_of, write_eval_report
from tilead.trainer.run_dir import RunPaths, attach_log, detach_log, open_run, peak_rss_mib, prepare_run, read_json
from tilead.trainer.run_dir import update_run_json as _update
from tilead.trainer.thumbnail import choose_branch, fit_thumbnail, load_branch, load_thumbnail_model, thumbnail_forward
from tilead.trainer.validation import check_validation_count, compute_stats
from tilead.viz.overlays import pick_overlays

log = logging.getLogger("tilead.trainer")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    paths: RunPaths
    fitted_now: int
    seconds: float
    stats: NormalizationStats


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured and wrote."""

    out_dir: Path
    metrics: dict[str, Any]
    overlays: list[Path]


def _setup_threads(cfg: RunConfig) -> None:
    n = total_threads(cfg)
    torch.set_num_threads(n)
    set_num_threads(n)


def _grid(cfg: RunConfig, loader: ImageLoader, samples: list[Sample]) -> TileGrid:
    return cfg.grid.build(dataset_image_size(loader, samples))


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
    grid = _grid(cfg, loader, list(splits.fit) + list(splits.validation))
    splits = decode_all(loader, splits, cfg.eval.batch_size, progress)  # every image, before any fitting
    check_validation_count(len(splits.validation), v.split, v.min_images, v.force, what)
    paths = prepare_run(cfg, output, resume=resume)
    handler = attach_log(paths)
    try:
        _setup_threads(cfg)
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
        grid,
        stage=cfg.postprocess.normalization,
        weights=cfg.postprocess.weights,
        seam=cfg.postprocess.seam_smoothing(),
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


def load_stats(paths: RunPaths) -> NormalizationStats:
    """The run's normalization statistics.

    Raises:
        FileNotFoundError: If training did not finish.
    """
    if not paths.stats.is_file():
        raise FileNotFoundError(f"{paths.stats} not found: training of {paths.root} did not finish (use --resume)")
    return NormalizationStats.from_dict(read_json(paths.stats)["normalization"])


def _per_image_csv(samples: list[Sample], raw: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "defect_type", "label", "raw_score", "score", "predicted"])
    for s, r, sc, pred in zip(samples, raw, scores, labels, strict=True):
        writer.writerow([str(s.path), s.defect_type, s.label, f"{r:.6g}", f"{sc:.6g}", int(pred)])
    return buf.getvalue()


def _original_masks_each(native: DataConfig, samples: list[Sample]) -> list[np.ndarray]:
    """Each sample's ground-truth mask at its image's original size (sizes may differ): bool ``(H_i, W_i)``."""
    loader = ImageLoader(native)
    return [loader.load_mask(s) for s in samples]


def _pooled(values: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """All pixels of all images, flat."""
    return values.reshape(-1) if isinstance(values, np.ndarray) else np.concatenate([v.reshape(-1) for v in values])


def _eager_thumbnail(
    cfg: RunConfig,
    paths: RunPaths,
    extractor: FeatureExtractor,
    prep: Preprocessing,
    samples: list[Sample],
    progress: bool,
) -> tuple[ThumbnailBranch, np.ndarray]:
    """The run's thumbnail branch and its eager raw maps float32 ``(n, h, w)`` of ``samples``.

    Raises:
        ValueError: If the run's validation chose no branch of this size (validate again with ``--resume``).
    """
    branch = load_branch(paths)
    size = cfg.model.thumbnail.size if cfg.model.thumbnail is not None else None
    if branch is None or branch.size != size:
        raise ValueError(
            f"{paths.stats}: no thumbnail branch of size {size} was validated (stats.json has "
            f"{'none' if branch is None else f'size {branch.size}'}); rerun tilead-train --resume to validate it"
        )
    forward = thumbnail_forward(cfg, load_thumbnail_model(cfg, paths, extractor), prep)
    label = "evaluate (thumbnail)" if progress else None
    small, _, _ = collect_maps(cfg, samples, forward, batch_size=cfg.eval.batch_size, progress=label)
    return branch, small[0]


def _bundle_maps(
    bundle: Path, cfg: RunConfig, samples: list[Sample], grid: TileGrid, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[Sample], np.ndarray | None, np.ndarray | None, ThumbnailBranch | None]:
    """Per-location maps through the runtime Predictor (ONNX Runtime), with masks.

    Returns:
        ``(maps, masks, samples, tile_scores, thumbnail_maps, branch)`` as :func:`collect_maps`, plus the
        bundle's per-tile detector scores float32 ``(locations, n)`` when it
        deploys them (None otherwise), and for a bundle with a thumbnail branch
        its raw maps float32 ``(n, h, w)`` and the branch (else None, None).

    Raises:
        ValueError: If the bundle was exported from another run or grid.
    """
    from tilead.runtime import Predictor

    predictor = Predictor(bundle, max_batch=cfg.eval.batch_size)
    with predictor:
        source = predictor.manifest.raw.get("source", {})
        if source.get("fit_key") != cfg.fit_key() or predictor.manifest.grid != grid:
            raise ValueError(
                f"--bundle {bundle}: exported from another run (fit key {source.get('fit_key')}, "
                f"grid {predictor.manifest.grid}), not from this one (fit key {cfg.fit_key()})"
            )
        if predictor.manifest.image_score != cfg.postprocess.image_score:
            raise ValueError(
                f"--bundle {bundle}: its image score is {predictor.manifest.image_score!r}, the run's "
                f"postprocess.image_score is {cfg.postprocess.image_score!r}; export the run again"
            )
        bundle_thumb = predictor.manifest.thumbnail
        run_thumb = cfg.model.thumbnail
        if (bundle_thumb is None) != (run_thumb is None) or (
            bundle_thumb is not None and run_thumb is not None and bundle_thumb.size != run_thumb.size
        ):
            raise ValueError(
                f"--bundle {bundle}: its thumbnail branch ({'none' if bundle_thumb is None else bundle_thumb.size}) "
                f"is not the run's model.thumbnail ({'none' if run_thumb is None else run_thumb.size}); "
                "export the run again"
            )

        score_chunks: list[np.ndarray] = []
        thumbnail_chunks: list[np.ndarray] = []

        def forward(images: np.ndarray) -> np.ndarray:
            order = "GRAY" if images.shape[3] == 1 else cfg.data.channel_order
            maps, scores, thumbnail = predictor.branch_outputs(images, input_order=order)
            if scores is not None:
                score_chunks.append(scores)
            if thumbnail is not None:
                thumbnail_chunks.append(thumbnail)
            return maps

        label = "evaluate (bundle)" if progress else None
        maps, masks, kept = collect_maps(
            cfg, samples, forward, batch_size=cfg.eval.batch_size, with_masks=True, progress=label
        )
    assert masks is not None
    return (
        maps,
        masks,
        kept,
        np.concatenate(score_chunks, axis=1) if score_chunks else None,
        np.concatenate(thumbnail_chunks, axis=0) if thumbnail_chunks else None,
        predictor.manifest.thumbnail,
    )


def _override_run_config(paths: RunPaths, cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The run's config with ``overrides`` applied, refusing any that changes what was fitted."""
    changed = load_config(paths.config, overrides)
    if changed.fit_key() != cfg.fit_key():
        raise ValueError(
            f"--set {', '.join(overrides)}: changes what the run's locations were fitted on (data, grid, model or "
            "seed); evaluation can override eval.* and test-set keys only; train a new run for the others"
        )
    return changed


def good_only_metrics(predicted: np.ndarray, masks: np.ndarray, in_holdout: np.ndarray) -> dict[str, float]:
    """False-alarm rates of good images (no defective image to measure misses on).

    Args:
        predicted: bool ``(n,)`` NG decisions.
        masks: bool ``(n, H, W)`` predicted anomalous pixels.
        in_holdout: bool ``(n,)``: held-out training images (the rest are test images).

    Returns:
        ``false_alarm_rate`` and ``false_alarms`` over all images, per group (``_test_good`` /
        ``_holdout``, where the group has images) and ``pixel_false_alarm_rate``.
    """
    out: dict[str, float] = {
        "good_images": float(predicted.size),
        "false_alarms": float(predicted.sum()),
        "false_alarm_rate": float(predicted.mean()),
        "pixel_false_alarm_rate": float(masks.mean()),
    }
    for name, group in (("test_good", ~in_holdout), ("holdout", in_holdout)):
        if group.any():
            out[f"good_images_{name}"] = float(group.sum())
            out[f"false_alarms_{name}"] = float(predicted[group].sum())
            out[f"false_alarm_rate_{name}"] = float(predicted[group].mean())
    return out


def _evaluate_good_only(
    paths: RunPaths,
    cfg: RunConfig,
    out: Path,
    kept: list[Sample],
    held: set[Path],
    result: Any,
    stats: NormalizationStats,
    grid: TileGrid,
    bundle: Path | None,
    start: float,
    inference_s: float,
) -> EvalResult:
    """Write the report of a dataset of good images only: false alarms instead of F1 / AUROC."""
    in_holdout = np.array([s.path in held for s in kept], dtype=bool)
    metrics = good_only_metrics(result.labels.astype(bool), result.masks.astype(bool), in_holdout)
    report: dict[str, Any] = {
        "run": str(paths.root),
        "config": cfg.name,
        "good_only": True,
        "note": "no defective test image: false alarms on good images only (misses cannot be measured). "
        "'test_good': good test images (out of sample); 'holdout': held-out training images, never fitted, "
        "but the thresholds were chosen on their scores (in-sample for the thresholds)"
        + ("; with validation.split same_as_test the test images set the thresholds too" if not held else ""),
        "grid": grid.to_dict(),
        "grid_shape": [grid.rows, grid.cols],
        "inference": f"runtime.Predictor on bundle {bundle}" if bundle is not None else "eager PyTorch",
        "normalization": stats.stage,
        "image_threshold": float(stats.image_threshold),
        "validation": read_json(paths.stats).get("validation", {}).get("split", {}),
        "test_images": len(kept),
        "test_anomalous": 0,
        "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
        "timings": {"inference_s": round(inference_s, 2), "eval_s": round(time.perf_counter() - start, 2)},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "per_image.csv", _per_image_csv(kept, result.raw_scores, result.scores, result.labels))
    _update(paths, last_eval={"out": str(out), **report["metrics"]})
    log.info("eval (good images only): %s", ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()))
    return EvalResult(out, report, [])


def evaluate(
    root: Path,
    out_dir: Path | None = None,
    *,
    bundle: Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    report_page: bool | Path = False,
) -> EvalResult:
    """Evaluate a trained run on its test set.

    Threshold-free metrics (AUROC, AUPRO) are computed on the merged maps
    before normalization (for stage ``tile`` after the per-tile normalization,
    which is part of the merge), image scores being each map's max or, with
    ``postprocess.image_score: detector``, the detector's own score; F1 uses
    the deployed decisions (labels and masks after normalization).

    Args:
        root: Run folder.
        out_dir: Where to write (default ``RUN/eval``, ``RUN/eval_bundle`` with a bundle).
        bundle: Evaluate this run's exported bundle through ``runtime.Predictor``
            (ONNX Runtime and the kernels) instead of the eager PyTorch models.
        progress: Show progress bars.
        overrides: Dotted config keys to replace for this evaluation (``eval.*``,
            ``data.*`` such as ``data.max_test_images``); keys that change what
            was fitted are refused.
        report_page: Also write the HTML report (:mod:`tilead.viz.report`): True for
            ``OUT/report.html``, or the page's path.

    Returns:
        Metrics and the written overlays.

    Raises:
        ValueError: For an override that changes what the locations were fitted on.
    """
    start = time.perf_counter()
    paths, cfg = open_run(root)
    if overrides:
        cfg = _override_run_config(paths, cfg, overrides)
    default_out = paths.root / ("eval_bundle" if bundle is not None else "eval")
    out = Path(out_dir) if out_dir is not None else default_out
    handler = attach_log(paths)
    try:
        _setup_threads(cfg)
        stats = load_stats(paths)
        dataset = discover(cfg.data)
        test = list(dataset.test)
        good_only = not any(s.label for s in test)
        held: set[Path] = set()
        if good_only:
            # No defective test image: measure false alarms on good images, the test set's and the held-out ones
            # (never fitted; their scores did set the thresholds).
            if cfg.validation.split != "same_as_test":
                validation = make_splits(cfg, dataset).validation
                held = {s.path for s in validation}
                test += [s for s in validation if s.path not in {t.path for t in test}]
            if not test:
                raise ValueError(
                    "evaluation: the dataset has no test images and the run held out no good images "
                    "(validation.split same_as_test); add test images"
                )
        loader = ImageLoader(cfg.data)
        grid = _grid(cfg, loader, test)
        t_inf = time.perf_counter()
        masks: np.ndarray | None
        detector_scores: list[np.ndarray] = []
        tile_scores: np.ndarray | None = None
        branch: ThumbnailBranch | None = None
        thumbnail_maps: np.ndarray | None = None
        if bundle is not None:
            maps, masks, kept, tile_scores, thumbnail_maps, branch = _bundle_maps(
                Path(bundle), cfg, test, grid, progress
            )
        else:
            extractor = make_backbone(cfg)
            prep = make_preprocessing(cfg, extractor)
            models = load_location_models(cfg, paths, grid, extractor)
            t_inf = time.perf_counter()
            maps, masks, kept = location_maps(
                cfg,
                models,
                test,
                grid,
                prep,
                batch_size=cfg.eval.batch_size,
                with_masks=True,
                progress="evaluate" if progress else None,
                scores=detector_scores,
            )
            tile_scores = np.concatenate(detector_scores, axis=1) if detector_scores else None
            if cfg.model.thumbnail is not None:
                branch, thumbnail_maps = _eager_thumbnail(cfg, paths, extractor, prep, kept, progress)
        inference_s = time.perf_counter() - t_inf
        assert masks is not None
        own = None if tile_scores is None else image_scores_of_tiles(tile_scores)  # the detector's image scores
        deployed = own if cfg.postprocess.image_score == "detector" else None
        # The config allows 'detector' only for detectors with a score; _bundle_maps checks the bundle's choice.
        assert deployed is not None or cfg.postprocess.image_score == "max"
        merged, result = postprocess_maps(
            maps,
            grid,
            stats,
            weights=cfg.postprocess.weights,
            seam=cfg.postprocess.seam_smoothing(),
            fuse=None if branch is None or thumbnail_maps is None else fuser(branch, thumbnail_maps),
        )
        broken = [f"{kept[i].path}: {result.error(i)}" for i in range(len(kept)) if result.error(i) is not None]
        if deployed is not None:
            broken += [f"{kept[i].path}: non-finite detector score" for i in np.flatnonzero(~np.isfinite(deployed))]
        if broken:  # metrics of NaN scores would be meaningless: say which images, stop
            raise ValueError(
                f"evaluation: the model output is not finite for {len(broken)} test image(s), e.g. "
                + "; ".join(broken[:3])
            )
        # Per image: merged map, deployed map, deployed mask, ground truth (arrays, or lists for mixed sizes).
        merged_maps: np.ndarray | list[np.ndarray] = merged
        pred_maps: np.ndarray | list[np.ndarray] = result.maps
        pred_masks: np.ndarray | list[np.ndarray] = result.masks
        gt_masks: np.ndarray | list[np.ndarray] = masks
        evaluated_at: list[int] | str = list(result.maps.shape[1:])
        native = cfg.data.model_copy(update={"image_size": None})
        if cfg.eval.resolution == "original" and cfg.data.image_size is not None:
            # Judge downscaled configs at the original resolution: upsample the maps, use the original masks.
            gt = _original_masks_each(native, kept)
            if len({m.shape for m in gt}) == 1:
                masks = gt_masks = np.stack(gt)
                merged = merged_maps = resize_maps(merged, masks.shape[1:])
                result = normalize_with_stats(merged, stats)
                pred_maps, pred_masks, evaluated_at = result.maps, result.masks, list(masks.shape[1:])
            else:  # images of different sizes: each at its own
                merged_maps = [resize_maps(merged[i : i + 1], m.shape)[0] for i, m in enumerate(gt)]
                parts = [normalize_with_stats(m[None], stats) for m in merged_maps]
                gt_masks, evaluated_at = gt, "original (mixed sizes)"
                pred_maps, pred_masks = [r.maps[0] for r in parts], [r.masks[0] for r in parts]
                flat_masks = np.concatenate([m.reshape(-1) for m in pred_masks])[None]  # pooled, for rates
                result = dataclasses.replace(
                    result,
                    maps=np.concatenate([m.reshape(-1) for m in pred_maps])[None],
                    masks=flat_masks,
                    raw_scores=np.concatenate([r.raw_scores for r in parts]),
                    scores=np.concatenate([r.scores for r in parts]),
                    labels=np.concatenate([r.labels for r in parts]),
                )
        if deployed is not None:
            result = score_images(result, deployed, stats)
        labels = np.array([s.label for s in kept], dtype=bool)
        map_max = np.array([m.max() for m in merged_maps], dtype=np.float32)
        raw_scores = map_max if deployed is None else deployed
        page = None if report_page is False else out / "report.html" if report_page is True else Path(report_page)

        def load_at_eval_size(sample: Sample) -> np.ndarray:
            # A fresh loader per image: at original resolution the images may differ in size.
            return ImageLoader(native if cfg.eval.resolution == "original" else cfg.data).load_image(sample)

        if good_only:
            done = _evaluate_good_only(
                paths, cfg, out, kept, held, result, stats, grid, bundle, start, time.perf_counter() - t_inf
            )
            if page is not None:
                groups = [f"{s.defect_type} (held out)" if s.path in held else s.defect_type for s in kept]
                write_eval_report(page, metrics_json=done.metrics, samples=kept, load_image=load_at_eval_size,
                                  channel_order=cfg.data.channel_order, result=result, maps=pred_maps,
                                  masks=pred_masks, merged=None, truth=gt_masks,
                                  raw_scores=raw_scores, stats=stats, group_names=groups)  # fmt: skip
                log.info("eval: report %s", page)
            return done
        metrics = compute_metrics(
            raw_scores,
            labels,
            merged_maps,
            gt_masks,
            image_threshold=float(stats.image_threshold),
            pixel_threshold=float(stats.pixel_threshold),
            fpr_limit=cfg.eval.fpr_limit,
        )
        if deployed is not None:
            metrics["image_auroc_map_max"] = auroc(map_max, labels)  # what the map's max would have given
        elif own is not None:
            # The detector's own image score (PatchCore's reweighted nearest-neighbour distance, max over the
            # image's tiles), not deployed by this config (postprocess.image_score 'max'): for comparison.
            metrics["image_auroc_detector_score"] = auroc(own, labels)
        # F1 of the deployed decisions (normalized labels / masks).
        metrics["image_f1"] = f1_at_threshold(result.labels.astype(np.float32), labels, 0.5)
        metrics["pixel_f1"] = f1_at_threshold(_pooled(pred_masks).view(np.uint8), _pooled(gt_masks), 0.5)
        n_overlays = min(cfg.eval.overlays, len(kept))
        written: list[Path] = []
        for i in pick_overlays([s.defect_type for s in kept], n_overlays):
            s = kept[i]
            pic = overlay_of(load_at_eval_size(s), s, cfg.data.channel_order, pred_maps[i], pred_masks[i], gt_masks[i],
                             float(result.scores[i]), bool(result.labels[i]), float(raw_scores[i]))  # fmt: skip
            path = out / "overlays" / f"{s.defect_type}_{s.path.stem}.png"
            atomic_write_png(path, pic)
            written.append(path)
        seconds = time.perf_counter() - start
        report: dict[str, Any] = {
            "run": str(paths.root),
            "config": cfg.name,
            "grid": grid.to_dict(),
            "grid_shape": [grid.rows, grid.cols],
            "backbone": cfg.model.backbone.name,
            "inference": f"runtime.Predictor on bundle {bundle}" if bundle is not None else "eager PyTorch",
            "evaluated_at": evaluated_at,
            "normalization": stats.stage,
            "image_score": cfg.postprocess.image_score,
            "validation": read_json(paths.stats).get("validation", {}).get("split", {}),
            "test_images": len(kept),
            "test_anomalous": int(labels.sum()),
            "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
            "note": "AUROC/AUPRO on merged maps before normalization; F1 on the deployed (normalized) decisions",
            "timings": {
                "inference_s": round(inference_s, 2),
                "inference_ms_per_image": round(1e3 * inference_s / max(1, len(kept)), 1),
                "eval_s": round(seconds, 2),
            },
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        atomic_write_json(out / "metrics.json", report)
        atomic_write_text(out / "per_image.csv", _per_image_csv(kept, result.raw_scores, result.scores, result.labels))
        _update(paths, last_eval={"out": str(out), **report["metrics"]})
        log.info("eval: %s", ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()))
        if page is not None:
            write_eval_report(page, metrics_json=report, samples=kept, load_image=load_at_eval_size,
                              channel_order=cfg.data.channel_order, result=result, maps=pred_maps,
                              masks=pred_masks, merged=merged_maps, truth=gt_masks,
                              raw_scores=raw_scores, stats=stats)  # fmt: skip
            log.info("eval: report %s", page)
        return EvalResult(out, report, written)
    finally:
        detach_log(handler)
