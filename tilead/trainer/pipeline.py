"""Train and evaluate runs: what ``tilead-train`` and ``tilead-eval`` call.

:func:`train` discovers the data, fits every location (resumably), computes
the normalization statistics on merged validation maps and writes the run
folder. :func:`evaluate` reloads a run, runs the test set through the eager
PyTorch ensemble and the runtime's post-processing, and writes metrics,
per-image results and overlays.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from tilead.runtime import TileGrid, resize_maps, set_num_threads
from tilead.runtime.stats import (
    NormalizationStats,
    image_scores_of_tiles,
    normalize_with_stats,
    postprocess_maps,
    score_images,
)
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.data import Sample, discover
from tilead.trainer.ensemble import (
    collect_maps,
    dataset_image_size,
    fit_ensemble,
    load_location_models,
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
from tilead.trainer.overlays import overlay, pick_overlays
from tilead.trainer.run_dir import RunPaths, attach_log, detach_log, open_run, peak_rss_mib, prepare_run, read_json
from tilead.trainer.run_dir import update_run_json as _update
from tilead.trainer.validation import compute_stats

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
    loader = ImageLoader(cfg.data)
    grid = _grid(cfg, loader, list(splits.fit) + list(splits.validation))
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
        fit_seconds = time.perf_counter() - t_fit
        previous = read_json(paths.run_json).get("fit_locations", {})
        previous.update({f["location"]: f for f in fitted})
        _update(paths, status="validating", fit_locations=previous)

        t_val = time.perf_counter()
        models = load_location_models(cfg, paths, grid, extractor)
        tile_scores: list[np.ndarray] = []
        maps, masks, kept = location_maps(
            cfg,
            models,
            splits.validation,
            grid,
            prep,
            batch_size=cfg.eval.batch_size,
            with_masks=True,
            progress="validation" if progress else None,
            scores=tile_scores if cfg.postprocess.image_score == "detector" else None,
        )
        assert masks is not None
        labels = np.array([s.label for s in kept], dtype=bool)
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
        )
        val_seconds = time.perf_counter() - t_val
        info["split"] = splits.description
        atomic_write_json(paths.stats, {"normalization": stats.to_dict(), "validation": info})
        seconds = time.perf_counter() - start
        _update(
            paths,
            status="trained",
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


def _original_masks(loader: ImageLoader, samples: list[Sample], batch_size: int) -> np.ndarray:
    """Ground-truth masks at the images' original (common) size: bool ``(n, H, W)``."""
    chunks = [b.masks for b in loader.iter_batches(samples, batch_size, with_masks=True) if b.masks is not None]
    masks = np.concatenate(chunks, axis=0)
    if masks.shape[0] != len(samples):
        raise ValueError(f"evaluation: {len(samples) - masks.shape[0]} images could not be re-read at original size")
    return masks


def _bundle_maps(
    bundle: Path, cfg: RunConfig, samples: list[Sample], grid: TileGrid, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[Sample], np.ndarray | None]:
    """Per-location maps through the runtime Predictor (ONNX Runtime), with masks.

    Returns:
        ``(maps, masks, samples, tile_scores)`` as :func:`collect_maps`, plus the
        bundle's per-tile detector scores float32 ``(locations, n)`` when it
        deploys them (None otherwise).

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

        score_chunks: list[np.ndarray] = []

        def forward(images: np.ndarray) -> np.ndarray:
            order = "GRAY" if images.shape[3] == 1 else cfg.data.channel_order
            maps, scores = predictor.location_outputs(images, input_order=order)
            if scores is not None:
                score_chunks.append(scores)
            return maps

        label = "evaluate (bundle)" if progress else None
        maps, masks, kept = collect_maps(
            cfg, samples, forward, batch_size=cfg.eval.batch_size, with_masks=True, progress=label
        )
    assert masks is not None
    return maps, masks, kept, np.concatenate(score_chunks, axis=1) if score_chunks else None


def _override_run_config(paths: RunPaths, cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The run's config with ``overrides`` applied, refusing any that changes what was fitted."""
    changed = load_config(paths.config, overrides)
    if changed.fit_key() != cfg.fit_key():
        raise ValueError(
            f"--set {', '.join(overrides)}: changes what the run's locations were fitted on (data, grid, model or "
            "seed); evaluation can override eval.* and test-set keys only; train a new run for the others"
        )
    return changed


def evaluate(
    root: Path,
    out_dir: Path | None = None,
    *,
    bundle: Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
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
        loader = ImageLoader(cfg.data)
        grid = _grid(cfg, loader, test)
        t_inf = time.perf_counter()
        masks: np.ndarray | None
        detector_scores: list[np.ndarray] = []
        tile_scores: np.ndarray | None = None
        if bundle is not None:
            maps, masks, kept, tile_scores = _bundle_maps(Path(bundle), cfg, test, grid, progress)
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
        inference_s = time.perf_counter() - t_inf
        assert masks is not None
        own = None if tile_scores is None else image_scores_of_tiles(tile_scores)  # the detector's image scores
        deployed = own if cfg.postprocess.image_score == "detector" else None
        # The config allows 'detector' only for detectors with a score; _bundle_maps checks the bundle's choice.
        assert deployed is not None or cfg.postprocess.image_score == "max"
        merged, result = postprocess_maps(
            maps, grid, stats, weights=cfg.postprocess.weights, seam=cfg.postprocess.seam_smoothing()
        )
        broken = [f"{kept[i].path}: {result.error(i)}" for i in range(len(kept)) if result.error(i) is not None]
        if deployed is not None:
            broken += [f"{kept[i].path}: non-finite detector score" for i in np.flatnonzero(~np.isfinite(deployed))]
        if broken:  # metrics of NaN scores would be meaningless: say which images, stop
            raise ValueError(
                f"evaluation: the model output is not finite for {len(broken)} test image(s), e.g. "
                + "; ".join(broken[:3])
            )
        if cfg.eval.resolution == "original" and cfg.data.image_size is not None:
            # Judge downscaled configs at the original resolution: upsample the maps, use the original masks.
            loader = ImageLoader(cfg.data.model_copy(update={"image_size": None}))
            masks = _original_masks(loader, kept, cfg.eval.batch_size)
            merged = resize_maps(merged, masks.shape[1:])
            result = normalize_with_stats(merged, stats)
        if deployed is not None:
            result = score_images(result, deployed, stats)
        labels = np.array([s.label for s in kept], dtype=bool)
        map_max = merged.reshape(merged.shape[0], -1).max(axis=1)
        raw_scores = map_max if deployed is None else deployed
        metrics = compute_metrics(
            raw_scores,
            labels,
            merged,
            masks,
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
        metrics["pixel_f1"] = f1_at_threshold(result.masks.view(np.uint8), masks, 0.5)
        n_overlays = min(cfg.eval.overlays, len(kept))
        written: list[Path] = []
        for i in pick_overlays([s.defect_type for s in kept], n_overlays):
            s = kept[i]
            image = loader.load_image(s)
            if image.shape[:2] != result.maps.shape[1:]:
                image = cv2.resize(image, result.maps.shape[1:][::-1], interpolation=cv2.INTER_AREA)
            caption = f"{s.defect_type}/{s.path.name} score {result.scores[i]:.2f} {'NG' if result.labels[i] else 'OK'}"
            pic = overlay(
                image, result.maps[i], result.masks[i], masks[i], caption, channel_order=cfg.data.channel_order
            )
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
            "evaluated_at": list(result.maps.shape[1:]),
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
        return EvalResult(out, report, written)
    finally:
        detach_log(handler)
