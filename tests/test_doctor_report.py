"""``tilead-doctor --bundle B --json PATH`` on a machine without a GPU (issue #18, item 9).

Every GPU check is reported ``skipped`` with its reason, never ``pass``; the
ONNX Runtime provider check runs for real on the CPU; the JSON report lands in
the file given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from click.testing import CliRunner

from tilead.cli.doctor import main
from tilead.runtime import cuda_status
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
def test_gpu_check_script_without_gpu_exits_3_with_a_report(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "gpu_check.py"), str(out)],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["exit_status"] == 3
    assert report["result"] == "no GPU: GPU checks skipped"
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == {"extension", "bundle", "engines", "doctor", "bench"}
    assert steps["extension"]["status"] == "skipped"
    assert steps["bench"]["status"] == "skipped"
    assert steps["doctor"]["status"] == "skipped"
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["result"] == "skipped"
    assert not [c for c in doctor["checks"] if c["status"] == "pass" and "ONNX Runtime" not in c["name"]]
