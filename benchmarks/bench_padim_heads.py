"""One PaDiM head of a bf16 bundle: the native kernel vs its ONNX graph on ONNX Runtime (issue #21).

The bundle must have native heads (``tilead-export RUN --precision bf16``, the manifest's
``native_heads``). The model ``--model`` (default the first) runs on features drawn around its
Gaussians' means, ``(n, d, h, w)`` for each ``--batch``: the head's ONNX graph in an ONNX Runtime
session opened as the hybrid backend opens it (:func:`tilead.runtime.backends.onnxruntime.load_location_sessions`:
no memory pattern, ``--threads`` intra-op threads) and the native head in the lane layout the hybrid
backend runs (:meth:`tilead.runtime.native_heads.NativeHead.lanes`, converted once; the C++ kernel, one
thread; clamp, sqrt, the blur as two matrix products in NumPy). The two alternate call by call;
reported per batch: median ms per call of each, their ratio, and the largest difference of the maps
relative to the graph map's range. Run it on a quiet CPU.

Usage:
    python benchmarks/bench_padim_heads.py BUNDLE [--model 0] [--batch 1 8] [--repeats 20] [--threads 1]
        [--path auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilead import _kernels
from tilead.runtime.backends.onnxruntime import import_ort, load_location_sessions, session_providers
from tilead.runtime.bundle import FEATURES_NAME, OUTPUT_NAME, read_manifest, read_verified_file
from tilead.runtime.native_heads import NativeHead


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print the table (see the module docstring); returns the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--model", type=int, default=0, help="model index (manifest order)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (the kernel uses one)")
    ap.add_argument("--path", default="auto", choices=["auto", "scalar", "avx2", "avx512"], help="kernel code path")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = read_manifest(args.bundle)
    if not manifest.native_heads:
        raise SystemExit(f"{args.bundle}: no native heads (export it again with --precision bf16)")
    if not 0 <= args.model < len(manifest.models):
        raise SystemExit(f"--model: expected 0..{len(manifest.models) - 1}, got {args.model}")
    entry = manifest.native_heads[args.model]
    head = NativeHead.from_bytes(read_verified_file(args.bundle, entry, "native head"), entry.file)
    native = head.lanes()  # as the hybrid backend holds it: the conversion is not part of a call
    ort = import_ort()
    sub = dataclasses.replace(manifest, models=(manifest.models[args.model],), location_model=(0,))
    session = load_location_sessions(
        ort, sub, [read_verified_file(args.bundle, manifest.models[args.model])], session_providers("cpu", manifest),
        args.threads,
    )[0]  # fmt: skip
    h, w = native.size
    d = native.channels
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in args.batch:
        feats = (head.mean.T.reshape(1, d, h, w) + rng.standard_normal((n, d, h, w))).astype(np.float32)
        graph_ms: list[float] = []
        native_ms: list[float] = []
        want = np.asarray(session.run([OUTPUT_NAME], {FEATURES_NAME: feats})[0])
        got = native(feats, args.path)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            session.run([OUTPUT_NAME], {FEATURES_NAME: feats})
            t1 = time.perf_counter()
            native(feats, args.path)
            t2 = time.perf_counter()
            graph_ms.append((t1 - t0) * 1e3)
            native_ms.append((t2 - t1) * 1e3)
        g, k = float(np.median(graph_ms)), float(np.median(native_ms))
        span = float(want.max() - want.min()) or 1.0
        rows.append(
            {"batch": n, "onnxruntime_ms": g, "native_ms": k, "speedup": g / k,
             "max_diff_of_range": float(np.abs(got - want).max()) / span}
        )  # fmt: skip
    path = _kernels.mahalanobis_paths()[-1] if args.path == "auto" else args.path
    print(f"{args.bundle} model {manifest.models[args.model].name}: d={d}, map {h}x{w}, kernel path {path}, "
          f"ONNX Runtime threads {args.threads}")  # fmt: skip
    print(f"{'batch':>5} {'ORT ms':>9} {'native ms':>10} {'speedup':>8} {'max diff/range':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['onnxruntime_ms']:>9.2f} {r['native_ms']:>10.2f} {r['speedup']:>8.2f} "
              f"{r['max_diff_of_range']:>15.2e}")  # fmt: skip
    report = {"bundle": str(args.bundle), "model": args.model, "path": path, "threads": args.threads, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
