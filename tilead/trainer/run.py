"""A trained run, opened: the one object the exporter, eager inference, the bench and the demo load a run through.

:class:`Run` reads a run folder (:mod:`tilead.trainer.run_dir` has its layout)
once: its config, the tile grid and preprocessing from ``run.json`` (never
re-derived by probing images), its validation statistics (read when first
asked for) and its models (loaded from their checkpoints when first asked for,
in one place: :func:`load_location_models`). :meth:`Run.matches` is the one
answer to "was this bundle exported from this run, as the run is now?".

```python
run = Run.open("runs/padim_bottle")
run.grid, run.config, run.stats          # TileGrid, RunConfig, NormalizationStats
models = run.models()                    # one eager module per entry of run.model_names
if not run.matches(read_manifest(bundle)):
    print(run.mismatches(read_manifest(bundle)))
```
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from tilead.runtime import Manifest, NormalizationStats, Preprocessing, TileGrid
from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.checkpoints import load_location_models
from tilead.trainer.components import make_backbone
from tilead.trainer.config import RunConfig, load_config
from tilead.trainer.detectors.base import Detector, LocationModel, create_detector
from tilead.trainer.run_dir import RunFolderError, RunPaths, RunRecord, load_stats, read_json, read_run_record


class Run:
    """A run folder, opened: paths, config, grid, statistics and models.

    Build it with :meth:`open`. The config and ``run.json`` are read and checked
    at once; ``stats.json``, the backbone and the checkpoints when first used
    (so a run that is still fitting opens, and reading its grid costs no torch
    model).

    Args:
        paths: The run folder's paths.
        config: Its config (``config.yaml``).
        record: Its ``run.json``, parsed.
    """

    def __init__(self, paths: RunPaths, config: RunConfig, record: RunRecord) -> None:
        self.paths = paths
        self.config = config
        self.record = record
        self._models: list[LocationModel] | None = None

    @classmethod
    def open(cls, root: str | Path) -> Run:
        """Open a run folder written by ``tilead-train`` (finished or not).

        Args:
            root: The run folder.

        Returns:
            The run.

        Raises:
            FileNotFoundError: If ``root`` has no ``config.yaml`` or no ``run.json``.
            ConfigError: If ``config.yaml`` is invalid.
            RunFolderError: If ``run.json`` is broken, of a newer schema, or of another config
                (its fit key is not the config's).
        """
        paths = RunPaths(Path(root))
        if not paths.config.is_file():
            raise FileNotFoundError(f"{root} is not a tilead run folder (no config.yaml); run tilead-train first")
        config = load_config(paths.config)
        record = read_run_record(paths)
        if record.fit_key != config.fit_key():
            raise RunFolderError(
                f"{paths.run_json}: fit key {record.fit_key}, but {paths.config} gives {config.fit_key()}: the config "
                "was changed in data, grid, model or seed after fitting; expected the config the run was trained with"
            )
        return cls(paths, config, record)

    def __repr__(self) -> str:
        return f"Run({str(self.paths.root)!r}, status={self.status!r}, fit_key={self.fit_key!r})"

    # -- what run.json says ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The run folder."""
        return self.paths.root

    @property
    def fit_key(self) -> str:
        """Hash of data, grid, model and seed (:meth:`RunConfig.fit_key`); every checkpoint carries it."""
        return self.record.fit_key

    @property
    def grid(self) -> TileGrid:
        """The tile grid the locations were fitted on (from ``run.json``)."""
        return self.record.grid

    @property
    def preprocessing(self) -> Preprocessing:
        """Tile preprocessing the models were fitted with (from ``run.json``)."""
        return self.record.preprocessing

    @property
    def status(self) -> str:
        """``fitting``, ``validating``, ``validation_failed`` or ``trained``."""
        return self.record.status

    @property
    def finished(self) -> bool:
        """Whether training finished: status ``trained`` and a ``stats.json``."""
        return self.status == "trained" and self.paths.stats.is_file()

    @property
    def model_names(self) -> tuple[str, ...]:
        """The run's locations, in the order :meth:`models` returns their modules (``rRcC``, row-major)."""
        return self.record.locations

    # -- statistics ----------------------------------------------------------------------------------

    @cached_property
    def stats(self) -> NormalizationStats:
        """Validation statistics (normalization and thresholds) from ``stats.json``.

        Raises:
            FileNotFoundError: If training did not finish.
            RunFolderError: If stats.json is broken.
        """
        return load_stats(self.paths)

    @cached_property
    def validation(self) -> dict[str, Any]:
        """How the statistics were obtained (``stats.json``'s ``validation``: rules, split, false-alarm estimate).

        Raises:
            FileNotFoundError: If training did not finish.
            ValueError: If stats.json is not a JSON object.
        """
        section = read_json(self.paths.stats).get("validation", {})
        return dict(section) if isinstance(section, dict) else {}

    # -- models ----------------------------------------------------------------------------------------

    @cached_property
    def backbone(self) -> FeatureExtractor:
        """The frozen backbone every model of this run shares (channels-last, built on first use).

        The exporter switches it to contiguous memory in place before it loads models for tracing.
        """
        return make_backbone(self.config)

    @cached_property
    def detector(self) -> Detector:
        """The run's detector (family adapter) on :attr:`backbone` and the grid's tile size."""
        return create_detector(self.config, self.backbone, self.grid.tile_size)

    def models(self, *, export: bool = False, with_score: bool = False) -> list[LocationModel]:
        """The fitted models in :attr:`model_names` order, in eval mode, loaded from their checkpoints.

        The eager models are loaded once and kept; export variants are built afresh on each call.

        Args:
            export: The variant traced to ONNX (see :meth:`Detector.build`).
            with_score: The export variant also computes the detector's own image score.

        Raises:
            FileNotFoundError: If a location has no checkpoint (training unfinished).
            ValueError: If a checkpoint belongs to another config or detector.
        """
        if export:
            return load_location_models(
                self.config, self.paths, self.grid, self.backbone, export=True, with_score=with_score
            )
        if self._models is None:
            self._models = load_location_models(self.config, self.paths, self.grid, self.backbone)
        return self._models

    # -- is this bundle from this run? ------------------------------------------------------------------

    def mismatches(self, manifest: Manifest) -> list[str]:
        """Why a bundle was not exported from this run as it is now (empty when it was).

        A bundle matches when its models were fitted with this run's fit key, on its grid and preprocessing, for its
        locations, and it deploys the run's post-processing (blend weights, seams, image score) and the run's current
        statistics. Where the run folder lies is not compared: a copied run matches its bundles.

        Args:
            manifest: The bundle's verified manifest (:func:`tilead.runtime.read_manifest`).

        Returns:
            One sentence per difference, naming the bundle's value and the run's.
        """
        cfg = self.config.postprocess
        source = manifest.raw.get("source", {})
        key = source.get("fit_key") if isinstance(source, dict) else None
        out = []
        if key != self.fit_key:
            out.append(f"its models were fitted with fit key {key}, this run's is {self.fit_key}")
        if manifest.grid != self.grid:
            out.append(f"its grid is {manifest.grid.to_dict()}, the run's {self.grid.to_dict()}")
        names = tuple(loc.name for loc in manifest.locations)
        if names != self.model_names:
            out.append(f"its locations are {list(names)}, the run's {list(self.model_names)}")
        if manifest.preprocessing != self.preprocessing:
            out.append(
                f"its preprocessing is {manifest.preprocessing.to_dict()}, the run's {self.preprocessing.to_dict()}"
            )
        if manifest.image_score != cfg.image_score:
            out.append(
                f"its image score is {manifest.image_score!r}, the run's postprocess.image_score is {cfg.image_score!r}"
            )
        if manifest.weights != cfg.weights:
            out.append(f"its blend weights are {manifest.weights!r}, the run's postprocess.weights {cfg.weights!r}")
        seam = cfg.seam_smoothing()
        if manifest.seam != seam:
            out.append(f"its seam smoothing is {manifest.seam}, the run's {seam}")
        ours = self.config.model.thumbnail
        theirs = manifest.thumbnail
        if (None if ours is None else ours.size) != (None if theirs is None else theirs.size):
            out.append(
                f"its thumbnail branch is {'none' if theirs is None else f'size {theirs.size}'}, the run's "
                f"model.thumbnail {'none' if ours is None else f'size {ours.size}'}"
            )
        try:
            stats: NormalizationStats | None = self.stats
        except (FileNotFoundError, ValueError) as err:
            out.append(f"the run has no usable statistics ({err})")
            stats = None
        if stats is not None and manifest.stats != stats:
            out.append(f"its normalization statistics differ from the run's {self.paths.stats} (validated again since)")
        return out

    def matches(self, manifest: Manifest) -> bool:
        """Whether the bundle of ``manifest`` was exported from this run as it is now (see :meth:`mismatches`)."""
        return not self.mismatches(manifest)
