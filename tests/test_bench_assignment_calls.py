"""benchmarks/bench_assignment_calls.py on the factory's shared-model bundles: both variants, the plan, the ratios."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_module import load_benchmark
from PIL import Image
from test_assignment import TABLE, make_shared_model_bundle


def _load() -> ModuleType:
    return load_benchmark("bench_assignment_calls")


def test_report_compares_the_planned_calls_with_per_model_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load()
    even = make_shared_model_bundle(tmp_path / "even", TABLE, "cluster")  # 2 + 2 locations: per model
    uneven = make_shared_model_bundle(tmp_path / "uneven", (0, 1, 0, 0), "cluster")  # 3 + 1: per location
    one = make_shared_model_bundle(tmp_path / "one", (0, 0, 0, 0), "all_to_one")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "report.json"
    args = [str(even), str(uneven), str(one), "--images", str(images), "--count", "3", "--batch", "1", "2"]
    assert bench.main([*args, "--repeats", "1", "--threads", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    info = report["bundles"]
    assert {k: v["calls"] for k, v in info.items()} == {
        "even": "per model",
        "uneven": "per location",
        "one": "per location",
    }
    assert {k: v["groups"] for k, v in info.items()} == {"even": "2+2", "uneven": "3+1", "one": "4"}
    assert info["one"]["location_workers"] == {"now": 2, "per_model": 1}  # as before: one worker per model
    assert all(v["max_map_difference"] < 1e-5 for v in info.values())
    for batch in ("1", "2"):
        rows = {(r["bundle"], r["variant"]): r for r in report["batches"][batch]}
        assert set(rows) == {(b, v) for b in ("even", "uneven", "one") for v in ("now", "per_model")}
        assert rows[("even", "now")]["vs_reference"] == 1.0
        for name in ("even", "uneven", "one"):
            now, before = rows[(name, "now")], rows[(name, "per_model")]
            assert now["per_model_over_now"] == pytest.approx(before["ms_per_image"] / now["ms_per_image"])
    printed = capsys.readouterr().out
    assert "per location" in printed
    assert "reference: even now" in printed
