"""tilead-bench's parts without a bundle: statistics, the timed loop, the report, argument errors."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tilead.benchmarking.report import batch_result, render, warnings_for
from tilead.benchmarking.runner import Measurement, make_batch, measure
from tilead.benchmarking.stats import latency_stats
from tilead.cli.bench import main
from tilead.runtime.timing import StageTimes

# -- statistics -------------------------------------------------------------------------------------


def test_stats_of_four_values_worked_by_hand() -> None:
    s = latency_stats([0.010, 0.040, 0.020, 0.030])  # order must not matter
    assert s.count == 4
    assert s.total_s == pytest.approx(0.1)
    assert (s.min_ms, s.max_ms) == pytest.approx((10.0, 40.0))
    assert s.mean_ms == pytest.approx(25.0)
    assert s.median_ms == pytest.approx(25.0)  # mean of the middle two
    # Linear interpolation: rank (n - 1) * q = 2.7 -> 30 + 0.7 * (40 - 30).
    assert s.p90_ms == pytest.approx(37.0)
    assert s.p95_ms == pytest.approx(38.5)
    assert s.p99_ms == pytest.approx(39.7)
    assert s.std_ms == pytest.approx(math.sqrt(125.0))  # population: mean of squared deviations 225, 25, 25, 225
    assert s.cv == pytest.approx(math.sqrt(125.0) / 25.0)
    assert s.unstable  # 44.7 % > 10 %


def test_stats_of_1_to_100_ms() -> None:
    s = latency_stats([k / 1000 for k in range(1, 101)])
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)  # rank 89.1
    assert s.p95_ms == pytest.approx(95.05)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.std_ms == pytest.approx(math.sqrt((100**2 - 1) / 12))


def test_stats_of_a_constant_sequence_are_stable() -> None:
    s = latency_stats([0.005] * 7)
    assert s.cv == 0.0
    assert not s.unstable
    assert s.p99_ms == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [[], [0.1, float("nan")], [0.1, -0.001], [[0.1, 0.2]]])
def test_stats_reject_bad_sequences(bad: Any) -> None:
    with pytest.raises(ValueError, match="latency_stats"):
        latency_stats(bad)


# -- the timed loop ---------------------------------------------------------------------------------


class FakeTarget:
    """Records its calls; reports fixed stage times (and optionally sleeps)."""

    def __init__(self, name: str, log: list[str], stages: dict[str, float], sleep: float = 0.0) -> None:
        self.name, self.log, self.stages, self.sleep = name, log, stages, sleep
        self.info: dict[str, Any] = {"backend": "fake"}
        self.load_s = 0.0

    def run(self, batch: np.ndarray) -> StageTimes:
        self.log.append(self.name)
        assert batch.dtype == np.uint8
        assert batch.ndim == 4
        if self.sleep:
            time.sleep(self.sleep)
        t = StageTimes()
        for k, v in self.stages.items():
            t.add(k, v)
        return t

    def close(self) -> None:
        pass


def test_measure_alternates_targets_and_sums_stages() -> None:
    log: list[str] = []
    a = FakeTarget("a", log, {"tile": 0.001, "inference": 0.010, "location:r0c0": 0.009})
    b = FakeTarget("b", log, {"inference": 0.020})
    batch = make_batch([np.zeros((4, 4, 3), np.uint8)], 2)
    ma, mb = measure([a, b], batch, iterations=5, duration=None, progress=False)
    assert log == ["a", "b"] * 5
    assert len(ma.latencies) == len(mb.latencies) == 5
    assert ma.stage_seconds == pytest.approx({"tile": 0.005, "inference": 0.05, "location:r0c0": 0.045})
    assert mb.stage_seconds == pytest.approx({"inference": 0.1})


def test_measure_for_a_duration_stops_after_it() -> None:
    log: list[str] = []
    target = FakeTarget("a", log, {}, sleep=0.01)
    start = time.perf_counter()
    (m,) = measure([target], make_batch([np.zeros((2, 2, 1), np.uint8)], 1), iterations=None, duration=0.08,
                   progress=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert elapsed >= 0.08
    assert 2 <= len(m.latencies) <= 9  # 10 ms per query, stopping at the first round past 80 ms
    assert all(x >= 0.01 for x in m.latencies)


@pytest.mark.parametrize(("iterations", "duration"), [(None, None), (3, 1.0), (0, None), (None, -1.0)])
def test_measure_needs_exactly_one_positive_bound(iterations: int | None, duration: float | None) -> None:
    with pytest.raises(ValueError, match="measure"):
        measure([], np.zeros((1, 1, 1, 1), np.uint8), iterations=iterations, duration=duration, progress=False)


def test_make_batch_cycles_images() -> None:
    imgs = [np.full((2, 3, 1), i, np.uint8) for i in range(3)]
    batch = make_batch(imgs, 5)
    assert batch.shape == (5, 2, 3, 1)
    assert [int(x[0, 0, 0]) for x in batch] == [0, 1, 2, 0, 1]


# -- the report -------------------------------------------------------------------------------------


def _measurement(latencies_ms: list[float], stages_ms: dict[str, float]) -> Measurement:
    m = Measurement()
    for lat in latencies_ms:
        m.add(lat / 1e3, {k: v / 1e3 for k, v in stages_ms.items()})
    return m


def _report(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "bundle": {
            "path": "b",
            "family": "padim",
            "size_mib": 1.0,
            "grid": {"rows": 1, "cols": 2, "tile_size": [96, 96], "image_size": [96, 160]},
        },
        "input": {"description": "synthetic"},
        "settings": {"warmup": 1, "iterations": 4, "duration_s": None},
        "targets": [
            {"name": "fast", "load_s": 0.1, "info": {"backend": "x", "providers": ["P1", "P2"]}},
            {"name": "slow", "load_s": 1.0, "info": {"backend": "y"}},
        ],
        "results": results,
        "notes": ["a note"],
        "memory": {
            "peak_rss_mib_tilead": 100.0,
            "peak_rss_mib_process": 300.0,
            "gpu_memory_used_mib": None,
            "gpu_note": "no GPU route",
            "torch_imported_for_tilead_route": False,
        },
        "warnings": warnings_for(results),
    }


def test_batch_result_figures() -> None:
    fast = _measurement([10, 10, 12, 10], {"tile": 1.0, "inference": 8.0, "location:r0c0": 7.0})
    slow = _measurement([50, 50, 50, 50], {"inference": 49.0})
    res = batch_result(2, ["fast", "slow"], [fast, slow])
    f = res["targets"]["fast"]
    assert f["queries"] == 4
    assert f["busy_s"] == pytest.approx(0.042)
    assert f["images_per_s"] == pytest.approx(2 * 4 / 0.042)
    assert f["latency_per_image_ms"] == pytest.approx(5.0)  # median 10 ms over 2 images
    stages = {r["stage"]: r for r in f["stages"]}
    assert stages["tile"]["mean_ms"] == pytest.approx(1.0)
    assert stages["inference"]["share"] == pytest.approx(8.0 / 10.5)
    assert stages["location:r0c0"]["share"] is None  # overlapping: no share of the total
    assert stages["other"]["mean_ms"] == pytest.approx(10.5 - 9.0)
    assert res["ratio"]["median_latency_ratio"] == pytest.approx(5.0)
    assert f["unstable"] is False


def test_table_shows_the_json_figures() -> None:
    fast = _measurement([10, 11, 12, 30], {"tile": 1.0, "inference": 8.0})
    slow = _measurement([50, 51, 52, 53], {"inference": 49.0})
    results = [batch_result(1, ["fast", "slow"], [fast, slow])]
    report = _report(results)
    text = render(report)
    row = next(line for line in text.splitlines() if line.startswith("fast "))
    cells = row.split()
    lat = results[0]["targets"]["fast"]["latency_ms"]
    expected = [lat[k] for k in ("min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")]
    assert [float(c) for c in cells[5:12]] == pytest.approx(expected, abs=0.051)
    assert float(cells[4]) == pytest.approx(results[0]["targets"]["fast"]["latency_per_image_ms"], abs=0.051)
    assert cells[12] == f"{lat['cv']:.1%}"
    ratio = re.search(r"slow / fast, median latency: ([\d.]+)x", text)
    assert ratio is not None
    assert float(ratio.group(1)) == pytest.approx(results[0]["ratio"]["median_latency_ratio"], abs=0.006)
    assert "providers P1+P2" in text
    # The fast route's CV is 45 %: the warning names it and the batch.
    assert any(w.startswith("fast, batch 1: latency coefficient of variation") for w in report["warnings"])
    assert "WARNING       fast, batch 1" in text
    assert "not measured (no GPU route)" in text


# -- command-line errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iterations", "3", "--duration", "1"], "exclusive"),
        (["--batch", "0"], "between 1 and 1024"),
        (["--batch", "1,x"], "expected positive integers"),
        (["--duration", "0"], "--duration"),
        (["--warmup", "-1"], "--warmup"),
        (["--compare", "onnxruntime"], "add --backend tensorrt"),
        (["--compare", "tensorflow"], "'torch', 'onnxruntime'"),
        (["--run", "."], "only used by --compare torch"),
        (["--resize"], "--resize applies to --image"),
        (["--device", "tpu"], "'cpu', 'cuda'"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, [str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_bundle_and_unbuilt_backend_are_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, [str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output
    empty = runner.invoke(main, [str(tmp_path)])
    assert empty.exit_code == 1
    assert "manifest.json" in empty.output
    trt = runner.invoke(main, [str(tmp_path), "--backend", "tensorrt"])
    assert trt.exit_code == 2
    assert "add --device cuda" in trt.output
