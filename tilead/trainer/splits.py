"""Which images fit the models and which give the statistics: the validation split and a detector's holdout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilead.trainer.config import RunConfig
from tilead.trainer.data import DatasetSplits, Sample


@dataclass(frozen=True)
class Splits:
    """Which images fit the models and which give the statistics."""

    fit: tuple[Sample, ...]
    validation: tuple[Sample, ...]
    test: tuple[Sample, ...]
    description: dict[str, Any]


def make_splits(cfg: RunConfig, splits: DatasetSplits) -> Splits:
    """Apply the validation config to the discovered dataset.

    ``holdout`` and ``synthetic`` draw the same seeded fraction of the good
    training images (at least one, and at least two are left to fit);
    ``same_as_test`` needs a test set.

    Raises:
        ValueError: If too few training images remain, or ``same_as_test`` has no test images.
    """
    train = tuple(splits.train)
    v = cfg.validation
    desc: dict[str, Any]
    if v.split == "same_as_test":
        if not splits.test:
            raise ValueError(
                "validation.split 'same_as_test': the dataset has no test images (good images only); "
                "use validation.split: synthetic (held-out good images plus synthetic defects) or holdout"
            )
        desc = {
            "split": "same_as_test",
            "note": "statistics and thresholds come from the test set (as anomalib's same_as_test); "
            "threshold-dependent test metrics are therefore optimistic",
        }
        fit, val = train, tuple(splits.test)
    else:
        n_val = max(1, round(len(train) * v.holdout_fraction))
        if len(train) - n_val < 2:
            raise ValueError(
                f"validation.holdout_fraction {v.holdout_fraction}: only {len(train)} training images, "
                f"holding out {n_val} leaves fewer than 2 to fit"
            )
        rng = np.random.default_rng(cfg.seed)
        chosen = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        val = tuple(s for i, s in enumerate(train) if i in chosen)
        fit = tuple(s for i, s in enumerate(train) if i not in chosen)
        desc = {
            "split": v.split,
            "note": f"{n_val} good training images held out (seed {cfg.seed}); they are not used for fitting"
            + ("; synthetic defects are drawn into copies of them" if v.split == "synthetic" else ""),
        }
    desc.update(
        {
            "fit_images": len(fit),
            "validation_images": len(val),
            "validation_anomalous": sum(s.label for s in val),
            "test_images": len(splits.test),
        }
    )
    return Splits(fit, val, tuple(splits.test), desc)


def holdout_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split fit images into ``(fit, holdout)`` for a detector that asks for a holdout.

    ``fraction`` 0 holds out nothing; otherwise a seeded ``max(1, round(n * fraction))``.

    Raises:
        ValueError: If fewer than 2 images would be left to fit.
    """
    if fraction <= 0:
        return list(samples), []
    n = len(samples)
    n_hold = max(1, round(n * fraction))
    if n - n_hold < 2:
        raise ValueError(f"detector holdout fraction {fraction}: {n} fit images, holding out {n_hold} leaves < 2")
    rng = np.random.default_rng(seed + 7919)  # independent of the validation split's draw
    chosen = set(rng.choice(n, size=n_hold, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen]
