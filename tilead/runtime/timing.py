"""Wall-clock time per pipeline stage (what ``tilead-bench`` and the benchmarks report)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext


class StageTimes:
    """Seconds accumulated per named stage, in first-seen order.

    Not thread-safe: one instance per call (the Predictor makes one per
    ``predict`` and only merges worker times after they joined).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block into stage ``name`` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def total(self, prefix: str = "") -> float:
        """Sum of the stages whose name starts with ``prefix``."""
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))


def timed(timer: StageTimes | None, name: str) -> AbstractContextManager[None]:
    """``timer.stage(name)``, or a no-op when ``timer`` is None."""
    return timer.stage(name) if timer is not None else nullcontext()
