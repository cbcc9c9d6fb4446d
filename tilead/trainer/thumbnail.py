"""The thumbnail branch in training (issue #20): fit, eager inference, per-branch statistics, fusion choice.

With ``model.thumbnail: {size, fusion}`` a run fits one more model of its
family, on whole images resized to ``size`` x ``size`` (the runtime's resize
and tile kernels, :func:`tilead.runtime.thumbnail.thumbnail_tiles`, exactly as
the Predictor prepares them), next to the tile locations:

* :func:`fit_thumbnail`: fits it (resumable: ``thumbnail/size<N>.safetensors``
  carries :meth:`RunConfig.thumbnail_key`; the tile locations' fit key ignores
  the thumbnail, so adding one to a fitted run fits only the thumbnail);
* :func:`thumbnail_forward`: its eager inference (raw maps);
* :func:`choose_branch`: each branch's validation statistics (threshold,
  min, max of its maps against the validation masks) and, for ``weighted``
  fusion, the weight of the tiled branch that maximizes
  ``(image AUROC + AUPRO) / 2`` of the fused validation maps (with anomalous
  validation images it also records that criterion for each branch alone and
  for ``max``, to compare sizes and fusions on validation);
* :func:`load_branch`: the branch a run chose (``stats.json``'s ``thumbnail``);
* :func:`thumbnail_blur`: the blur of the thumbnail's map (``model.thumbnail.blur``: the model's
  ``blur_sigma``, the tiles' blur matched in image pixels, or a sigma), applied by the model itself
  (so it is in ``thumbnail.onnx``: the runtime has nothing to match).

The fusion itself is the runtime's (:class:`tilead.runtime.thumbnail.ThumbnailBranch`),
so validation, evaluation and the Predictor fuse identically.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilead.runtime import Preprocessing, resize_maps
from tilead.runtime.thumbnail import (
    THUMBNAIL_NAME,
    BranchStats,
    Fusion,
    ThumbnailBranch,
    thumbnail_tiles,
    upsample,
)
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.checkpoints import checkpoint_has
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.detectors.base import (
    Detector,
    LocationModel,
    create_detector,
    detector_class,
    load_state,
    save_state,
)
from tilead.trainer.detectors.sections import ThumbnailConfig
from tilead.trainer.images import ImageLoader
from tilead.trainer.metrics import aupro, auroc
from tilead.trainer.run_dir import RunPaths, read_json
from tilead.trainer.validation import _threshold

log = logging.getLogger("tilead.trainer")

CHOICE_SIDE = 256
"""The weight is chosen on validation maps downsampled to at most this side (bounded cost; AUPRO is per region)."""


def checkpoint_path(paths: RunPaths, size: int) -> Path:
    """``RUN/thumbnail/size<N>.safetensors``: one checkpoint per size, so trying sizes refits nothing twice."""
    return paths.root / "thumbnail" / f"size{size}.safetensors"


def _settings(cfg: RunConfig) -> ThumbnailConfig:
    thumb = cfg.model.thumbnail
    if thumb is None:
        raise ValueError("model.thumbnail is not set: the run has no thumbnail branch")
    return thumb


def thumbnail_blur(cfg: RunConfig, image_size: Sequence[int]) -> float:
    """The thumbnail map's Gaussian sigma in thumbnail-map pixels (``model.thumbnail.blur``).

    ``model``: the model's ``blur_sigma``; ``matched``: the tiles' blur in image pixels, ``blur_sigma * size /
    max(H, W)`` (a thumbnail-map pixel covers ``max(H, W) / size`` times the image pixels of a tile-map pixel);
    a number: itself.

    Args:
        cfg: Run config with ``model.thumbnail``.
        image_size: ``(H, W)`` of the run's images.
    """
    thumb = _settings(cfg)
    if thumb.blur == "model":
        return cfg.model.blur_sigma
    if thumb.blur == "matched":
        return cfg.model.blur_sigma * thumb.size / max(int(image_size[0]), int(image_size[1]))
    return float(thumb.blur)


def _image_size(paths: RunPaths) -> tuple[int, int]:
    """``(H, W)`` of the run's images (``run.json``'s grid, written before anything is fitted)."""
    try:
        h, w = read_json(paths.run_json)["grid"]["image_size"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{paths.run_json}: no grid.image_size ({err}); the run folder is incomplete") from None
    return int(h), int(w)


def _detector(cfg: RunConfig, extractor: FeatureExtractor, paths: RunPaths) -> Detector:
    """The run's detector for the thumbnail: its size, and its blur (:func:`thumbnail_blur`)."""
    size = _settings(cfg).size
    sigma = thumbnail_blur(cfg, _image_size(paths))
    if sigma == cfg.model.blur_sigma:
        return create_detector(cfg, extractor, (size, size))
    model = cfg.model.model_copy(update={"blur_sigma": sigma})  # the blur only shapes the map, not the fit
    return detector_class(cfg.model.family)(model, extractor, (size, size), cfg.seed)


