"""Evaluate a trained run on its test set: what ``tilead-eval`` calls.

Evaluation is one path over any **map source** (:class:`MapSource`): the run's
eager PyTorch ensemble (:class:`EagerMaps`) or its exported bundle through the
runtime Predictor (:class:`BundleMaps`). Either gives raw per-location maps
(and the detector's per-tile scores, where there are any); everything after
that is the same steps, run in order by :func:`evaluate`:

1. :func:`eval_samples`: the test images (plus the held-out good images when the
   dataset has no defective test image);
2. :func:`infer_maps`: the source's maps of every image, with the masks;
3. :func:`merge_checked`: the runtime's post-processing, refusing non-finite output;
4. :func:`at_eval_resolution`: maps and masks at the resolution the metrics judge;
5. :func:`defect_metrics` (or :func:`good_only_metrics` for good images only),
   :func:`write_overlays`, then ``metrics.json``, ``per_image.csv`` and the report page.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from tilead.runtime import NormalizedMaps, Predictor, TileGrid, resize_maps
from tilead.runtime.postprocessor import (
    NormalizationStats,
    PostProcessor,
    image_scores_of_tiles,
    score_images,
)
from tilead.runtime.thumbnail import ThumbnailBranch, fuser
from tilead.trainer.components import setup_threads
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.data import DataConfig, DatasetSplits, Sample, discover
from tilead.trainer.images import ImageLoader
from tilead.trainer.inference import collect_maps, location_forward
from tilead.trainer.io import atomic_write_json, atomic_write_png, atomic_write_text
from tilead.trainer.metrics import auroc, f1_at_threshold
from tilead.trainer.metrics import evaluate as compute_metrics
from tilead.trainer.report import overlay_of, write_eval_report
from tilead.trainer.run import Run
from tilead.trainer.run_dir import RunPaths, attach_log, detach_log, peak_rss_mib, read_json
from tilead.trainer.run_dir import update_run_json as _update
from tilead.trainer.splits import make_splits
from tilead.trainer.thumbnail import load_thumbnail_model, thumbnail_forward, validated_branch
from tilead.viz.overlays import pick_overlays

log = logging.getLogger("tilead.trainer")


# -- map sources ----------------------------------------------------------------------------------


class MapSource(Protocol):
    """Where evaluation's maps come from: a context manager that maps uint8 batches to per-location maps.

    Attributes:
        description: What runs the models, for ``metrics.json`` (e.g. ``"eager PyTorch"``).
        progress_label: Label of the progress bar of a pass over the test images.
        branch: The thumbnail branch the maps are fused with (issue #20), or None; known once entered.
    """

    description: str
    progress_label: str
    branch: ThumbnailBranch | None

    def __enter__(self) -> MapSource:
        """Open the source (load what inference needs)."""
        ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Release what :meth:`__enter__` opened."""
        ...

    def location_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Raw maps of a batch, the detector's per-tile image scores if it has its own, the thumbnail's maps.

        Args:
            images: uint8 ``(n, H, W, C)`` at the grid's image size, in the config's channel order.

        Returns:
            ``(maps, scores, thumbnail)``: float32 ``(locations, n, h, w)``, float32 ``(locations, n)`` or
            None, and the thumbnail model's raw maps float32 ``(n, h, w)`` (None without a thumbnail branch).
        """
        ...


class EagerMaps:
    """The run's eager PyTorch ensemble as a :class:`MapSource` (models loaded when it is built).

    The detector's own per-tile scores are returned whenever its modules have one (so that evaluation can
    report that score's AUROC even when the run deploys the map's max).

    Args:
        cfg: The run's config, with this evaluation's overrides (data and eval settings).
        run: The opened run (models, grid, preprocessing).
    """

    description = "eager PyTorch"
    progress_label = "evaluate"

    def __init__(self, cfg: RunConfig, run: Run) -> None:
        self._scores: list[np.ndarray] = []
        self._forward = location_forward(cfg, run.models(), run.grid, run.preprocessing, scores=self._scores)
        self.branch: ThumbnailBranch | None = None
        self._thumbnail: Callable[[np.ndarray], np.ndarray] | None = None
        if cfg.model.thumbnail is not None:
            self.branch = validated_branch(run.paths, cfg.model.thumbnail.size)
            model = load_thumbnail_model(cfg, run.paths, run.backbone)
            self._thumbnail = thumbnail_forward(cfg, model, run.preprocessing)

    def __enter__(self) -> EagerMaps:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        return None

    def location_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """See :meth:`MapSource.location_outputs`."""
        before = len(self._scores)
        maps = self._forward(images)
        thumbnail = None if self._thumbnail is None else self._thumbnail(images)[0]
        return maps, self._scores[-1] if len(self._scores) > before else None, thumbnail


class BundleMaps:
    """The run's exported bundle through the runtime Predictor as a :class:`MapSource`.

    The Predictor is created on ``__enter__`` (and closed on ``__exit__``), where the bundle is checked to
    come from this run as it is now (:meth:`Run.mismatches`).

    Args:
        bundle: The bundle folder.
        run: The opened run.
        cfg: The run's config, with this evaluation's overrides (data and eval settings).
        predictor_options: More keyword arguments of the Predictor (e.g. ``backend``, ``bf16_backbone``).
    """

    progress_label = "evaluate (bundle)"

    def __init__(
        self, bundle: Path, run: Run, cfg: RunConfig, predictor_options: Mapping[str, Any] | None = None
    ) -> None:
        self.bundle = bundle
        self.run = run
        self.cfg = cfg
        self.predictor_options = dict(predictor_options or {})
        self.description = f"runtime.Predictor on bundle {bundle}"
        self._predictor: Predictor | None = None
        self.branch: ThumbnailBranch | None = None

    def __enter__(self) -> BundleMaps:
        """Open the bundle.

        Raises:
            ValueError: If the bundle was not exported from this run as it is now.
        """
        bundle, run = self.bundle, self.run
        predictor = Predictor(bundle, max_batch=self.cfg.eval.batch_size, **self.predictor_options)
        try:
            differences = run.mismatches(predictor.manifest)
            if differences:
                raise ValueError(
                    f"--bundle {bundle}: not exported from the run {run.root} as it is now: "
                    + "; ".join(differences)
                    + "; export the run again"
                )
        except BaseException:
            predictor.close()
            raise
        self._predictor = predictor
        self.branch = predictor.manifest.thumbnail
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._predictor is not None:
            self._predictor.close()
            self._predictor = None

    def location_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """See :meth:`MapSource.location_outputs`.

        Raises:
            RuntimeError: Outside ``with``.
        """
        if self._predictor is None:
            raise RuntimeError(f"BundleMaps({self.bundle}): use it inside 'with' (the Predictor is not open)")
        order = "GRAY" if images.shape[3] == 1 else self.cfg.data.channel_order
        return self._predictor.branch_outputs(images, input_order=order)


# -- steps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured and wrote."""

    out_dir: Path
    metrics: dict[str, Any]
    overlays: list[Path]


