"""The run folder: where a training run keeps everything it produced.

```
RUN/
  config.yaml              the resolved, validated config
  run.json                 grid, preprocessing, backbone, splits, per-location
                           state sizes, timings, peak RSS, status
  locations/rRcC.safetensors   one fitted location each (written when done)
  partial/rRcC/             progress of a location being fitted (trained detectors;
                           removed when its checkpoint is written)
  stats.json               normalization statistics + how they were obtained
  train.log                the log of every train / eval invocation
  eval/                    metrics.json, per_image.csv, overlays/*.png
```

Resume rule: a location counts as done when its checkpoint exists, loads,
and carries the run's ``fit_key`` (a hash of data, grid, model and seed).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilead.trainer.config import ConfigError, RunConfig, load_config, save_config
from tilead.trainer.io import atomic_write_json

log = logging.getLogger("tilead.trainer")


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
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def update_run_json(paths: RunPaths, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run.json`` (atomically) and return the result."""
    data = read_json(paths.run_json) if paths.run_json.exists() else {}
    data.update(fields)
    atomic_write_json(paths.run_json, data)
    return data


def open_run(root: Path) -> tuple[RunPaths, RunConfig]:
    """Open a finished (or partial) run folder for evaluation or export.

    Raises:
        FileNotFoundError: If ``root`` is not a run folder.
    """
    paths = RunPaths(Path(root))
    if not paths.config.is_file():
        raise FileNotFoundError(f"{root} is not a tilead run folder (no config.yaml); run tilead-train first")
    return paths, load_config(paths.config)
