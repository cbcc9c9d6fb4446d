"""Location checkpoints: their metadata, whether one is done (resume), and loading every location's module."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import tilead
from tilead.runtime import TileGrid
from tilead.trainer.assignment import Assignment
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.config import RunConfig
from tilead.trainer.detectors.base import LocationModel, create_detector, load_state
from tilead.trainer.io import read_metadata
from tilead.trainer.model_table import run_assignment
from tilead.trainer.run_dir import RunPaths

log = logging.getLogger("tilead.trainer")


def location_metadata(cfg: RunConfig, location: str, count: int, seconds: float) -> dict[str, str]:
    """String metadata stored in a location checkpoint (:func:`save_state` adds the detector's format and family)."""
    return {
        "location": location,
        "fit_key": cfg.fit_key(),
        "images": str(count),
        "seconds": f"{seconds:.3f}",
        "tilead_version": tilead.__version__,
    }


def checkpoint_has(path: Path, key: str, value: str, what: str) -> bool:
    """Whether the checkpoint at ``path`` exists, its metadata reads and its ``key`` is ``value``.

    Args:
        path: The safetensors checkpoint.
        key: Metadata key (``fit_key``, ``thumbnail_key``).
        value: The key this config gives.
        what: What is refitted when it is unreadable, for the warning (``that location``).
    """
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except ValueError:
        log.warning("checkpoint %s is unreadable; refitting %s", path, what)
        return False
    return meta.get(key) == value


def checkpoint_done(paths: RunPaths, cfg: RunConfig, location: str) -> bool:
    """Whether a location's checkpoint exists, loads and belongs to this config."""
    return checkpoint_has(paths.checkpoint(location), "fit_key", cfg.fit_key(), "that location")


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
    return [
        Oriented(models[m], table.transform(loc)) if table.transform(loc) else models[m]
        for loc, m in enumerate(table.location_model)
    ]


def orient_tiles(x: torch.Tensor, t: int) -> torch.Tensor:
    """:func:`tilead.runtime.orientation.apply` on the last two axes of a tensor."""
    y = torch.flip(x, dims=(-1,)) if t >= 4 else x
    return torch.rot90(y, k=t % 4, dims=(-2, -1))


def unorient_maps(x: torch.Tensor, t: int) -> torch.Tensor:
    """:func:`tilead.runtime.orientation.invert` on the last two axes of a tensor."""
    y = torch.rot90(x, k=-(t % 4), dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if t >= 4 else y


class Oriented(LocationModel):
    """A shared model seen from one location: its tiles transformed before the model, the map transformed back.

    Input ``(n, C, th, tw)``; output ``(n, 1, h, w)`` (:mod:`tilead.runtime.orientation`, transform ``t``).
    """

    def __init__(self, model: LocationModel, t: int) -> None:
        super().__init__()
        self.model = model
        self.t = int(t)
        self.has_image_score = model.has_image_score  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly map of a tile batch, in the location's own orientation."""
        return unorient_maps(self.model(orient_tiles(x, self.t)), self.t)

    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (transformed back) and the shared model's own score of the oriented tiles."""
        out, score = self.model.forward_with_score(orient_tiles(x, self.t))
        return unorient_maps(out, self.t), score


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
