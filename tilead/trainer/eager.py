"""The trained ensemble in eager PyTorch, as one object (the reference the runtime is compared with).

:class:`EagerEnsemble` runs exactly what the trainer's evaluation runs: the
runtime's tile kernel, every location's PyTorch model on its tile batch, then
the runtime's post-processing (:func:`tilead.runtime.postprocess_maps`).
Benchmarks and ``tilead-bench --compare torch`` time it against
:class:`tilead.runtime.Predictor`; parity tests compare their maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilead.runtime import NormalizationStats, NormalizedMaps, Preprocessing, TileGrid, postprocess_maps
from tilead.runtime.thumbnail import ThumbnailBranch, fuser
from tilead.runtime.timing import StageTimes, timed
from tilead.trainer.config import RunConfig
from tilead.trainer.detectors import LocationModel
from tilead.trainer.ensemble import load_location_models, location_forward, make_backbone, make_preprocessing
from tilead.trainer.run_dir import open_run, read_json


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
            ``(merged, normalized)`` as :func:`tilead.runtime.postprocess_maps`
            (image scores as the run deploys them).
        """
        maps, scores = self.location_outputs(images, timer)
        fuse = None
        if self.thumbnail is not None:
            branch, forward = self.thumbnail
            with timed(timer, "inference"):
                fuse = fuser(branch, forward(images)[0])
        return postprocess_maps(
            maps,
            self.grid,
            self.stats,
            weights=self.cfg.postprocess.weights,
            seam=self.cfg.postprocess.seam_smoothing(),
            timer=timer,
            tile_scores=scores,
            fuse=fuse,
        )


def load_eager_ensemble(run_dir: str | Path) -> EagerEnsemble:
    """Load a finished run for eager inference.

    Raises:
        FileNotFoundError: If ``run_dir`` is not a finished run.
        ValueError: If a checkpoint belongs to another config.
    """
    from tilead.trainer.pipeline import load_stats

    paths, cfg = open_run(Path(run_dir))
    if not paths.run_json.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json; the run has not finished training")
    grid = TileGrid.from_dict(read_json(paths.run_json)["grid"])
    extractor = make_backbone(cfg)
    prep = make_preprocessing(cfg, extractor)
    models = load_location_models(cfg, paths, grid, extractor)
    for model in models:
        model.eval()
    thumbnail = None
    if cfg.model.thumbnail is not None:
        from tilead.trainer.thumbnail import load_branch, load_thumbnail_model, thumbnail_forward

        branch = load_branch(paths)
        if branch is None or branch.size != cfg.model.thumbnail.size:
            raise ValueError(f"{run_dir}: no validated thumbnail branch of the configured size; rerun with --resume")
        thumbnail = (branch, thumbnail_forward(cfg, load_thumbnail_model(cfg, paths, extractor), prep))
    return EagerEnsemble(cfg, grid, prep, models, load_stats(paths), thumbnail)
