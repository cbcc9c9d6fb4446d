"""What a run is built from: backbone, tile preprocessing, image size, threads.

Also the summary of them that ``run.json`` records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

import tilead
from tilead.runtime import Preprocessing, TileGrid, set_num_threads
from tilead.trainer.backbones import FeatureExtractor, build_backbone, describe_backbone
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.detectors.base import create_detector, detector_class
from tilead.trainer.images import ImageLoader


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


def dataset_image_size(loader: ImageLoader, samples: Sequence[Sample]) -> tuple[int, int]:
    """The size every image is brought to: configured, or the common native size (checked)."""
    size = loader.output_size
    return size if size is not None else loader.probe_size(samples)


def total_threads(cfg: RunConfig) -> int:
    """Torch threads in total for this run."""
    return cfg.train.threads or len(os.sched_getaffinity(0))


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


def setup_threads(cfg: RunConfig) -> None:
    """Torch's and the runtime kernels' threads: :func:`total_threads` each."""
    n = total_threads(cfg)
    torch.set_num_threads(n)
    set_num_threads(n)


def run_grid(cfg: RunConfig, loader: ImageLoader, samples: Sequence[Sample]) -> TileGrid:
    """The run's tile grid over the images ``samples`` are brought to (:func:`dataset_image_size`)."""
    return cfg.grid.build(dataset_image_size(loader, samples))
