"""``tilead predict`` loses nothing (issue #16 item 2, #19 item 2) and the ``tilead`` command group (#19 item 1).

Real bundle, real files, real subprocesses: a tree with good, defective,
truncated, wrong-size and non-image files; an unwritable output folder; a
predict process killed with SIGKILL part way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tilead.cli.main import main as tilead_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "padim_demo.yaml"


def _records(path: Path) -> list[dict[str, object]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the last line is partial"
    return [json.loads(line) for line in text.splitlines()]


def _tree(data: Path, target: Path) -> Path:
    """good/ and scratch/ copies of the tiny data's test images (same file names), plus broken files."""
    for kind in ("good", "scratch"):
        (target / kind).mkdir(parents=True)
        for p in sorted((data / "test" / kind).glob("*.png"))[:2]:
            shutil.copy(p, target / kind / p.name)
    good = sorted((target / "good").glob("*.png"))[0]
    blob = good.read_bytes()
    (target / "broken").mkdir()
    (target / "broken" / "truncated.png").write_bytes(blob[: len(blob) // 3])
    (target / "broken" / "empty.png").write_bytes(b"")
    decoded = cv2.imread(str(good))
    assert decoded is not None
    small = cv2.resize(decoded, (70, 50))
    cv2.imwrite(str(target / "broken" / "small.png"), small)
    (target / "notes.txt").write_text("not an image, not collected")
    return target


@pytest.mark.integration
def test_predict_records_failures_and_mirrors_the_tree(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = tiny_trained
    tree = _tree(run.parent / "data", tmp_path / "in")
    out = tmp_path / "out"
    res = CliRunner().invoke(tilead_main, ["predict", str(bundle), str(tree), "-o", str(out), "--batch", "3"])
    assert res.exit_code == 3, res.output
    records = _records(out / "results.jsonl")
    by_file = {Path(str(r["file"])).relative_to(tree).as_posix(): r for r in records}
    assert set(by_file) == {
        "broken/empty.png",
        "broken/small.png",
        "broken/truncated.png",
        *(p.relative_to(tree).as_posix() for p in tree.glob("*/*.png") if p.parent.name != "broken"),
    }
    assert "cannot decode" in str(by_file["broken/truncated.png"]["error"])
    assert "cannot decode" in str(by_file["broken/empty.png"]["error"])
    small = str(by_file["broken/small.png"]["error"])
    assert "50x70" in small
    assert "--resize" in small
    assert "resize=True" not in small
    scored = [r for k, r in by_file.items() if not k.startswith("broken/")]
    assert all(r["error"] is None and isinstance(r["score"], float) for r in scored)
    assert any(r["label"] for k, r in by_file.items() if k.startswith("scratch/"))
    # Same file names under good/ and scratch/: distinct overlays, mirroring the tree.
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(k for k in by_file if not k.startswith("broken/"))
    assert all((out / str(r["overlay"])).is_file() for r in scored)
    # --resize scores the small image too; one image per call gives the same scores as batches of 3.
    again = tmp_path / "again"
    res = CliRunner().invoke(tilead_main, ["predict", str(bundle), str(tree), "-o", str(again), "--resize"])
    assert res.exit_code == 3, res.output
    redo = {Path(str(r["file"])).relative_to(tree).as_posix(): r for r in _records(again / "results.jsonl")}
    assert redo["broken/small.png"]["error"] is None
    for key in (k for k in by_file if not k.startswith("broken/")):
        assert redo[key]["score"] == pytest.approx(by_file[key]["score"], abs=1e-5)
    # Only good files: exit 0; the old --out spelling still works.
    res = CliRunner().invoke(tilead_main, ["predict", str(bundle), str(tree / "good"), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 0, res.output
    assert len(_records(tmp_path / "o3" / "results.jsonl")) == 2


@pytest.mark.integration
def test_unwritable_output_fails_before_the_first_image(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = tiny_trained
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = CliRunner().invoke(
        tilead_main, ["predict", str(bundle), str(run.parent / "data" / "test" / "good"), "-o", str(blocker / "out")]
    )
    assert res.exit_code == 1
    assert f"output folder {blocker / 'out'} is not writable" in res.output
    assert "score" not in res.output  # no image was scored


@pytest.mark.integration
def test_sigkill_during_predict_keeps_every_written_line(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, bundle = tiny_trained
    src = sorted((run.parent / "data" / "test").rglob("*.png"))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        shutil.copy(src[i % len(src)], folder / f"{i:03d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilead", "predict", str(bundle), str(folder), "-o", str(out), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_text().count("\n") >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"predict ended before the kill: {proc.communicate()[1]!r}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    records = _records(results)  # every line complete JSON, the file ends with a newline
    assert 5 <= len(records) < 60
    assert [Path(str(r["file"])).name for r in records] == [f"{i:03d}.png" for i in range(len(records))]
    assert all(isinstance(r["score"], float) for r in records)


def test_tilead_group_version_and_subcommands() -> None:
    runner = CliRunner()
    from tilead import __version__

    res = runner.invoke(tilead_main, ["--version"])
    assert res.exit_code == 0
    assert __version__ in res.output
    res = runner.invoke(tilead_main, ["--help"])
    assert res.exit_code == 0
    for name in ("train", "eval", "export", "predict", "bench", "doctor", "demo", "info"):
        assert f"  {name} " in res.output
    for name in ("train", "eval", "export", "predict", "demo", "bench"):
        text = runner.invoke(tilead_main, [name, "--help"]).output
        assert "-o, --output" in text, name
        assert "--progress / --no-progress" in text, name
        assert "--quiet" not in text, name  # hidden old spellings
        assert "--out " not in text, name
    for name in ("train", "eval"):
        assert "--set KEY=VALUE" in runner.invoke(tilead_main, [name, "--help"]).output


def test_train_print_config_applies_set() -> None:
    import yaml

    res = CliRunner().invoke(
        tilead_main,
        ["train", "--config", str(CONFIG), "--set", "model.n_features=7", "--set", "seed=11", "--print-config"],
    )
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["model"]["n_features"] == 7
    assert cfg["seed"] == 11
    res = CliRunner().invoke(tilead_main, ["train", "--config", str(CONFIG), "--set", "nokey", "--print-config"])
    assert res.exit_code == 2
    assert "expected KEY=VALUE" in res.output


def test_output_given_twice_and_progress_contradictions() -> None:
    runner = CliRunner()
    res = runner.invoke(tilead_main, ["demo", "-o", "a", "--out", "b"])
    assert res.exit_code == 2
    assert "-o/--output given twice" in res.output
    res = runner.invoke(tilead_main, ["demo", "--quiet", "--progress"])
    assert res.exit_code == 2
    assert "contradict" in res.output
    res = runner.invoke(tilead_main, ["predict", str(ROOT), str(ROOT / "README.md")])
    assert res.exit_code == 2
    assert "Missing option '-o' / '--output'" in res.output


@pytest.mark.integration
def test_eval_set_overrides_eval_keys_only(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_trained
    res = CliRunner().invoke(
        tilead_main, ["eval", str(run), "-o", str(tmp_path / "ev"), "--set", "eval.overlays=1", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "ev" / "overlays").glob("*.png"))) == 1
    res = CliRunner().invoke(tilead_main, ["eval", str(run), "-o", str(tmp_path / "e2"), "--set", "model.n_features=3"])
    assert res.exit_code == 1
    assert "changes what the run's locations were fitted on" in res.output


def test_python_m_tilead_is_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tilead", "info", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tilead"]
    assert np.isfinite(info["cpu_threads"])


def test_demo_set_overrides_the_config_but_not_the_data_root(tmp_path: Path) -> None:
    from tilead.demo.pipeline import DEFAULT_CONFIG, DEFAULT_IMAGE_SIZE, load_demo_config

    cfg = load_demo_config(
        DEFAULT_CONFIG, tmp_path, DEFAULT_IMAGE_SIZE, {"model.n_features": 8, "data.root": "/elsewhere"}
    )
    assert cfg.model.n_features == 8  # type: ignore[attr-defined]
    assert Path(str(cfg.data.root)) == tmp_path.resolve()
    assert "--set KEY=VALUE" in CliRunner().invoke(tilead_main, ["demo", "--help"]).output
