"""The run folder: where a training run keeps everything it produced.

```
RUN/
  config.yaml              the resolved, validated config
  run.json                 schema version, grid, preprocessing, backbone, splits,
                           per-location state sizes, timings, peak RSS, status
  locations/rRcC.safetensors   one fitted location each (written when done)
  partial/rRcC/             progress of a location being fitted (trained detectors;
                           removed when its checkpoint is written)
  stats.json               normalization statistics + how they were obtained
  train.log                the log of every train / eval invocation
  eval/                    metrics.json, per_image.csv, overlays/*.png
```

Resume rule: a location counts as done when its checkpoint exists, loads,
and carries the run's ``fit_key`` (a hash of data, grid, model and seed).

This module is the folder's layout and its files (``run.json`` parsed by
:func:`parse_run_record`, ``stats.json`` by :func:`load_stats`); the opened run,
with its config, statistics and models, is :class:`tilead.trainer.run.Run`.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilead.runtime import NormalizationStats, Preprocessing, TileGrid
from tilead.trainer.config import ConfigError, RunConfig, load_config, save_config
from tilead.trainer.io import atomic_write_json

log = logging.getLogger("tilead.trainer")

RUN_SCHEMA_VERSION = 1
"""The ``run.json`` layout this tilead writes and reads (``schema_version``; a run.json without it is 1)."""


class RunFolderError(ValueError):
    """A run folder's file is not what tilead-train writes; the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class RunPaths:
    """Paths inside one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        """``config.yaml``."""
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        """``run.json``."""
        return self.root / "run.json"

    @property
    def stats(self) -> Path:
        """``stats.json``."""
        return self.root / "stats.json"

    @property
    def log(self) -> Path:
        """``train.log``."""
        return self.root / "train.log"

    @property
    def locations(self) -> Path:
        """``locations/``."""
        return self.root / "locations"

    def checkpoint(self, location: str) -> Path:
        """``locations/<location>.safetensors``."""
        return self.locations / f"{location}.safetensors"

    def partial(self, location: str) -> Path:
        """``partial/<location>/``: a detector's resumable progress while it fits the location."""
        return self.root / "partial" / location


