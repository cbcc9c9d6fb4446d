"""An INT8 bundle exported where INT8 sums do not saturate, run where they do (issue #21): quality either way.

A PaDiM INT8 bundle's heads are refit on the features its INT8 backbone gives
*on the exporting CPU*. With a dot-product instruction (VNNI, AMX) those are the
QDQ graph's features to rounding; on an AVX2-only CPU ONNX Runtime's fused
integer convolutions saturate (:mod:`tilead.runtime.cpu_features`) and give
other ones. The probe computes each side two ways:

* ``plain``: every ONNX Runtime graph optimization off, so the QDQ graph runs as
  written (float convolutions of dequantized values: the integer sums without
  saturation, to float rounding). It stands for a CPU with VNNI.
* ``fused``: this CPU's fused integer kernels, as deployed.

For each ``--bits``, each way of exporting (the exporter's ONNX Runtime sessions,
so the refit and the parity check, computing ``plain`` or ``fused``) is
evaluated both ways. Rows are labelled by the arithmetic each side stands for:

* on an AVX2-only CPU, ``plain`` is ``vnni`` (emulated) and ``fused`` is ``avx2``:
  the two cross-machine cases, ``vnni -> avx2`` and ``avx2 -> vnni``, one side emulated;
* on a CPU with VNNI or AMX, ``plain`` is ``plain`` and ``fused`` is ``vnni`` (real):
  no AVX2 side can be had there, and the rows check the emulation against the real thing
  (``plain -> vnni`` is a bundle refit on the emulation, run on real VNNI).

Usage::

    python benchmarks/probe_int8_cross_cpu.py RUN WORK [--bits 8 7] [--layout shared_backbone] [--json OUT]

On an AVX2-only CPU it emulates one side, so its figures there are an estimate of the cross-CPU case, not a VNNI
measurement.
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


SIDES = ("plain", "fused")
"""How ONNX Runtime computes: the QDQ graph as written (no graph optimizations), or this CPU's fused kernels."""


def side_labels(arithmetic: str) -> dict[str, str]:
    """What each side stands for on a CPU whose INT8 arithmetic is ``arithmetic`` (``saturating`` or ``dot_product``).

    Without VNNI, plain arithmetic emulates a VNNI CPU and the fused kernels are AVX2's; with VNNI the fused kernels
    are the real VNNI side and plain arithmetic is the emulation the AVX2-only runs used.
    """
    if arithmetic == "saturating":
        return {"plain": "vnni", "fused": "avx2"}
    return {"plain": "plain", "fused": "vnni"}


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
    arithmetic = int8_arithmetic()
    if arithmetic is None:
        raise SystemExit("run this on an x86 CPU with AVX2 (Linux): this CPU's INT8 arithmetic is unknown")
    labels = side_labels(arithmetic)
    rows: list[dict[str, Any]] = []
    for bits in args.bits:
        for export_side in SIDES:
            exported_on = labels[export_side]
            bundle = args.work / f"int8_w{bits}_{exported_on}"
            if not (bundle / "manifest.json").is_file():
                with plain_qdq() if export_side == "plain" else contextlib.nullcontext():
                    exporter.export_bundle(
                        args.run, bundle, progress=False, precision="int8", int8_weight_bits=bits, layout=args.layout,
                        int8_tolerance=args.parity_tolerance, overwrite=True,
                    )  # fmt: skip
            parity = json.loads((bundle / "manifest.json").read_text())["source"]["parity_onnxruntime_vs_torch"]
            for run_side in SIDES:
                where = labels[run_side]
                out = args.work / f"eval_w{bits}_{exported_on}_to_{where}"
                with plain_qdq() if run_side == "plain" else contextlib.nullcontext(), unchecked():
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
        report = {"run": str(args.run), "layout": args.layout, "cpu_int8_arithmetic": arithmetic, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
