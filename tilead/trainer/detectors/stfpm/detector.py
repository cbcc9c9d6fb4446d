"""STFPM behind the detector interface: one student trained per tile location.

The math (student, loss, map) lives in :mod:`tilead.trainer.detectors.stfpm.model`. This
module trains a location's student on its defect-free tiles:

* the run's frozen backbone is the teacher; the student is a randomly
  initialised copy of its truncated graph (seeded by the run's seed);
* a location's tiles and teacher features are computed once and kept in
  memory when they fit in ``cache_mib`` (then every epoch is shuffled);
  otherwise every epoch re-reads the tiles in file order and re-runs the teacher;
* after every epoch the loss on the held-out good tiles (``holdout_fraction``
  of the fit images, drawn by the ensemble) decides early stopping
  (``patience``, ``min_delta``), and the student of the best epoch is kept;
* after every epoch the whole training state (student, best student,
  optimizer, shuffling generator, curves) is written atomically to
  ``work_dir/progress.safetensors``, so an interrupted location resumes from
  its last finished epoch (bit-identical to an uninterrupted run on the same
  machine and thread count).

State tensors: the student's ``state_dict`` (parameters and BatchNorm
statistics), float32, identical keys and shapes for every location, so the
exporter traces the first location once and swaps the weights of the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tilead.trainer.detectors.base import Detector, LocationModel, LocationState, TileSource, register
from tilead.trainer.detectors.stfpm.model import (
    StfpmLocationModel,
    freeze_batchnorm,
    make_student,
    stfpm_loss,
    student_features,
)
from tilead.trainer.io import load_tensors, save_tensors

log = logging.getLogger("tilead.trainer.stfpm")

PROGRESS_FILE = "progress.safetensors"
_PROGRESS_KEY = "stfpm_progress"


@dataclass
class TrainingProgress:
    """Where a location's training stands after its last finished epoch (JSON-able).

    Attributes:
        resume_key: Hash of everything the training depends on.
        epoch: Epochs finished.
        best_epoch: Epoch (1-based) of the lowest held-out loss, 0 before any.
        best_loss: That loss (``inf`` before any).
        bad_epochs: Epochs since the last improvement.
        done: Training finished (all epochs, or stopped early).
        stopped_early: Early stopping ended it.
        history: Per epoch: ``epoch``, ``train_loss``, ``holdout_loss``, ``seconds``.
    """

    resume_key: str
    epoch: int = 0
    best_epoch: int = 0
    best_loss: float = float("inf")
    bad_epochs: int = 0
    done: bool = False
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Cache:
    """A location's tiles and teacher features, in memory."""

    tiles: torch.Tensor  # (N, C, th, tw)
    teacher: list[torch.Tensor]  # per stage (N, c_k, h_k, w_k)


def _rebatch(source: TileSource, size: int) -> Iterator[torch.Tensor]:
    """One pass over ``source`` in batches of exactly ``size`` tiles (the last may be smaller)."""
    pending: list[torch.Tensor] = []
    count = 0
    for batch in source:
        pending.append(batch)
        count += int(batch.shape[0])
        while count >= size:
            whole = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield whole[:size]
            rest = whole[size:]
            pending, count = ([rest], int(rest.shape[0])) if rest.shape[0] else ([], 0)
    if count:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@register
