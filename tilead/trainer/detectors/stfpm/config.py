"""STFPM's ``model`` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tilead.trainer.detectors.sections import DetectorSection, register_section


@register_section
class StfpmConfig(DetectorSection):
    """STFPM (``family: stfpm``): a student network per location trained to match the frozen teacher.

    Attributes:
        backbone: The pretrained teacher; the student is a randomly
            initialised copy of its truncated graph, and ``layers`` are the
            matched stages.
        reduction: How the per-stage maps combine: ``product`` (the paper) or ``sum``.
        epochs: Most training epochs per location.
        optimizer: ``adam`` or ``sgd`` (with ``momentum``, the paper's choice).
        learning_rate: Step size.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay.
        batch_size: Tiles per optimisation step.
        holdout_fraction: Fraction of the fit images held out for early
            stopping (0: none; every epoch runs and the last one is kept).
        patience: Epochs without a lower held-out loss before training stops
            (0: never early; with a holdout the best epoch is still kept).
        min_delta: Smallest decrease of the held-out loss that counts as better.
        cache_mib: Keep a location's tiles and teacher features in memory when
            they fit in this many MiB (shuffled every epoch); above it tiles
            are re-read and the teacher re-run every epoch, in file order.
    """

    family: Literal["stfpm"] = "stfpm"
    blur_sigma: float = Field(default=2.0, ge=0, le=8)
    reduction: Literal["product", "sum"] = "product"
    epochs: int = Field(default=10, ge=1, le=10_000)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    batch_size: int = Field(default=4, ge=1, le=1024)
    holdout_fraction: float = Field(default=0.1, ge=0, lt=1)
    patience: int = Field(default=2, ge=0, le=10_000)
    min_delta: float = Field(default=0.0, ge=0)
    cache_mib: int = Field(default=2048, ge=0)

    @model_validator(mode="after")
    def _early_stopping(self) -> StfpmConfig:
        if self.patience > 0 and self.holdout_fraction == 0:
            raise ValueError(
                f"patience {self.patience} needs held-out tiles: set holdout_fraction > 0 "
                "(or patience 0 to train every epoch)"
            )
        return self
