"""A training killed with SIGKILL between locations resumes to the same location states, byte for byte (issue #16).

The crash tests of issue #16: kill during export (tests/test_export_crash.py), during predict
(tests/test_predict_cli.py::test_sigkill_during_predict_keeps_every_written_line) and, here, during
training: nothing a finished location wrote is lost, the half-done state does not block a resume, and
the resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.io import load_tensors
from tilead.trainer.run_dir import RunPaths

pytestmark = pytest.mark.integration

LOCATIONS = 9  # 3x3 grid: a window of several locations in which to kill


def _config(tmp: Path) -> Path:
    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=5))
    cfg = {
        "name": "crash",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 64, "stride": 48},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "validation": {"force": True},
    }
    path = tmp / "crash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tilead", "train", "--config", str(config), "--output", str(out), "--no-progress"]
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _states(run: Path) -> dict[str, dict[str, bytes]]:
    """Every location's tensors as raw bytes (metadata aside)."""
    out = {}
    for p in sorted(RunPaths(run).locations.glob("*.safetensors")):
        tensors, _ = load_tensors(p)
        out[p.stem] = {k: v.numpy().tobytes() for k, v in sorted(tensors.items())}
    return out


def test_a_training_killed_between_locations_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    config = _config(tmp_path)
    reference = tmp_path / "reference"
    proc = _train(config, reference)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    want = _states(reference)
    assert len(want) == LOCATIONS

    run = tmp_path / "killed"
    proc = _train(config, run)
    locations = RunPaths(run).locations
    try:
        deadline = time.monotonic() + 600
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(locations.glob("*.safetensors"))) if locations.is_dir() else 0
            if done >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"training ended before the kill: {proc.communicate()[1].decode()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kept = _states(run)  # every checkpoint on disk after the kill is complete and loadable
    assert 2 <= len(kept) < LOCATIONS
    for name, tensors in kept.items():
        assert tensors == want[name], name

    resumed = _train(config, run, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()
    assert _states(run) == want  # nothing lost, nothing different
    assert json.loads(RunPaths(run).run_json.read_text())["status"] == "trained"