@dataclass(frozen=True)
class EvalSamples:
    """The images an evaluation runs on.

    Attributes:
        samples: Test images (plus, for good images only, the held-out good training images).
        held: Paths of the held-out good training images among them.
        good_only: No defective test image: false alarms are measured instead of F1 / AUROC.
    """

    samples: list[Sample]
    held: set[Path]
    good_only: bool


def eval_samples(cfg: RunConfig, dataset: DatasetSplits) -> EvalSamples:
    """The test images; without a defective one, also the good images the run held out.

    The held-out images were never fitted (their scores did set the thresholds).

    Raises:
        ValueError: If there is no image to evaluate.
    """
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
    return EvalSamples(test, held, good_only)


@dataclass(frozen=True)
class SourceMaps:
    """A map source's output over the test images.

    Attributes:
        maps: Raw per-location maps float32 ``(locations, n, h, w)``.
        masks: Ground truth bool ``(n, H, W)`` at the grid's image size.
        kept: The samples loaded (bad files may be skipped), in order.
        tile_scores: The detector's per-tile image scores float32 ``(locations, n)``, or None.
        thumbnail: The thumbnail model's raw maps float32 ``(n, h, w)``, or None (no thumbnail branch).
    """

    maps: np.ndarray
    masks: np.ndarray
    kept: list[Sample]
    tile_scores: np.ndarray | None
    thumbnail: np.ndarray | None = None


