"""An INT8 bundle exported where INT8 sums do not saturate, run where they do (issue #21): quality either way.

A PaDiM INT8 bundle's heads are refit on the features its INT8 backbone gives
*on the exporting CPU*. With a dot-product instruction (VNNI, AMX) those are the
QDQ graph's features to rounding; on an AVX2-only CPU ONNX Runtime's fused
integer convolutions saturate (:mod:`tilead.runtime.cpu_features`) and give
other ones. This probe runs on an AVX2-only CPU and emulates the VNNI side:
with every ONNX Runtime graph optimization off, the QDQ graph runs as written
(float convolutions of dequantized values: the integer sums without saturation,
to float rounding; the fused kernels' own requantization differs by about 2 %
of the features, measured by ``probe_int8_saturation.py``'s 7-bit row).

For each ``--bits``:

1. export the run with plain QDQ arithmetic in the exporter's ONNX Runtime
   sessions (refit and parity as a VNNI machine would compute them), and
   evaluate that bundle with plain arithmetic (``vnni -> vnni``) and with this
   CPU's fused kernels (``vnni -> avx2``, a cross-machine case);
2. export the run normally on this CPU and evaluate it here (``avx2 -> avx2``) and with plain arithmetic
   (``avx2 -> vnni``, the other cross-machine case).

Usage::

    python benchmarks/probe_int8_cross_cpu.py RUN WORK [--bits 8 7] [--layout shared_backbone] [--json OUT]

It emulates one side, so its figures are an estimate of the cross-CPU case, not a VNNI measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import onnxruntime as ort

import tilead.exporter.bundle as exporter
import tilead.runtime.backends.onnxruntime as ort_backend
from tilead.benchmarking.quality import METRICS, bundle_quality
from tilead.runtime.cpu_features import int8_arithmetic


@contextlib.contextmanager
def plain_qdq() -> Iterator[None]:
    """Inside, ONNX Runtime computes as a CPU with VNNI would, and the exporter records that arithmetic.

    Every ``onnxruntime.InferenceSession`` made inside runs with graph optimizations off (no fused INT8
    kernels), and an export records ``model.int8_arithmetic`` ``dot_product``.
    """
    original = ort.InferenceSession

    def plain(path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> Any:
        options = sess_options if sess_options is not None else ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return original(path_or_bytes, options, *args, **kwargs)

    with (
        mock.patch.object(ort, "InferenceSession", plain),
        mock.patch.object(exporter, "int8_arithmetic", return_value="dot_product"),
    ):
        yield


def unchecked() -> contextlib.AbstractContextManager[Any]:
    """The Predictor's INT8 arithmetic check off (:func:`tilead.runtime.cpu_features.int8_verdict`).

    It refuses a bundle refit on the other kind of CPU; the probe measures what that refusal guards against.
    """
    return mock.patch.object(ort_backend, "int8_verdict", return_value=None)


def main(argv: list[str] | None = None) -> int:
    """Export, evaluate, print the table; write JSON with ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a trained PaDiM run")
    ap.add_argument("work", type=Path, help="folder for the bundles and evaluations (reused when present)")
    ap.add_argument("--bits", type=int, nargs="+", choices=(7, 8), default=[8, 7])
    ap.add_argument("--layout", default="shared_backbone", choices=("shared_backbone", "per_location"))
    ap.add_argument("--parity-tolerance", type=float, default=5.0, help="the exports' INT8 tolerance (reported)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if int8_arithmetic() != "saturating":
        raise SystemExit("run this on an x86 CPU with AVX2 and without VNNI/AMX: it emulates the other side")
    rows: list[dict[str, Any]] = []
    for bits in args.bits:
        for exported_on in ("vnni", "avx2"):
            bundle = args.work / f"int8_w{bits}_{exported_on}"
            if not (bundle / "manifest.json").is_file():
                with plain_qdq() if exported_on == "vnni" else contextlib.nullcontext():
                    exporter.export_bundle(
                        args.run, bundle, progress=False, precision="int8", int8_weight_bits=bits, layout=args.layout,
                        int8_tolerance=args.parity_tolerance, overwrite=True,
                    )  # fmt: skip
            parity = json.loads((bundle / "manifest.json").read_text())["source"]["parity_onnxruntime_vs_torch"]
            for where in ("vnni", "avx2"):
                out = args.work / f"eval_w{bits}_{exported_on}_to_{where}"
                with plain_qdq() if where == "vnni" else contextlib.nullcontext(), unchecked():
                    quality = bundle_quality(
                        args.run, bundle, out, reuse=True, predictor={"backend": "onnxruntime"}
                    )  # in process, so that plain_qdq reaches the Predictor's sessions
                rows.append(
                    {"bits": bits, "exported_on": exported_on, "run_on": where, "parity_max": max(parity.values()),
                     **{k: quality[k] for k in METRICS}}
                )  # fmt: skip
    print(f"{'bits':>4s} {'export -> run':>14s} {'parity':>7s} {'image AUROC':>12s} {'pixel AUROC':>12s} {'AUPRO':>7s}")
    for r in rows:
        case = f"{r['exported_on']} -> {r['run_on']}"
        print(
            f"{r['bits']:4d} {case:>14s} {r['parity_max']:7.3f} {r['image_auroc']:12.4f} {r['pixel_auroc']:12.4f} "
            f"{r['aupro']:7.4f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": str(args.run), "layout": args.layout, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
