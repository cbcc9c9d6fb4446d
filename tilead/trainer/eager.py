"""The trained ensemble in eager PyTorch, as one object (the reference the runtime is compared with).

:class:`EagerEnsemble` runs exactly what the trainer's evaluation runs: the
runtime's tile kernel, every location's PyTorch model on its tile batch, then
the runtime's post-processing (:class:`tilead.runtime.PostProcessor`, built once from the run's config).
Benchmarks and ``tilead-bench --compare torch`` time it against
:class:`tilead.runtime.Predictor`; parity tests compare their maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from tilead.runtime import NormalizationStats, NormalizedMaps, PostProcessor, Preprocessing, TileGrid
from tilead.runtime.thumbnail import ThumbnailBranch, fuser
from tilead.runtime.timing import StageTimes, timed
from tilead.trainer.config import RunConfig
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.inference import location_forward
from tilead.trainer.run import Run


@dataclass
class EagerEnsemble:
    """A run's location models with the grid, preprocessing and statistics they were fitted with.

    Attributes:
        cfg: The run's config.
        grid: The tile grid.
        prep: Tile preprocessing.
        models: One model per location, row-major.
        stats: Validation statistics (normalization and thresholds).
        thumbnail: The thumbnail branch (issue #20) and its eager model as a function (uint8 images to raw
            maps ``(1, n, h, w)``, :func:`tilead.trainer.thumbnail.thumbnail_forward`), or None.
    """

    cfg: RunConfig
    grid: TileGrid
    prep: Preprocessing
    models: list[LocationModel]
    stats: NormalizationStats
    thumbnail: tuple[ThumbnailBranch, Callable[[np.ndarray], np.ndarray]] | None = None

    @cached_property
    def post(self) -> PostProcessor:
        """The run's post-processing (grid, blending, seams, statistics, image score), built once."""
        return self.cfg.postprocess.processor(self.grid, self.stats)

    def location_maps(self, images: np.ndarray, timer: StageTimes | None = None) -> np.ndarray:
        """Raw per-location maps.

        Args:
            images: uint8 ``(n, H, W, C)`` at the grid's image size, in the
                config's channel order.
            timer: Collects ``tile`` and ``inference`` times.

        Returns:
            float32 ``(locations, n, h, w)``.
        """
        forward = location_forward(self.cfg, self.models, self.grid, self.prep, timer=timer)
        return forward(images)

    def location_outputs(
        self, images: np.ndarray, timer: StageTimes | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw per-location maps and, when the run deploys them, the detector's per-tile image scores.

        Args:
            images: As for :meth:`location_maps`.
            timer: Collects ``tile`` and ``inference`` times.

        Returns:
            ``(maps, scores)``: float32 ``(locations, n, h, w)`` and float32
            ``(locations, n)`` (None unless ``postprocess.image_score`` is ``detector``).
        """
        collected: list[np.ndarray] | None = [] if self.cfg.postprocess.image_score == "detector" else None
        forward = location_forward(self.cfg, self.models, self.grid, self.prep, timer=timer, scores=collected)
        maps = forward(images)
        return maps, (collected[0] if collected else None)

    def predict(self, images: np.ndarray, timer: StageTimes | None = None) -> tuple[np.ndarray, NormalizedMaps]:
        """Maps, then the runtime's merge and normalization (what evaluation does).

        Args:
            images: As for :meth:`location_maps`.
            timer: Collects ``tile``, ``inference``, ``untile``, ``seam``, ``crop``, ``normalize``.

        Returns:
            ``(merged, normalized)`` as :meth:`tilead.runtime.PostProcessor.apply`
            (image scores as the run deploys them).
        """
        maps, scores = self.location_outputs(images, timer)
        fuse = None
        if self.thumbnail is not None:
            branch, forward = self.thumbnail
            with timed(timer, "inference"):
                fuse = fuser(branch, forward(images)[0])
        return self.post.apply(maps, timer=timer, tile_scores=scores, fuse=fuse)


def load_eager_ensemble(run: str | Path | Run) -> EagerEnsemble:
    """Load a finished run for eager inference.

    Args:
        run: The run folder, or the opened :class:`~tilead.trainer.run.Run` (its models are loaded once and shared).

    Raises:
        FileNotFoundError: If ``run`` is not a finished run.
        ValueError: If a checkpoint belongs to another config, or run.json or stats.json is broken, or the
            config has a thumbnail branch that was not validated at its size.
    """
    opened = run if isinstance(run, Run) else Run.open(run)
    cfg = opened.config
    thumbnail = None
    if cfg.model.thumbnail is not None:
        from tilead.trainer.thumbnail import load_thumbnail_model, thumbnail_forward, validated_branch

        branch = validated_branch(opened.paths, cfg.model.thumbnail.size)
        model = load_thumbnail_model(cfg, opened.paths, opened.backbone)
        thumbnail = (branch, thumbnail_forward(cfg, model, opened.preprocessing))
    return EagerEnsemble(cfg, opened.grid, opened.preprocessing, opened.models(), opened.stats, thumbnail)
