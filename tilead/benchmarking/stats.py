"""Latency statistics of a sequence of timed queries (trtexec / onnxruntime_perf_test style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Above this coefficient of variation the report warns that the latencies are unstable (trtexec uses 10 %).
CV_WARNING = 0.10


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-query latencies, in milliseconds.

    Percentiles use linear interpolation between order statistics (numpy's
    default), so ``median`` of an even count is the mean of the middle two.
    ``cv`` is the population standard deviation over the mean.

    Attributes:
        count: Timed queries.
        total_s: Sum of the latencies in seconds.
        min_ms: Fastest query.
        mean_ms: Mean.
        median_ms: 50th percentile.
        p90_ms: 90th percentile.
        p95_ms: 95th percentile.
        p99_ms: 99th percentile.
        max_ms: Slowest query.
        std_ms: Population standard deviation.
        cv: Coefficient of variation, ``std / mean``.
    """

    count: int
    total_s: float
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    cv: float

    @property
    def unstable(self) -> bool:
        """True when the coefficient of variation exceeds :data:`CV_WARNING`."""
        return self.cv > CV_WARNING

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Summarize per-query latencies.

    Args:
        seconds: One wall-clock latency per timed query, in seconds.

    Returns:
        The statistics in milliseconds.

    Raises:
        ValueError: For an empty sequence, or a negative or non-finite value.
    """
    values = np.asarray(seconds, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"latency_stats: expected a non-empty 1-D sequence of seconds, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("latency_stats: every latency must be finite and >= 0 seconds")
    ms = values * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    mean = float(ms.mean())
    std = float(ms.std())
    return LatencyStats(
        count=int(ms.size),
        total_s=float(values.sum()),
        min_ms=float(ms.min()),
        mean_ms=mean,
        median_ms=float(p50),
        p90_ms=float(p90),
        p95_ms=float(p95),
        p99_ms=float(p99),
        max_ms=float(ms.max()),
        std_ms=std,
        cv=std / mean if mean > 0 else 0.0,
    )
