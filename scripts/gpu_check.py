"""One prepared GPU check (``make gpu-check OUT=dir``, issue #18 item 10).

Runs on a fresh GPU machine without internet, from what the working tree
carries, in under 9 minutes, and writes ``OUT/gpu_check.json`` (plus
``OUT/doctor.json`` and ``OUT/bench.json`` where those ran):

1. extension: ``tilead._kernels`` with its CUDA twins; rebuilt from the tree
   with nvcc (``TILEAD_CUDA=ON``, all architectures of CMakeLists.txt) when the
   installed one lacks CUDA;
2. bundle: ``--bundle`` when given, else on a GPU machine with torch the
   tests' tiny PaDiM run (tests/conftest.py ``train_tiny``: 2x2 locations,
   seconds on a GPU box), else a small synthetic ONNX bundle
   (tests/bundle_factory.py, needs ``onnx``);
3. engines: FP32 and FP16 TensorRT engines for that bundle, max batch 4, when
   the TensorRT builder is installed (else the step says so);
4. doctor: every ``tilead-doctor`` GPU check on the bundle (JSON report);
5. branches: a thumbnail bundle and a shared-model bundle (tests' factories), their FP32
   engines built, the TensorRT Predictor against ONNX Runtime on the CPU
   (scripts/gpu_check_branches.py; with the TensorRT builder and torch only);
6. bench: a short ``tilead-bench`` on the TensorRT backend, batches 1 and 4.

Exit status: 0 every check passed, 1 something failed, 3 no usable GPU (the GPU
checks were skipped, never passed). Each step has its own time limit within
the overall 540 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540.0
STEP_LIMITS_S = {
    "extension": 300.0, "bundle": 150.0, "engines": 270.0, "doctor": 180.0, "branches": 120.0, "bench": 90.0,
}  # fmt: skip
EXIT_PASS, EXIT_FAIL, EXIT_NO_GPU = 0, 1, 3


class Steps:
    """The steps' outcomes, with the time each took and what is left of the budget."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.results: list[dict[str, Any]] = []

    def left(self, step: str) -> float:
        """Seconds ``step`` may take: its own limit, within what is left of the budget."""
        return max(1.0, min(STEP_LIMITS_S[step], BUDGET_S - (time.monotonic() - self.start)))

    def record(self, step: str, status: str, detail: str, started: float, **extra: Any) -> None:
        """Note a step's outcome (``pass``, ``fail`` or ``skipped``) and print it."""
        self.results.append({"step": step, "status": status, "detail": detail,
                             "seconds": round(time.monotonic() - started, 1), **extra})  # fmt: skip
        print(f"gpu-check: {step:9s} {status:8s} {detail}", flush=True)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` from the tree's root; ``(exit status, last 4000 characters of its output)``; 124 on timeout."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, f"timed out after {timeout:.0f} s; {str(out)[-2000:]}"
    return done.returncode, (done.stdout + done.stderr)[-4000:]


def probe(code: str) -> tuple[int, str]:
    """Run a Python snippet in this interpreter (a fresh process: imports are not cached)."""
    return run([sys.executable, "-c", code], 120.0)


CUDA_PROBE = "from tilead.runtime import cuda_status as s; c = s(); print(int(c.built), int(c.usable), c.error or '')"


def step_extension(steps: Steps) -> bool:
    """Whether a usable CUDA device and a CUDA build of the extension are there (rebuilding if nvcc can)."""
    started = time.monotonic()
    code, out = probe(CUDA_PROBE)
    if code != 0:
        steps.record("extension", "fail", f"tilead does not import: {out.strip()[-500:]}", started)
        return False
    built, usable, error = out.strip().split(" ", 2) + [""] * (3 - len(out.strip().split(" ", 2)))
    if built == "1":
        steps.record(
            "extension",
            "pass" if usable == "1" else "skipped",
            "CUDA twins built" + ("" if usable == "1" else f"; no usable CUDA device: {error}"),
            started,
        )
        return usable == "1"  # fmt: skip
    if shutil.which("nvcc") is None:
        steps.record("extension", "skipped", "tilead._kernels has no CUDA twins and there is no nvcc to build them",
                     started)  # fmt: skip
        return False
    env = dict(os.environ, TILEAD_CUDA="ON")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", "--no-deps", "-e",
           "."]  # fmt: skip
    code, out = run(cmd, steps.left("extension"), env)
    if code != 0:
        steps.record("extension", "fail", f"CUDA build failed ({code}): {out[-1500:]}", started)
        return False
    code, out = probe(CUDA_PROBE)
    ok = code == 0 and out.startswith("1 1")
    steps.record("extension", "pass" if ok else "skipped", f"rebuilt with nvcc: {out.strip()}", started)
    return ok


def step_bundle(steps: Steps, given: Path | None, work: Path, gpu: bool) -> Path | None:
    """The bundle the checks run on: given, else the tests' tiny PaDiM run on a GPU machine, else a synthetic one."""
    started = time.monotonic()
    if given is not None:
        steps.record("bundle", "pass", f"given: {given}", started)
        return given
    if gpu and probe("import torch, pytest, tilead.trainer")[0] == 0:
        target = work / "tiny"
        code, out = probe(f"import sys, pathlib, shutil; sys.path.insert(0, 'tests'); from conftest import train_tiny; "
                          f"t = pathlib.Path({str(target)!r}); shutil.rmtree(t, ignore_errors=True); t.mkdir(); "
                          f"train_tiny(t)")  # fmt: skip
        if code == 0 and (target / "bundle" / "manifest.json").is_file():
            steps.record("bundle", "pass", "tiny PaDiM bundle trained here (tests/conftest.py train_tiny)", started)
            return target / "bundle"
        steps.record("bundle", "fail", f"training the tiny bundle failed ({code}): {out[-1500:]}", started)
        return None
    target = work / "synthetic_bundle"
    shutil.rmtree(target, ignore_errors=True)
    code, out = probe(f"import sys; sys.path.insert(0, 'tests'); from bundle_factory import make_bundle; "
                      f"make_bundle(__import__('pathlib').Path({str(target)!r}))")  # fmt: skip
    if code == 0:
        why = "no GPU" if not gpu else "no torch"
        steps.record("bundle", "pass", f"synthetic ONNX bundle ({why}: no PaDiM head for the FP16 check)", started)
        return target
    steps.record("bundle", "skipped", f"no bundle: neither torch nor onnx to make one ({out.strip()[-300:]})", started)
    return None


def step_engines(steps: Steps, bundle: Path) -> None:
    """FP32 and FP16 engines, max batch 4, with the TensorRT builder when it is installed."""
    started = time.monotonic()
    if probe("import tensorrt; tensorrt.Builder")[0] != 0:
        steps.record("engines", "skipped", "no TensorRT builder here (pip install tensorrt-cu13==11.4.0.*); the "
                     "engine checks use engines the bundle already lists, if any", started)  # fmt: skip
        return
    built = []
    for precision in ("fp32", "fp16"):
        cmd = [sys.executable, "-m", "tilead", "export", str(bundle), "--trt", "--precision", precision,
               "--max-batch", "4", "--no-progress"]  # fmt: skip
        code, out = run(cmd, steps.left("engines"))
        if code != 0:
            steps.record("engines", "fail", f"{precision} build failed ({code}): {out[-1500:]}", started)
            return
        built.append(precision)
    steps.record("engines", "pass", f"built {', '.join(built)} engines, max batch 4", started)


def step_doctor(steps: Steps, bundle: Path | None, out: Path) -> str:
    """``tilead doctor --json OUT/doctor.json``; its verdict."""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "tilead", "doctor", "--json", str(out / "doctor.json")]
    cmd += ["--bundle", str(bundle)] if bundle is not None else []
    code, text = run(cmd, steps.left("doctor"))
    try:
        verdict = json.loads((out / "doctor.json").read_text())["result"]
    except (OSError, ValueError, KeyError):
        steps.record("doctor", "fail", f"no report ({code}): {text[-1500:]}", started)
        return "fail"
    steps.record("doctor", verdict, f"tilead-doctor: {verdict} (report doctor.json)", started)
    return str(verdict)


def step_branches(steps: Steps, out: Path) -> None:
    """The thumbnail and shared-model bundles on TensorRT (``scripts/gpu_check_branches.py``, ``OUT/branches.json``)."""
    started = time.monotonic()
    if probe("import tensorrt, torch; tensorrt.Builder")[0] != 0:
        steps.record("branches", "skipped", "needs the TensorRT builder and torch (the tests' factories)", started)
        return
    report = out / "branches.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check_branches.py"), str(report)]
    code, text = run(cmd, steps.left("branches"))
    try:
        checks = json.loads(report.read_text())["checks"]
    except (OSError, ValueError, KeyError):
        steps.record("branches", "fail", f"no report ({code}): {text[-1500:]}", started)
        return
    failed = [f"{c['name']}: {c['detail']}" for c in checks if c["status"] != "pass"]
    detail = "; ".join(failed) if failed else f"{len(checks)} bundles match ONNX Runtime (report branches.json)"
    steps.record("branches", "fail" if failed or code else "pass", detail, started)


def step_bench(steps: Steps, bundle: Path, out: Path) -> None:
    """A short ``tilead bench`` on the TensorRT backend (``OUT/bench.json``)."""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "tilead", "bench", str(bundle), "--backend", "tensorrt", "--device", "cuda",
           "--batch", "1,4", "--iterations", "20", "--json", str(out / "bench.json")]  # fmt: skip
    code, text = run(cmd, steps.left("bench"))
    steps.record("bench", "pass" if code == 0 else "fail", f"tilead-bench exit {code}" + ("" if code == 0 else
                 f": {text[-1500:]}"), started)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the steps, write ``OUT/gpu_check.json``; the exit status (0 pass, 1 fail, 3 no GPU)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="Folder for gpu_check.json, doctor.json and bench.json.")
    parser.add_argument("--bundle", type=Path, default=None, help="Bundle to check (default: one made here).")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    steps = Steps()
    gpu = step_extension(steps)
    bundle = step_bundle(steps, args.bundle.resolve() if args.bundle else None, work, gpu)
    if gpu and bundle is not None:
        step_engines(steps, bundle)
    elif bundle is not None:
        steps.record("engines", "skipped", "no usable GPU", time.monotonic())
    verdict = step_doctor(steps, bundle, out)
    if gpu:
        step_branches(steps, out)
    else:
        steps.record("branches", "skipped", "no usable GPU", time.monotonic())
    if gpu and bundle is not None and verdict != "fail":
        step_bench(steps, bundle, out)
    else:
        steps.record("bench", "skipped", "no usable GPU" if not gpu else "after a failed check", time.monotonic())
    failed = any(r["status"] == "fail" for r in steps.results)
    status = EXIT_FAIL if failed else (EXIT_PASS if gpu and verdict == "pass" else EXIT_NO_GPU)
    verdicts = {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_NO_GPU: "no GPU: GPU checks skipped"}
    seconds = round(time.monotonic() - steps.start, 1)
    report = {"result": verdicts[status], "exit_status": status, "seconds": seconds, "steps": steps.results}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "gpu_check.json")
    print(f"gpu-check: {report['result']} in {report['seconds']} s; report {out / 'gpu_check.json'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