class ThumbnailTiles:
    """Whole images resized to the thumbnail size, preprocessed: a :class:`~tilead.trainer.detectors.TileSource`.

    Batches are float32 ``(n, C, size, size)`` channels-last tensors, made by
    the runtime's image resize and tile kernel (what the Predictor feeds the thumbnail model).
    """

    def __init__(self, cfg: RunConfig, samples: Sequence[Sample], prep: Preprocessing, size: int, label: str) -> None:
        self.cfg = cfg
        self.samples = tuple(samples)
        self.prep = prep
        self.size = size
        self.label = label
        self.batch_size = cfg.train.batch_size
        self.num_images = len(self.samples)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.samples:
            return
        for batch in ImageLoader(self.cfg.data).iter_batches(self.samples, self.batch_size):
            tiles = resized_tiles(batch.images, self.size, self.prep, self.cfg.data.channel_order)
            yield torch.from_numpy(np.ascontiguousarray(tiles)).contiguous(memory_format=torch.channels_last)


def resized_tiles(images: np.ndarray, size: int, prep: Preprocessing, channel_order: str) -> np.ndarray:
    """float32 ``(n, C, size, size)``: uint8 ``(n, H, W, C)`` images resized and preprocessed as the Predictor does."""
    order = "GRAY" if images.shape[3] == 1 else channel_order
    out: np.ndarray = thumbnail_tiles(images, size, prep, input_order=order)[0]  # type: ignore[arg-type]
    return out


def thumbnail_done(paths: RunPaths, cfg: RunConfig) -> bool:
    """Whether the thumbnail checkpoint of this size exists, loads and belongs to this config."""
    path = checkpoint_path(paths, _settings(cfg).size)
    return checkpoint_has(path, "thumbnail_key", cfg.thumbnail_key(), "the thumbnail model")


