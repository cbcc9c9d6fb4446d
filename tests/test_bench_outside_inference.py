"""benchmarks/bench_outside_inference.py on a small real bundle: both tables, the fused kernel's columns."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_module import load_benchmark
from bundle_factory import make_bundle
from PIL import Image

from tilead.runtime import Predictor


def _load() -> ModuleType:
    return load_benchmark("bench_outside_inference")


def test_tables_report_every_stage_and_the_fused_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    bundle = make_bundle(tmp_path / "bundle")
    with Predictor(bundle) as predictor:
        h, w = predictor.image_size
        fused = predictor.manifest.grid.canvas_size == predictor.image_size
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (h + 3, w + 5, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "report.json"
    args = [str(bundle), str(images), "--batch", "1", "2", "--repeats", "2", "--images", "3", "--kernels"]
    assert bench.main([*args, "--threads", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 3
    for row in report["predict"].values():
        assert row["wall"] > row["outside"] > 0
        assert row["outside_share"] == pytest.approx(row["outside"] / row["wall"])
        assert {"tile", "inference", "untile", "normalize"} <= set(row)
        if fused:  # one pass: no seam or crop stage of its own
            assert not {"seam", "crop"} & set(row)
    for row in report["kernels"].values():
        chain = row["tile"] + row["untile"] + row["normalize"] + row.get("seam", 0.0)
        assert row["sum"] == pytest.approx(chain)
        assert ("fused" in row) == fused
        if fused:
            assert row["tile+fused"] == pytest.approx(row["tile"] + row["fused"])
        assert row["tile_u8"] > 0  # the grid (edge shift) fits uint8 tiles
    assert report["batch_tiling"] is None  # an ONNX Runtime bundle takes float tiles: no uint8 batch to compare
    text = capsys.readouterr().out
    assert "target: outside inference <= 5% of the wall time" in text
    assert ("the fused pass" in text) == fused
