"""The checker `make wheel-check` runs in the fresh environment (scripts/runtime_wheel_smoke.py): it can fail.

The full check (wheel, auditwheel, fresh venv without a compiler) is `make wheel-check`, run by CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from bundle_factory import make_bundle
from PIL import Image

SMOKE = Path(__file__).resolve().parents[1] / "scripts" / "runtime_wheel_smoke.py"


def _smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SMOKE), *args], capture_output=True, text=True, timeout=300, check=False)


def test_smoke_check_scores_compares_and_refuses_heavy_installs(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    images = tmp_path / "images" / "good"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = ["--bundle", str(bundle), "--images", str(tmp_path / "images")]

    heavy = _smoke(*common, "--json", str(tmp_path / "x.json"))  # this environment has torch and OpenCV
    assert heavy.returncode == 1
    assert "FAIL: the runtime install holds torch" in heavy.stderr

    first = _smoke(*common, "--json", str(tmp_path / "a.json"), "--allow-heavy")
    assert first.returncode == 0, first.stderr
    scores = json.loads((tmp_path / "a.json").read_text())
    assert sorted(scores) == ["good/0.png", "good/1.png", "good/2.png"]
    assert all(np.isfinite(v) for v in scores.values())

    same = _smoke(*common, "--json", str(tmp_path / "b.json"), "--allow-heavy", "--expect", str(tmp_path / "a.json"))
    assert same.returncode == 0, same.stderr
    assert "same raw scores" in same.stdout

    off = {k: v + 0.01 for k, v in scores.items()}
    (tmp_path / "off.json").write_text(json.dumps(off))
    differ = _smoke(
        *common, "--json", str(tmp_path / "c.json"), "--allow-heavy", "--expect", str(tmp_path / "off.json")
    )
    assert differ.returncode == 1
    assert "raw scores differ" in differ.stderr
