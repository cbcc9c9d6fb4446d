"""The native TensorRT backend on a thumbnail bundle and a shared-model bundle, against ONNX Runtime on the CPU.

One step of ``make gpu-check`` (scripts/gpu_check.py, issue #20): it builds the
tests' small factory bundles (tests/bundle_factory.py, a thumbnail model beside
them or two models shared by four locations), builds their FP32 TensorRT engines
with the real builder, runs ``Predictor(backend="tensorrt", device="cuda")``
twice per batch size (the second call replays the CUDA graph) and compares
maps, masks, scores and the raw branch outputs with ONNX Runtime on the CPU.

Writes ``{"checks": [{"name", "status", "detail"}, ...]}`` to the JSON file
given as its argument (atomically) and exits 0 when every check passed, 1
otherwise. Never run on a GPU: none was lent while it was written (without
one, both checks fail saying why: no TensorRT builder or GPU).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np

from tilead.runtime import Prediction, Predictor

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # FP32 engines (TF32 off) against ONNX Runtime CPU, on maps in [0, 1]


def _compare(name: str, bundle: Path, batch: list[np.ndarray]) -> dict[str, Any]:
    with Predictor(bundle, max_batch=4) as cpu:
        want = cpu.predict(batch)
        want_maps, _, want_small = cpu.branch_outputs(batch)
    worst = 0.0
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        for n in (len(batch), 1, len(batch)):  # the last call replays the first one's graph
            got = cast(list[Prediction], trt.predict(batch[:n]))  # a list in, a list out
            for g, w in zip(got, cast(list[Prediction], want)[:n], strict=True):
                worst = max(worst, float(np.max(np.abs(g.anomaly_map - w.anomaly_map))), abs(g.score - w.score))
        got_maps, _, got_small = trt.branch_outputs(batch)
    worst = max(worst, float(np.max(np.abs(got_maps - want_maps))))
    if want_small is not None:
        if got_small is None:
            return {"name": name, "status": "fail", "detail": "the TensorRT backend returned no thumbnail maps"}
        worst = max(worst, float(np.max(np.abs(got_small - want_small))))
    status = "pass" if worst <= TOLERANCE else "fail"
    return {"name": name, "status": status, "detail": f"largest difference {worst:.2e} (tolerance {TOLERANCE})"}


def main(argv: list[str] | None = None) -> int:
    """Build both bundles and their engines, compare, write the report to ``argv[0]``; the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: gpu_check_branches.py REPORT.json", file=sys.stderr)
        return 2
    report = Path(args[0])
    sys.path.insert(0, str(ROOT / "tests"))
    from test_assignment import make_shared_model_bundle
    from test_thumbnail import images, make_thumbnail_bundle

    from tilead.exporter.engines import build_engines

    checks = []
    batch = list(images(3))
    with tempfile.TemporaryDirectory() as work:
        bundles = {
            "thumbnail branch (weighted) on TensorRT vs ONNX Runtime CPU": make_thumbnail_bundle(
                Path(work) / "thumbnail", "weighted", 0.3
            ),
            "shared models (2 models, 4 locations) on TensorRT vs ONNX Runtime CPU": make_shared_model_bundle(
                Path(work) / "shared"
            ),
        }
        for name, bundle in bundles.items():
            try:
                build_engines(bundle, precision="fp32", max_batch=4, progress=False)
                checks.append(_compare(name, bundle, batch))
            except Exception as err:  # a check reports its failure instead of stopping the others
                checks.append({"name": name, "status": "fail", "detail": f"{type(err).__name__}: {err}"})
    report.parent.mkdir(parents=True, exist_ok=True)
    partial = report.with_name(report.name + ".tmp")
    partial.write_text(json.dumps({"checks": checks}, indent=2) + "\n")
    os.replace(partial, report)
    return 0 if all(c["status"] == "pass" for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