def fit_thumbnail(
    cfg: RunConfig,
    paths: RunPaths,
    samples: Sequence[Sample],
    extractor: FeatureExtractor,
    prep: Preprocessing,
    *,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Fit the thumbnail model on the fit images (skipped when its checkpoint is done).

    Args:
        cfg: Run config with ``model.thumbnail``.
        paths: Run folder.
        samples: The fit images (those the tile locations were fitted on).
        extractor: The run's backbone.
        prep: The run's preprocessing.
        progress: Show progress bars.

    Returns:
        A summary (images, seconds, state bytes), or None when it was already fitted.
    """
    size = _settings(cfg).size
    if thumbnail_done(paths, cfg):
        log.info("resume: the thumbnail model (size %d) is already fitted", size)
        return None
    start = time.perf_counter()
    detector = _detector(cfg, extractor, paths)
    # The same held-out images as a location's (holdout_split's seeded draw), for detectors that ask for some.
    from tilead.trainer.checkpoints import location_metadata
    from tilead.trainer.splits import holdout_split

    fit, held = holdout_split(samples, detector.holdout_fraction, cfg.seed)
    partial = paths.root / "partial" / THUMBNAIL_NAME
    detector.work_dir = partial
    state = detector.fit(
        ThumbnailTiles(cfg, fit, prep, size, f"fit {THUMBNAIL_NAME}"),
        ThumbnailTiles(cfg, held, prep, size, f"holdout {THUMBNAIL_NAME}"),
        progress=progress,
    )
    seconds = time.perf_counter() - start
    meta = location_metadata(cfg, THUMBNAIL_NAME, state.tiles, seconds)
    meta.update({"thumbnail_key": cfg.thumbnail_key(), "thumbnail_size": str(size)})
    save_state(checkpoint_path(paths, size), detector, state, meta)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("fitted the thumbnail model (%d px) on %d images in %.1f s", size, state.tiles, seconds)
    return {"size": size, "images": state.tiles, "seconds": round(seconds, 3), "state_bytes": state.nbytes}


def load_thumbnail_model(
    cfg: RunConfig, paths: RunPaths, extractor: FeatureExtractor, *, export: bool = False
) -> LocationModel:
    """The fitted thumbnail model (``export``: the variant traced to ONNX), in eval mode.

    Raises:
        FileNotFoundError: If it was not fitted (training unfinished).
        ValueError: If its checkpoint belongs to another config or size.
    """
    size = _settings(cfg).size
    path = checkpoint_path(paths, size)
    if not path.is_file():
        raise FileNotFoundError(f"the thumbnail model has no checkpoint ({path}); finish training with --resume")
    detector = _detector(cfg, extractor, paths)
    state, meta = load_state(path, detector)
    if meta.get("thumbnail_key") != cfg.thumbnail_key():
        raise ValueError(
            f"checkpoint {path} was fitted with another config (thumbnail key {meta.get('thumbnail_key')})"
        )
    return detector.build(state, export=export).eval()


def thumbnail_forward(cfg: RunConfig, model: LocationModel, prep: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """The eager thumbnail model as a function: uint8 ``(n, H, W, C)`` to raw maps float32 ``(1, n, h, w)``.

    The leading 1 makes it a one-"location" map stack, as :func:`tilead.trainer.ensemble.collect_maps` gathers.
    """
    size = _settings(cfg).size

    def forward(images: np.ndarray) -> np.ndarray:
        tiles = resized_tiles(images, size, prep, cfg.data.channel_order)
        with torch.inference_mode():
            out = model(torch.from_numpy(tiles).contiguous(memory_format=torch.channels_last))
        maps: np.ndarray = out[:, 0].numpy()[None].astype(np.float32, copy=False)
        return maps

    return forward


def branch_stats(maps: np.ndarray, masks: np.ndarray, good_quantile: float) -> tuple[BranchStats, dict[str, Any]]:
    """One branch's statistics: pixel threshold (as validation's rule: F1-adaptive, else a good quantile), min, max.

    Args:
        maps: float32 ``(n, H, W)`` the branch's maps at the image size.
        masks: bool ``(n, H, W)`` ground truth.
        good_quantile: Quantile rule without anomalous pixels.
    """
    threshold, rule = _threshold(maps, masks, good_quantile)
    lo, hi = float(maps.min()), float(maps.max())
    if not hi > lo:
        hi = lo + 1.0
    return BranchStats(threshold=float(threshold), min=lo, max=hi), rule


def _small(maps: np.ndarray, side: int = CHOICE_SIDE) -> np.ndarray:
    """Maps downsampled (bilinear) so the longer side is at most ``side``."""
    h, w = maps.shape[1:]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return maps
    return resize_maps(
        np.ascontiguousarray(maps, dtype=np.float32), (max(1, round(h * scale)), max(1, round(w * scale)))
    )


def fusion_quality(fused: np.ndarray, masks_small: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``image_auroc`` (map max), ``aupro`` (on maps downsampled to :data:`CHOICE_SIDE`) and their mean."""
    scores = fused.reshape(fused.shape[0], -1).max(axis=1)
    image = auroc(scores, labels)
    pro = aupro(_small(fused), masks_small)
    return {"image_auroc": image, "aupro": pro, "criterion": (image + pro) / 2}