def infer_maps(cfg: RunConfig, samples: Sequence[Sample], source: MapSource, *, progress: bool) -> SourceMaps:
    """Run ``source`` over ``samples`` in ``eval.batch_size`` batches and gather maps, masks and scores.

    Raises:
        ValueError: If no image could be loaded.
    """
    score_chunks: list[np.ndarray] = []
    thumbnail_chunks: list[np.ndarray] = []

    def forward(images: np.ndarray) -> np.ndarray:
        maps, scores, thumbnail = source.location_outputs(images)
        if scores is not None:
            score_chunks.append(scores)
        if thumbnail is not None:
            thumbnail_chunks.append(thumbnail)
        return maps

    label = source.progress_label if progress else None
    maps, masks, kept = collect_maps(
        cfg, samples, forward, batch_size=cfg.eval.batch_size, with_masks=True, progress=label
    )
    assert masks is not None
    return SourceMaps(
        maps,
        masks,
        kept,
        np.concatenate(score_chunks, axis=1) if score_chunks else None,
        np.concatenate(thumbnail_chunks, axis=0) if thumbnail_chunks else None,
    )


def merge_checked(
    post: PostProcessor,
    maps: np.ndarray,
    kept: list[Sample],
    deployed: np.ndarray | None,
    fuse: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, NormalizedMaps]:
    """The runtime's post-processing of the raw maps, refusing any non-finite output.

    Args:
        post: The run's post-processing, with its statistics.
        maps: Raw per-location maps float32 ``(locations, n, h, w)``.
        kept: The samples of the maps (named in the error).
        deployed: The deployed detector image scores float32 ``(n,)``, or None.
        fuse: The thumbnail branch's fusion (:func:`tilead.runtime.thumbnail.fuser`), or None.

    Returns:
        ``(merged, result)``: merged (and fused) maps float32 ``(n, H, W)`` before normalization and the
        normalized result.

    Raises:
        ValueError: If a map or deployed score is not finite, naming up to three images.
    """
    merged, result = post.apply(maps, fuse=fuse)
    broken = [f"{kept[i].path}: {result.error(i)}" for i in range(len(kept)) if result.error(i) is not None]
    if deployed is not None:
        broken += [f"{kept[i].path}: non-finite detector score" for i in np.flatnonzero(~np.isfinite(deployed))]
    if broken:  # metrics of NaN scores would be meaningless: say which images, stop
        raise ValueError(
            f"evaluation: the model output is not finite for {len(broken)} test image(s), e.g. " + "; ".join(broken[:3])
        )
    return merged, result


@dataclass(frozen=True)
class EvalMaps:
    """Per image: merged map, deployed map, deployed mask and ground truth at the resolution metrics judge.

    Arrays ``(n, H, W)``, or lists of ``(H_i, W_i)`` for images of mixed original sizes (then ``result``'s maps
    and masks are the pooled pixels ``(1, P)``).

    Attributes:
        merged: Merged maps before normalization.
        maps: Deployed (normalized) maps.
        masks: Deployed masks.
        truth: Ground-truth masks.
        result: The normalized result (scores, labels; pooled maps for mixed sizes).
        evaluated_at: ``[H, W]``, or ``"original (mixed sizes)"``.
    """

    merged: np.ndarray | list[np.ndarray]
    maps: np.ndarray | list[np.ndarray]
    masks: np.ndarray | list[np.ndarray]
    truth: np.ndarray | list[np.ndarray]
    result: NormalizedMaps
    evaluated_at: list[int] | str


