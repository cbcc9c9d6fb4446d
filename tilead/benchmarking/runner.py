"""The timed loop: warm-up, then queries interleaved across targets, with progress."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from tilead.benchmarking.targets import Target

# Stages directly under a query, in pipeline order (``location:<name>`` entries sit under ``inference``).
PIPELINE_STAGES = ("input", "tile", "h2d", "inference", "untile", "seam", "crop", "normalize", "d2h")


@dataclass
class Measurement:
    """What one target did over the timed queries of one batch size.

    Attributes:
        latencies: Wall-clock seconds of each query (one ``run`` of a batch).
        stage_seconds: Seconds per stage summed over the queries.
    """

    latencies: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, latency: float, stages: dict[str, float]) -> None:
        """Record one query."""
        self.latencies.append(latency)
        for name, sec in stages.items():
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + sec


def make_batch(images: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """A ``(batch, H, W, C)`` uint8 batch cycling through ``images``."""
    return np.stack([images[i % len(images)] for i in range(batch)])


def warm_up(target: Target, batch: np.ndarray, iterations: int) -> None:
    """Untimed calls (first-call allocations, kernel selection, caches)."""
    for _ in range(iterations):
        target.run(batch)


def measure(
    targets: Sequence[Target],
    batch: np.ndarray,
    *,
    iterations: int | None,
    duration: float | None,
    progress: bool,
    label: str = "",
) -> list[Measurement]:
    """Time queries of ``batch``, alternating the targets so they share the machine's state.

    Round ``k`` runs target 0, then 1, ... on the same batch. The loop stops
    after ``iterations`` rounds, or once ``duration`` seconds of wall time have
    passed (at least one round).

    Args:
        targets: Routes to time.
        batch: uint8 ``(n, H, W, C)``.
        iterations: Rounds to run (exclusive with ``duration``).
        duration: Seconds to run for (exclusive with ``iterations``).
        progress: Show a progress bar (stderr).
        label: Progress bar prefix.

    Returns:
        One :class:`Measurement` per target, in order.

    Raises:
        ValueError: Unless exactly one of ``iterations`` and ``duration`` is given, positive.
    """
    if (iterations is None) == (duration is None):
        raise ValueError("measure: give exactly one of iterations and duration")
    if (iterations is not None and iterations < 1) or (duration is not None and duration <= 0):
        raise ValueError(f"measure: iterations must be >= 1 and duration > 0, got {iterations} and {duration}")
    results = [Measurement() for _ in targets]
    total = float(iterations) if iterations is not None else float(duration or 0.0)
    unit = "query" if iterations is not None else "s"
    bar = tqdm(total=total, desc=label, unit=unit, disable=not progress, leave=False)
    start = time.perf_counter()
    rounds = 0
    try:
        while True:
            for target, result in zip(targets, results, strict=True):
                t0 = time.perf_counter()
                times = target.run(batch)
                result.add(time.perf_counter() - t0, times.seconds)
            rounds += 1
            elapsed = time.perf_counter() - start
            if iterations is not None:
                bar.update(1)
                if rounds >= iterations:
                    break
            else:
                bar.n = min(elapsed, total)
                bar.refresh()
                if elapsed >= total:
                    break
    finally:
        bar.close()
    return results
