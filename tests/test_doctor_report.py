"""``tilead-doctor --bundle B --json PATH`` on a machine without a GPU (issue #18, item 9).

Every GPU check is reported ``skipped`` with its reason, never ``pass``; the
ONNX Runtime provider check runs for real on the CPU; the JSON report lands in
the file given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import make_bundle
from click.testing import CliRunner

from tilead.cli.doctor import main
from tilead.runtime import EDGE_POLICIES, cuda_status
from tilead.selfcheck import BUNDLE_GROUPS, GPU_GROUPS

STATUS = cuda_status()


@pytest.mark.skipif(STATUS.usable, reason="a CUDA device is usable here: the GPU checks run instead")
def test_doctor_json_report_without_gpu(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    out = tmp_path / "report" / "doctor.json"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["--bundle", str(bundle), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "result: SKIPPED" in result.output  # text on stdout, JSON in the file
    report = json.loads(out.read_text())
    assert report["result"] == "skipped"
    checks = {c["name"]: c for c in report["checks"]}
    for name in [*GPU_GROUPS, *(f"{g} of {bundle}" for g in BUNDLE_GROUPS)]:
        assert checks[name]["status"] == "skipped"
        assert checks[name]["max_abs_diff"] is None
        assert "CUDA" in checks[name]["detail"]
    cpu = checks["ONNX Runtime providers used (device cpu)"]
    assert cpu["status"] == "pass"
    assert cpu["detail"] == "CPUExecutionProvider"
    cuda = checks["ONNX Runtime providers used (device cuda)"]
    if cuda["status"] == "skipped":  # the CPU wheel
        assert "no CUDAExecutionProvider" in cuda["detail"]
    assert not [c for c in report["checks"] if c["status"] == "fail"]
    strict = CliRunner().invoke(main, ["--bundle", str(bundle), "--json", str(out), "--require-gpu"])
    assert strict.exit_code == 1


@pytest.mark.skipif(STATUS.usable, reason="a CUDA device is usable here: the script runs the GPU checks instead")
def _script(name: str, *args: Path) -> Any:
    """Run ``scripts/<name>`` from the tree's root; the finished process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(root / "scripts" / name), *map(str, args)],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_gpu_check_script_without_gpu_exits_3_with_a_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = _script("gpu_check.py", out)
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["exit_status"] == 3
    assert report["result"] == "no GPU: GPU checks skipped"
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == {"extension", "bundle", "engines", "doctor", "branches", "bench"}
    assert steps["branches"]["status"] == "skipped"
    assert steps["extension"]["status"] == "skipped"
    assert steps["bench"]["status"] == "skipped"
    assert steps["doctor"]["status"] == "skipped"
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["result"] == "skipped"
    assert not [c for c in doctor["checks"] if c["status"] == "pass" and "ONNX Runtime" not in c["name"]]


@pytest.mark.skipif(STATUS.usable, reason="a CUDA device is usable here: the checks would run for real")
def test_the_gpu_branch_check_says_why_it_cannot_run_here(tmp_path: Path) -> None:
    """scripts/gpu_check_branches.py without a GPU or builder: both bundles are made, both checks fail saying why."""
    report = tmp_path / "branches.json"
    done = _script("gpu_check_branches.py", report)
    assert done.returncode == 1, done.stdout + done.stderr
    checks = json.loads(report.read_text())["checks"]
    assert [c["name"].split(" on ")[0] for c in checks] == [
        "thumbnail branch (weighted)",
        "shared models (2 models, 4 locations)",
    ]
    assert all(c["status"] == "fail" and "TensorRTUnavailableError" in c["detail"] for c in checks), checks


def _stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor's device checks on the CPU stand-in of the DevicePipeline (tests/fake_tensorrt.py)."""
    import types

    import fake_tensorrt

    from tilead import _kernels, selfcheck

    monkeypatch.setattr(_kernels, "cuda", types.SimpleNamespace(DevicePipeline=fake_tensorrt.FakePipeline),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(selfcheck, "_read_device", lambda address, count: fake_tensorrt._view(address, count).copy())


def test_device_checks_pass_on_the_cpu_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from tilead import selfcheck

    _stand_in(monkeypatch)
    rng = np.random.default_rng(0)
    tiles = selfcheck._tile_checks(rng)
    post = selfcheck._postprocess_checks(rng)
    assert [c.name for c in tiles] == [f"device upload + tile ({e} grid, {c} channel(s))"
                                       for e in EDGE_POLICIES for c in (1, 3)]  # fmt: skip
    assert len(post) == 2 * len(EDGE_POLICIES)
    assert any("resize crop" in c.name and "tile stage" in c.name for c in post)
    assert all(c.status == "pass" for c in tiles + post), [c for c in tiles + post if c.status != "pass"]


def test_device_checks_fail_when_the_pipeline_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    import fake_tensorrt
    import numpy as np

    from tilead import selfcheck

    _stand_in(monkeypatch)
    real_tile = fake_tensorrt.FakePipeline.tile

    def tile_off_by_one(self: fake_tensorrt.FakePipeline, n: int, swap_rb: bool) -> None:
        real_tile(self, n, swap_rb)
        self.tiles[7] += 0.01  # one wrong value in location 0's block

    def crop_never_resizes(self: fake_tensorrt.FakePipeline, n: int) -> None:
        h, w = self.grid.image_h, self.grid.image_w
        self.image = np.ascontiguousarray(self.canvas[:, :h, :w])

    monkeypatch.setattr(fake_tensorrt.FakePipeline, "tile", tile_off_by_one)
    monkeypatch.setattr(fake_tensorrt.FakePipeline, "crop", crop_never_resizes)
    rng = np.random.default_rng(0)
    tiles = selfcheck._tile_checks(rng)
    assert all(c.status == "fail" for c in tiles)
    assert all(c.max_abs_diff is not None and abs(c.max_abs_diff - 0.01) < 1e-6 for c in tiles)
    post = {c.name: c.status for c in selfcheck._postprocess_checks(rng)}
    assert [s for n, s in post.items() if "resize" in n] == ["fail", "fail"]  # crop instead of the resize
    assert [s for n, s in post.items() if "resize" not in n] == ["pass"] * 4