def choose_branch(
    cfg: RunConfig,
    tiled: np.ndarray,
    thumbnail_maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
) -> tuple[ThumbnailBranch, dict[str, Any]]:
    """Per-branch statistics and (``weighted``) the tiled branch's weight, from the validation images.

    Args:
        cfg: Run config with ``model.thumbnail``.
        tiled: float32 ``(n, H, W)`` merged tiled validation maps (tile-normalized for stage ``tile``).
        thumbnail_maps: float32 ``(n, h, w)`` raw thumbnail validation maps.
        masks: bool ``(n, H, W)`` ground truth.
        labels: bool ``(n,)`` image labels.

    Returns:
        The branch (without a file) and how it was chosen.

    Raises:
        ValueError: For ``weighted`` without both good and anomalous validation images.
    """
    thumb = _settings(cfg)
    q = cfg.validation.good_quantile
    up = upsample(thumbnail_maps, (tiled.shape[1], tiled.shape[2]))
    tiled_stats, tiled_rule = branch_stats(tiled, masks, q)
    thumb_stats, thumb_rule = branch_stats(up, masks, q)
    info: dict[str, Any] = {
        "size": thumb.size,
        "fusion": thumb.fusion,
        "blur_sigma": round(thumbnail_blur(cfg, tiled.shape[1:]), 6),
        "branch_threshold_rules": {"tiled": tiled_rule, "thumbnail": thumb_rule},
    }

    def branch(weight: float | None, fusion: Fusion | None = None) -> ThumbnailBranch:
        return ThumbnailBranch(
            size=thumb.size,
            fusion=thumb.fusion if fusion is None else fusion,
            weight=weight,
            map_size=(int(thumbnail_maps.shape[1]), int(thumbnail_maps.shape[2])),
            tiled=tiled_stats,
            thumbnail=thumb_stats,
        )

    labels = np.asarray(labels).astype(bool)
    judged = not labels.all() and labels.any() and masks.any()
    masks_small = _small(masks.astype(np.float32)) > 0.5 if judged else masks
    if judged:  # for people comparing sizes and fusions on validation: each branch alone and their max
        info["validation_quality"] = {
            name: {k: round(v, 6) for k, v in fusion_quality(maps, masks_small, labels).items()}
            for name, maps in (("tiled", tiled), ("thumbnail", up), ("max", branch(None, "max").fuse(tiled, up)))
        }
    if thumb.fusion == "max":
        return branch(None), info
    if not judged:
        raise ValueError(
            "model.thumbnail.fusion 'weighted': choosing the weight needs good and anomalous validation images "
            "with masks; use fusion 'max' or a validation split with anomalies (synthetic, same_as_test)"
        )
    scores: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    for w in thumb.weights:
        candidate = branch(w)
        quality = fusion_quality(candidate.fuse(tiled, up), masks_small, labels)
        scores[f"{w:g}"] = {k: round(v, 6) for k, v in quality.items()}
        # The best criterion; among equals the larger tiled weight (the weights are sorted ascending).
        if best is None or quality["criterion"] >= best[1]:
            best = (w, quality["criterion"])
    assert best is not None
    info.update(
        {
            "weight": best[0],
            "candidates": scores,
            "rule": "the tiled branch's weight maximizing (image AUROC + AUPRO) / 2 of the fused validation maps "
            f"(AUPRO on maps downsampled to at most {CHOICE_SIDE} px); ties: the larger weight",
        }
    )
    log.info("thumbnail: weight %.2f of the tiled branch chosen on validation (%s)", best[0], scores)
    return branch(best[0]), info


def load_branch(paths: RunPaths) -> ThumbnailBranch | None:
    """The thumbnail branch validation chose (``stats.json``'s ``thumbnail``), None for a run without one."""
    data = read_json(paths.stats).get("thumbnail")
    return None if data is None else ThumbnailBranch.from_dict(data, with_file=False)


def validated_branch(paths: RunPaths, size: int) -> ThumbnailBranch:
    """The thumbnail branch of ``size`` the run's validation chose (``stats.json``).

    Raises:
        ValueError: If validation chose no branch of this size (validate again with ``--resume``).
    """
    branch = load_branch(paths)
    if branch is None or branch.size != size:
        raise ValueError(
            f"{paths.stats}: no thumbnail branch of size {size} was validated (stats.json has "
            f"{'none' if branch is None else f'size {branch.size}'}); rerun tilead-train --resume to validate it"
        )
    return branch