class StfpmDetector(Detector):
    """STFPM (Wang et al., 2021): student-teacher feature pyramid matching per location.

    Settings: the ``model`` section with ``family: stfpm``
    (:class:`tilead.trainer.detectors.stfpm.config.StfpmConfig`).
    """

    family = "stfpm"
    state_format = "tilead.stfpm.v1"

    @property
    def holdout_fraction(self) -> float:
        """``model.holdout_fraction``: good fit images held out for early stopping."""
        return float(self.settings.holdout_fraction)

    # -- fitting ----------------------------------------------------------------------------------

    def fit(self, fit: TileSource, holdout: TileSource, *, progress: bool = True) -> LocationState:
        """Train the location's student (see the module docstring).

        Raises:
            ValueError: If ``fit`` has no tiles.
        """
        if fit.num_images < 1:
            raise ValueError("STFPM needs at least 1 training tile per location, got 0")
        s = self.settings
        student = make_student(self.backbone, self.seed)
        optimizer = self._optimizer(student)
        shuffle = torch.Generator().manual_seed(self.seed)
        best = {k: v.detach().clone() for k, v in student.state_dict().items()}
        state = TrainingProgress(self._resume_key(fit, holdout))
        resumed = self._load_progress(state.resume_key, student, optimizer, shuffle, best)
        if resumed is not None:
            state = resumed
            log.info("%s: resuming at epoch %d of %d", fit.label, state.epoch + 1, s.epochs)
        if not state.done:
            self._train(fit, holdout, student, optimizer, shuffle, best, state, progress)
        if holdout.num_images > 0 and state.best_epoch > 0:
            student.load_state_dict(best)
        tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in student.state_dict().items()}  # fmt: skip
        meta = {
            "epochs_run": state.epoch,
            "best_epoch": state.best_epoch if holdout.num_images > 0 else state.epoch,
            "stopped_early": state.stopped_early,
            "holdout_tiles": holdout.num_images,
            "history": state.history,
        }
        return LocationState(tensors, meta, fit.num_images)

    def _train(
        self,
        fit: TileSource,
        holdout: TileSource,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        shuffle: torch.Generator,
        best: dict[str, torch.Tensor],
        state: TrainingProgress,
        progress: bool,
    ) -> None:
        """Run epochs from ``state.epoch`` until done, saving progress after each."""
        s = self.settings
        fit_cache = self._cache(fit)
        hold_cache = self._cache(holdout) if holdout.num_images > 0 else None
        bar = tqdm(total=s.epochs, initial=state.epoch, desc=f"{fit.label} epochs", unit="epoch", leave=False,
                   disable=not progress)  # fmt: skip
        try:
            while not state.done:
                start = time.perf_counter()
                student.train()
                total, count = 0.0, 0
                batches = tqdm(self._batches(fit, fit_cache, shuffle), total=-(-fit.num_images // s.batch_size),
                               desc=f"{fit.label} epoch {state.epoch + 1}", unit="batch", leave=False,
                               disable=not progress)  # fmt: skip
                for x, teacher in batches:
                    loss = stfpm_loss(teacher, student_features(student, self.backbone.info.layers, x))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                    total += float(loss.detach()) * int(x.shape[0])
                    count += int(x.shape[0])
                    batches.set_postfix(loss=f"{float(loss.detach()):.4f}")
                state.epoch += 1
                record = {"epoch": state.epoch, "train_loss": total / max(1, count)}
                if holdout.num_images > 0:
                    val = self._holdout_loss(holdout, hold_cache, student)
                    record["holdout_loss"] = val
                    if val < state.best_loss - s.min_delta:
                        state.best_loss, state.best_epoch, state.bad_epochs = val, state.epoch, 0
                        best.update({k: v.detach().clone() for k, v in student.state_dict().items()})
                    else:
                        state.bad_epochs += 1
                    if s.patience > 0 and state.bad_epochs >= s.patience:
                        state.stopped_early = True
                record["seconds"] = round(time.perf_counter() - start, 2)
                state.history.append(record)
                state.done = state.stopped_early or state.epoch >= s.epochs
                self._save_progress(state, student, optimizer, shuffle, best)
                log.info("%s: epoch %d %s", fit.label, state.epoch,
                         ", ".join(f"{k} {v:.5g}" for k, v in record.items() if k != "epoch"))  # fmt: skip
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.endswith("loss")})
                bar.update(1)
        finally:
            bar.close()
        if state.stopped_early:
            log.info("%s: early stop after epoch %d (best %d)", fit.label, state.epoch, state.best_epoch)

    def _optimizer(self, student: nn.Module) -> torch.optim.Optimizer:
        s = self.settings
        params = [p for p in student.parameters() if p.requires_grad]
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay)
        return torch.optim.Adam(params, lr=s.learning_rate, weight_decay=s.weight_decay)

    def _teacher(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.backbone(x))

    def _cache(self, source: TileSource) -> _Cache | None:
        """The source's tiles and teacher features in memory, or None when over ``cache_mib``."""
        limit = int(self.settings.cache_mib) * 2**20
        tiles: list[torch.Tensor] = []
        feats: list[list[torch.Tensor]] = []
        for batch in source:
            t = self._teacher(batch)
            if not tiles:
                per_tile = (batch[0].numel() + sum(f[0].numel() for f in t)) * 4
                if per_tile * source.num_images > limit:
                    log.info("%s: cache would take %.0f MiB > cache_mib; streaming every epoch", source.label,
                             per_tile * source.num_images / 2**20)  # fmt: skip
                    return None
            tiles.append(batch)
            feats.append(t)
        if not tiles:
            return None
        return _Cache(torch.cat(tiles), [torch.cat(stage) for stage in zip(*feats, strict=True)])

    def _batches(
        self, source: TileSource, cache: _Cache | None, shuffle: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Training (or evaluation) batches ``(tiles, teacher features)`` of ``model.batch_size``."""
        size = int(self.settings.batch_size)
        if cache is None:
            for x in _rebatch(source, size):
                x = _channels_last(x)
                yield x, self._teacher(x)
            return
        n = int(cache.tiles.shape[0])
        order = torch.randperm(n, generator=shuffle) if shuffle is not None else torch.arange(n)
        for lo in range(0, n, size):
            idx = order[lo : lo + size]
            yield _channels_last(cache.tiles[idx]), [_channels_last(t[idx]) for t in cache.teacher]

    def _holdout_loss(self, holdout: TileSource, cache: _Cache | None, student: nn.Module) -> float:
        """Mean loss per held-out tile, student in eval mode."""
        student.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, teacher in self._batches(holdout, cache, None):
                loss = stfpm_loss(teacher, student_features(student, self.backbone.info.layers, x))
                total += float(loss) * int(x.shape[0])
                count += int(x.shape[0])
        return total / max(1, count)

    # -- resumable progress -----------------------------------------------------------------------

    def _resume_key(self, fit: TileSource, holdout: TileSource) -> str:
        blob = json.dumps(
            {
                "settings": json.loads(self.settings.model_dump_json()),
                "seed": self.seed,
                "tile_size": list(self.tile_size),
                "fit": fit.num_images,
                "holdout": holdout.num_images,
                "layers": list(self.backbone.info.layers),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _progress_path(self) -> Path | None:
        return None if self.work_dir is None else Path(self.work_dir) / PROGRESS_FILE

    def _save_progress(
        self,
        state: TrainingProgress,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        shuffle: torch.Generator,
        best: dict[str, torch.Tensor],
    ) -> None:
        """Write the training state after an epoch (atomic; nothing when there is no ``work_dir``)."""
        path = self._progress_path()
        if path is None:
            return
        tensors: dict[str, torch.Tensor] = {f"student.{k}": v.detach().clone() for k, v in student.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best.items()})
        opt = optimizer.state_dict()
        for pid, entry in opt["state"].items():
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{pid}.{k}"] = v.detach().clone()
        tensors["shuffle_rng"] = shuffle.get_state()
        info = {**state.__dict__, "param_groups": opt["param_groups"]}
        save_tensors(path, tensors, {_PROGRESS_KEY: json.dumps(info)})

    def _load_progress(
        self,
        key: str,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        shuffle: torch.Generator,
        best: dict[str, torch.Tensor],
    ) -> TrainingProgress | None:
        """Restore the state of the last finished epoch, when a matching progress file exists."""
        path = self._progress_path()
        if path is None or not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
            info = json.loads(meta[_PROGRESS_KEY])
        except (ValueError, KeyError) as err:
            log.warning("%s: unreadable training progress (%s); starting the location afresh", path, err)
            return None
        if info.get("resume_key") != key:
            log.warning("%s: progress of other settings or data; starting the location afresh", path)
            return None
        student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
        best.update({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": info.pop("param_groups")})
        shuffle.set_state(tensors["shuffle_rng"])
        return TrainingProgress(**info)

    # -- inference --------------------------------------------------------------------------------

    def build(self, state: LocationState, *, export: bool = False, with_score: bool = False) -> LocationModel:
        """Teacher + this location's student; for export the student's BatchNorms become scale/shift.

        Raises:
            ValueError: If the state is not a student of this backbone.
        """
        student = make_student(self.backbone, self.seed)
        try:
            student.load_state_dict(state.tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"STFPM state does not fit backbone {self.backbone.info.name} "
                             f"layers {list(self.backbone.info.layers)}: {err}") from None  # fmt: skip
        if export:
            student = freeze_batchnorm(student)  # named scale/shift initializers: the exporter can swap weights
        s = self.settings
        return StfpmLocationModel(self.backbone, student, self.map_size, s.reduction, s.blur_sigma).eval()

    def summary(self) -> dict[str, Any]:
        """Adds the stages, reduction, training settings and the student's size."""
        s = self.settings
        student = make_student(self.backbone, self.seed)
        nbytes = sum(v.numel() * v.element_size() for v in student.state_dict().values())
        return {
            **super().summary(),
            "stages": list(self.backbone.info.layers),
            "reduction": s.reduction,
            "training": {
                "epochs": s.epochs,
                "optimizer": s.optimizer,
                "learning_rate": s.learning_rate,
                "batch_size": s.batch_size,
                "holdout_fraction": s.holdout_fraction,
                "patience": s.patience,
            },
            "state_bytes_per_location": nbytes,
        }

    def manifest_info(self) -> dict[str, Any]:
        """The matched stages and how their maps combine (under the manifest's ``model.detector``)."""
        return {"detector": {"stages": list(self.backbone.info.layers), "reduction": self.settings.reduction}}