def at_eval_resolution(
    cfg: RunConfig,
    kept: list[Sample],
    merged: np.ndarray,
    result: NormalizedMaps,
    masks: np.ndarray,
    post: PostProcessor,
) -> EvalMaps:
    """The maps at ``eval.resolution``: a downscaled config is judged at the original resolution.

    There the merged maps are upsampled to the original masks and normalized again; images of different
    sizes are each judged at their own size.

    Args:
        cfg: The run's config.
        kept: The samples of the maps.
        merged: Merged maps float32 ``(n, h, w)`` at the grid's image size.
        result: Their normalized result.
        masks: Ground truth bool ``(n, h, w)`` at the grid's image size.
        post: The run's post-processing, with its statistics.
    """
    if not (cfg.eval.resolution == "original" and cfg.data.image_size is not None):
        return EvalMaps(merged, result.maps, result.masks, masks, result, list(result.maps.shape[1:]))
    native = cfg.data.model_copy(update={"image_size": None})
    gt = _original_masks_each(native, kept)
    if len({m.shape for m in gt}) == 1:
        truth = np.stack(gt)
        up = resize_maps(merged, truth.shape[1:])
        again = post.normalize(up)
        return EvalMaps(up, again.maps, again.masks, truth, again, list(truth.shape[1:]))
    # images of different sizes: each at its own
    merged_maps = [resize_maps(merged[i : i + 1], m.shape)[0] for i, m in enumerate(gt)]
    parts = [post.normalize(m[None]) for m in merged_maps]
    pred_maps, pred_masks = [r.maps[0] for r in parts], [r.masks[0] for r in parts]
    flat_masks = np.concatenate([m.reshape(-1) for m in pred_masks])[None]  # pooled, for rates
    pooled = dataclasses.replace(
        result,
        maps=np.concatenate([m.reshape(-1) for m in pred_maps])[None],
        masks=flat_masks,
        raw_scores=np.concatenate([r.raw_scores for r in parts]),
        scores=np.concatenate([r.scores for r in parts]),
        labels=np.concatenate([r.labels for r in parts]),
    )
    return EvalMaps(merged_maps, pred_maps, pred_masks, gt, pooled, "original (mixed sizes)")


