"""tilead-bench end to end on a tiny trained bundle (integration: trains for a few seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tilead.cli.bench import main

pytestmark = pytest.mark.integration

STAGE_NAMES = {"input", "tile", "inference", "untile", "seam", "crop", "normalize", "other"}


def test_bench_with_torch_comparison_table_and_json(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = tiny_trained
    out = tmp_path / "bench.json"
    # A fresh interpreter, so the report can show that tilead's route ran before torch was imported.
    args = f"--batch 1,2 --warmup 1 --iterations 4 --compare torch --threads 2 --run {run} --json {out}"
    cmd = [sys.executable, "-m", "tilead.cli.bench", str(bundle), *args.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    text = proc.stdout

    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert [t["name"] for t in report["targets"]] == ["tilead onnxruntime", "torch eager"]
    assert report["memory"]["torch_imported_for_tilead_route"] is False
    assert 0 < report["memory"]["peak_rss_mib_tilead"] <= report["memory"]["peak_rss_mib_process"]
    assert report["environment"]["libraries"]["onnxruntime"]
    sections = text.split("== batch ")[1:]
    for res, section in zip(report["results"], sections, strict=True):
        assert section.startswith(f"{res['batch']} ")
        for name, t in res["targets"].items():
            lat = t["latency_ms"]
            assert t["queries"] == 4
            assert lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
            assert t["images_per_s"] == pytest.approx(res["batch"] * 4 / t["busy_s"])
            stages = {s["stage"] for s in t["stages"]}
            assert {"tile", "inference", "untile", "normalize", "other"} <= stages
            assert stages - STAGE_NAMES <= {f"location:{n}" for n in ("r0c0", "r0c1", "r1c0", "r1c1")}
            # Every row of the table is the JSON's figure.
            row = next(line for line in section.splitlines() if line.startswith(name + " ") and "%" in line)
            cells = row[len(name) :].split()
            assert int(cells[0]) == t["queries"]
            assert float(cells[6]) == pytest.approx(lat["median_ms"], abs=0.051)
            assert float(cells[3]) == pytest.approx(t["latency_per_image_ms"], abs=0.051)
        tilead_t = res["targets"]["tilead onnxruntime"]
        assert {f"location:r{r}c{c}" for r in (0, 1) for c in (0, 1)} <= {s["stage"] for s in tilead_t["stages"]}
        ratio = res["ratio"]["median_latency_ratio"]
        assert ratio == pytest.approx(
            res["targets"]["torch eager"]["latency_ms"]["median_ms"] / tilead_t["latency_ms"]["median_ms"]
        )
        assert f"{ratio:.2f}x" in text
    assert "== batch 2 " in text
    assert "peak RSS" in text


def test_bench_on_real_images_and_for_a_duration(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = tiny_trained
    images = sorted((run.parent / "data").rglob("*.png"))
    good = next(p for p in images if "test" in p.parts)
    runner = CliRunner()
    result = runner.invoke(main, [str(bundle), "--image", str(good), "--duration", "0.3", "--warmup", "0",
                                  "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["input"]["kind"] == "images"
    assert report["input"]["files"] == [str(good)]
    assert report["results"][0]["targets"]["tilead onnxruntime"]["queries"] >= 1
    assert report["results"][0]["ratio"] is None

    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((200, 180, 3), np.uint8))
    wrong = runner.invoke(main, [str(bundle), "--image", str(big), "--iterations", "1"])
    assert wrong.exit_code == 2
    assert "200x180" in wrong.output
    assert "160x160" in wrong.output
    assert "--resize" in wrong.output
    resized = runner.invoke(main, [str(bundle), "--image", str(big), "--resize", "--iterations", "2", "--warmup", "0"])
    assert resized.exit_code == 0, resized.output
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = runner.invoke(main, [str(bundle), "--image", str(broken), "--iterations", "1"])
    assert bad.exit_code == 2
    assert "cannot decode" in bad.output


def test_compare_torch_needs_the_source_run(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = tiny_trained
    result = CliRunner().invoke(main, [str(bundle), "--compare", "torch", "--run", str(tmp_path / "elsewhere"),
                                       "--iterations", "1"])  # fmt: skip
    assert result.exit_code == 2
    assert "--run" in result.output
    assert "elsewhere" in result.output


def test_bench_openvino_beside_onnxruntime(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    """``--backend openvino --compare onnxruntime``: both routes, query by query, in one report."""
    _, bundle = tiny_trained
    out = tmp_path / "bench.json"
    args = ["--backend", "openvino", "--compare", "onnxruntime", "--batch", "2", "--warmup", "1", "--iterations", "3"]
    result = CliRunner().invoke(main, [str(bundle), *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    targets = report["targets"]
    assert [t["name"] for t in targets] == ["tilead openvino", "tilead onnxruntime"]
    assert targets[0]["info"]["providers"][0].startswith("OpenVINO ")
    assert targets[1]["info"]["providers"] == ["CPUExecutionProvider"]
    for t in report["results"][0]["targets"].values():
        assert t["queries"] == 3
        assert {"tile", "inference", "untile", "normalize"} <= {s["stage"] for s in t["stages"]}
    assert "tilead onnxruntime / tilead openvino" in result.output
    bad = CliRunner().invoke(main, [str(bundle), "--backend", "openvino", "--device", "cuda"])
    assert bad.exit_code == 2
    assert "--backend openvino runs on --device cpu" in bad.output