def peak_rss_mib() -> float:
    """Peak resident set size of this process and its finished children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    return max(own, children) / scale


def attach_log(paths: RunPaths) -> logging.Handler:
    """Append this invocation's log records to ``train.log``."""
    paths.root.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(paths.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tilead")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def detach_log(handler: logging.Handler) -> None:
    """Undo :func:`attach_log`."""
    logging.getLogger("tilead").removeHandler(handler)
    handler.close()


def prepare_run(cfg: RunConfig, root: Path, *, resume: bool) -> RunPaths:
    """Create or reopen a run folder.

    Args:
        cfg: The validated config.
        root: The run folder.
        resume: Reopen an existing run (its config must fit this one).

    Returns:
        The run's paths.

    Raises:
        ConfigError: If the folder holds another run's results and ``resume``
            is off, or its config does not match on resume.
    """
    paths = RunPaths(Path(root))
    if paths.config.exists():
        if not resume:
            raise ConfigError(
                f"run folder {paths.root} already holds a run; pass --resume to continue it or choose another --output"
            )
        old = load_config(paths.config)
        if old.fit_key() != cfg.fit_key():
            raise ConfigError(
                f"--resume: the config differs from the one {paths.root} was trained with in data, grid, model or "
                f"seed (fit key {old.fit_key()} vs {cfg.fit_key()}); compare with {paths.config}"
            )
    elif paths.root.exists() and any(paths.root.iterdir()) and not resume:
        raise ConfigError(f"output folder {paths.root} exists and is not empty; choose another --output")
    paths.locations.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    return paths


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with a clear error when it is missing or broken.

    Raises:
        FileNotFoundError: If missing.
        ValueError: If not a JSON object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def update_run_json(paths: RunPaths, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run.json`` (atomically) and return the result.

    A run.json written afresh gets ``schema_version`` :data:`RUN_SCHEMA_VERSION`; an existing one keeps its own.
    """
    data = read_json(paths.run_json) if paths.run_json.exists() else {}
    data.setdefault("schema_version", RUN_SCHEMA_VERSION)
    data.update(fields)
    atomic_write_json(paths.run_json, data)
    return data


@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` says about the fitted ensemble, checked (:func:`parse_run_record`).

    Attributes:
        schema_version: The run.json layout (1 for files written before the field existed).
        status: ``fitting``, ``validating``, ``validation_failed`` or ``trained``.
        fit_key: Hash of data, grid, model and seed the locations were fitted with.
        grid: The tile grid the locations were fitted on (the one place it is read back from).
        preprocessing: Tile preprocessing the models were fitted with.
        locations: Location names, row-major (``grid.location_names()``); one checkpoint each.
        splits: How the images were split (fit / validation counts, the split's name).
        raw: The whole file as read (timings, backbone, model facts, last evaluation).
    """

    schema_version: int
    status: str
    fit_key: str
    grid: TileGrid
    preprocessing: Preprocessing
    locations: tuple[str, ...]
    splits: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_PREPROCESSING_KEYS = tuple(Preprocessing().to_dict())


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def parse_run_record(data: object, source: str = "run.json") -> RunRecord:
    """Check and parse the content of a ``run.json``.

    Args:
        data: The decoded JSON.
        source: What to call it in messages (the file's path).

    Returns:
        The record.

    Raises:
        RunFolderError: For a non-object, a schema version this tilead does not read, or a missing or invalid
            ``status``, ``fit_key``, ``grid``, ``locations`` or ``preprocessing``.
    """
    if not isinstance(data, Mapping):
        raise RunFolderError(f"{source}: expected a JSON object as tilead-train writes, got {_describe(data)}")
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunFolderError(f"{source}: schema_version must be a positive integer, got {_describe(version)}")
    if version > RUN_SCHEMA_VERSION:
        raise RunFolderError(
            f"{source}: schema_version {version} was written by a newer tilead; this one reads run.json up to "
            f"schema_version {RUN_SCHEMA_VERSION}: upgrade tilead"
        )
    for key in ("status", "fit_key"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            what = "missing" if key not in data else f"got {_describe(value)}"
            raise RunFolderError(f"{source}: {key!r}: expected a non-empty string as tilead-train writes, {what}")
    parsed: dict[str, Any] = {}
    for key, parse in (("grid", TileGrid.from_dict), ("preprocessing", Preprocessing.from_dict)):
        if key not in data:
            raise RunFolderError(f"{source}: {key!r} is missing; expected the {key} tilead-train writes")
        value = data[key]
        missing = sorted(set(_PREPROCESSING_KEYS) - set(value)) if isinstance(value, Mapping) else []
        if key == "preprocessing" and missing:  # no defaults: the run was fitted with stated values
            raise RunFolderError(f"{source}: 'preprocessing' lacks {missing}; expected every key tilead-train writes")
        try:
            parsed[key] = parse(data[key])
        except (TypeError, ValueError) as err:
            raise RunFolderError(f"{source}: {key!r} is invalid: {err}") from None
    grid: TileGrid = parsed["grid"]
    names = data.get("locations")
    expected = grid.location_names()
    if not isinstance(names, list) or names != expected:
        raise RunFolderError(
            f"{source}: 'locations' must list the grid's {len(expected)} locations row-major "
            f"({', '.join(expected[:4])}{', ...' if len(expected) > 4 else ''}), got {_describe(names)}"
        )
    splits = data.get("splits", {})
    if not isinstance(splits, Mapping):
        raise RunFolderError(f"{source}: 'splits': expected a JSON object, got {_describe(splits)}")
    return RunRecord(
        schema_version=version,
        status=str(data["status"]),
        fit_key=str(data["fit_key"]),
        grid=grid,
        preprocessing=parsed["preprocessing"],
        locations=tuple(expected),
        splits=dict(splits),
        raw=dict(data),
    )


def read_run_record(paths: RunPaths) -> RunRecord:
    """Read and check ``run.json`` (:func:`parse_run_record`).

    Raises:
        FileNotFoundError: If the run has no run.json (tilead-train writes it before fitting).
        RunFolderError: If it is not valid JSON or not what tilead-train writes.
    """
    if not paths.run_json.is_file():
        raise FileNotFoundError(
            f"{paths.run_json} not found: {paths.root} is not a started tilead run (tilead-train writes run.json "
            "before it fits the first location)"
        )
    try:
        data = read_json(paths.run_json)
    except ValueError as err:
        raise RunFolderError(str(err)) from None
    return parse_run_record(data, str(paths.run_json))


def load_stats(paths: RunPaths) -> NormalizationStats:
    """The run's normalization statistics (``stats.json``'s ``normalization``).

    Raises:
        FileNotFoundError: If training did not finish.
        RunFolderError: If stats.json is not valid JSON or its statistics are missing or invalid.
    """
    if not paths.stats.is_file():
        raise FileNotFoundError(f"{paths.stats} not found: training of {paths.root} did not finish (use --resume)")
    try:
        data = read_json(paths.stats)
    except ValueError as err:
        raise RunFolderError(f"{err}; expected the statistics tilead-train writes: train again with --resume") from None
    if "normalization" not in data:
        raise RunFolderError(
            f"{paths.stats}: no 'normalization' section; expected the statistics tilead-train writes "
            "(normalization, validation): train again with --resume"
        )
    try:
        return NormalizationStats.from_dict(data["normalization"])
    except (TypeError, ValueError) as err:
        raise RunFolderError(f"{paths.stats}: invalid statistics: {err}; train again with --resume") from None