def defect_metrics(
    cfg: RunConfig,
    maps: EvalMaps,
    labels: np.ndarray,
    raw_scores: np.ndarray,
    map_max: np.ndarray,
    own: np.ndarray | None,
    deployed: np.ndarray | None,
    stats: NormalizationStats,
) -> dict[str, float]:
    """Threshold-free metrics on the merged maps, F1 on the deployed decisions.

    Args:
        cfg: The run's config (``eval.fpr_limit``).
        maps: The maps at the evaluation resolution.
        labels: bool ``(n,)`` ground-truth image labels.
        raw_scores: Image scores before normalization ``(n,)`` (the deployed ones).
        map_max: Max of each merged map ``(n,)``.
        own: The detector's own image scores ``(n,)`` or None.
        deployed: ``own`` when the run deploys it, else None.
        stats: The run's statistics (thresholds).
    """
    metrics = compute_metrics(
        raw_scores,
        labels,
        maps.merged,
        maps.truth,
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
    metrics["image_f1"] = f1_at_threshold(maps.result.labels.astype(np.float32), labels, 0.5)
    metrics["pixel_f1"] = f1_at_threshold(_pooled(maps.masks).view(np.uint8), _pooled(maps.truth), 0.5)
    return metrics


def write_overlays(
    cfg: RunConfig,
    out: Path,
    kept: list[Sample],
    maps: EvalMaps,
    raw_scores: np.ndarray,
    load_image: Callable[[Sample], np.ndarray],
) -> list[Path]:
    """Write up to ``eval.overlays`` overlay PNGs (defect types interleaved) under ``OUT/overlays``."""
    result = maps.result
    written: list[Path] = []
    for i in pick_overlays([s.defect_type for s in kept], min(cfg.eval.overlays, len(kept))):
        s = kept[i]
        pic = overlay_of(load_image(s), s, cfg.data.channel_order, maps.maps[i], maps.masks[i], maps.truth[i],
                         float(result.scores[i]), bool(result.labels[i]), float(raw_scores[i]))  # fmt: skip
        path = out / "overlays" / f"{s.defect_type}_{s.path.stem}.png"
        atomic_write_png(path, pic)
        written.append(path)
    return written


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
    predictor_options: Mapping[str, Any] | None = None,
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
        predictor_options: With ``bundle``: more keyword arguments of the Predictor
            (``backend``, ``bf16_backbone``, ``threads``...).

    Returns:
        Metrics and the written overlays.

    Raises:
        ValueError: For an override that changes what the locations were fitted on.
    """
    start = time.perf_counter()
    run = Run.open(root)
    paths, cfg = run.paths, run.config
    if overrides:
        cfg = _override_run_config(paths, cfg, overrides)
    default_out = paths.root / ("eval_bundle" if bundle is not None else "eval")
    out = Path(out_dir) if out_dir is not None else default_out
    handler = attach_log(paths)
    try:
        setup_threads(cfg)
        stats = run.stats
        test = eval_samples(cfg, discover(cfg.data))
        grid = run.grid  # from run.json, not re-derived from the test images
        # The eager models load before the clock starts; a bundle's Predictor opens inside it (as it always did).
        source: MapSource = (
            BundleMaps(Path(bundle), run, cfg, predictor_options) if bundle is not None else EagerMaps(cfg, run)
        )
        t_inf = time.perf_counter()
        with source:
            inferred = infer_maps(cfg, test.samples, source, progress=progress)
        inference_s = time.perf_counter() - t_inf
        kept = inferred.kept
        tile_scores = inferred.tile_scores
        own = None if tile_scores is None else image_scores_of_tiles(tile_scores)  # the detector's image scores
        deployed = own if cfg.postprocess.image_score == "detector" else None
        # The config allows 'detector' only for detectors with a score; BundleMaps checks the bundle's choice.
        assert deployed is not None or cfg.postprocess.image_score == "max"
        post = cfg.postprocess.processor(grid, stats)  # the run's post-processing, as its bundle deploys it
        branch = source.branch
        fuse = None if branch is None or inferred.thumbnail is None else fuser(branch, inferred.thumbnail)
        merged, result = merge_checked(post, inferred.maps, kept, deployed, fuse)
        maps = at_eval_resolution(cfg, kept, merged, result, inferred.masks, post)
        if deployed is not None:
            maps = dataclasses.replace(maps, result=score_images(maps.result, deployed, stats))
        labels = np.array([s.label for s in kept], dtype=bool)
        map_max = np.array([m.max() for m in maps.merged], dtype=np.float32)
        raw_scores = map_max if deployed is None else deployed
        page = None if report_page is False else out / "report.html" if report_page is True else Path(report_page)
        native = cfg.data.model_copy(update={"image_size": None})

        def load_at_eval_size(sample: Sample) -> np.ndarray:
            # A fresh loader per image: at original resolution the images may differ in size.
            return ImageLoader(native if cfg.eval.resolution == "original" else cfg.data).load_image(sample)

        if test.good_only:
            done = _evaluate_good_only(
                paths, cfg, out, kept, test.held, maps.result, stats, grid, bundle, start, time.perf_counter() - t_inf
            )
            if page is not None:
                groups = [f"{s.defect_type} (held out)" if s.path in test.held else s.defect_type for s in kept]
                write_eval_report(page, metrics_json=done.metrics, samples=kept, load_image=load_at_eval_size,
                                  channel_order=cfg.data.channel_order, result=maps.result, maps=maps.maps,
                                  masks=maps.masks, merged=None, truth=maps.truth,
                                  raw_scores=raw_scores, stats=stats, group_names=groups)  # fmt: skip
                log.info("eval: report %s", page)
            return done
        metrics = defect_metrics(cfg, maps, labels, raw_scores, map_max, own, deployed, stats)
        written = write_overlays(cfg, out, kept, maps, raw_scores, load_at_eval_size)
        seconds = time.perf_counter() - start
        report: dict[str, Any] = {
            "run": str(paths.root),
            "config": cfg.name,
            "grid": grid.to_dict(),
            "grid_shape": [grid.rows, grid.cols],
            "backbone": cfg.model.backbone.name,
            "inference": source.description,
            "evaluated_at": maps.evaluated_at,
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
        result = maps.result
        atomic_write_json(out / "metrics.json", report)
        atomic_write_text(out / "per_image.csv", _per_image_csv(kept, result.raw_scores, result.scores, result.labels))
        _update(paths, last_eval={"out": str(out), **report["metrics"]})
        log.info("eval: %s", ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()))
        if page is not None:
            write_eval_report(page, metrics_json=report, samples=kept, load_image=load_at_eval_size,
                              channel_order=cfg.data.channel_order, result=result, maps=maps.maps,
                              masks=maps.masks, merged=maps.merged, truth=maps.truth,
                              raw_scores=raw_scores, stats=stats)  # fmt: skip
            log.info("eval: report %s", page)
        return EvalResult(out, report, written)
    finally:
        detach_log(handler)
