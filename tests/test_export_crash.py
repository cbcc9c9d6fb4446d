"""An export killed with SIGKILL leaves a stale ``.partial``; the next export to that destination removes it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tilead.runtime import Predictor

pytestmark = pytest.mark.integration


def test_a_killed_export_leaves_nothing_after_the_next_export(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    from tilead.exporter.bundle import export_bundle

    run, _ = tiny_trained
    out = tmp_path / "bundle"
    code = "from tilead.exporter.bundle import export_bundle; "
    code += f"export_bundle({str(run)!r}, {str(out)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 300
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".bundle.*.partial") if list(p.glob("tiles/*.onnx"))]
            if partial:
                break
            time.sleep(0.005)
        assert partial, "the export finished or failed before it wrote its first model"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    (stale,) = tmp_path.glob(".bundle.*.partial")
    assert json.loads((stale / ".owner").read_text())["pid"] == proc.pid
    # A live export's folder (this process) and another naming pattern are kept.
    live = tmp_path / ".bundle.live.partial"
    live.mkdir()
    (live / ".owner").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    other = tmp_path / ".other.x.partial"
    other.mkdir()
    export_bundle(run, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".bundle.live.partial", ".other.x.partial", "bundle"])
    assert not (out / ".owner").exists()
    with Predictor(out) as predictor:
        assert len(predictor.manifest.locations) == 4
