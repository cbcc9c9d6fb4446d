"""FP32 and INT8 bundles side by side in one process (issue #21): latency per image, the ratio of medians.

Both bundles are loaded into ``runtime.Predictor`` (CPU, ONNX Runtime) in the same
process and called alternately on the same decoded bottle test images (FP32,
INT8, FP32, ...), so both see the same machine load; decoding is excluded.
Latency is the wall time of ``predict`` per image at the given batch (a batch's
time divided by its images), median over images x repeats after a warm-up.
The table also gives the largest difference of the normalized maps and scores
(INT8 vs FP32) on those images.

Make the INT8 bundle with ``tilead-export RUN -o BUNDLE --precision int8``.

Usage:
    python benchmarks/bench_int8.py FP32_BUNDLE INT8_BUNDLE [--images 10] [--repeats 3] [--batch 1 8]
        [--threads N] [--json out/bench/int8.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilead.benchmarking.environment import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import read_images, test_images

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_bottle"


def measure(
    bundles: dict[str, Path], images: list[np.ndarray], batch: int, repeats: int, threads: int | None
) -> dict[str, Any]:
    """Alternate the bundles' ``predict`` on the same batches; per-image times and output differences.

    Returns:
        ``{"ms": {name: [ms per image, ...]}, "max_map_diff": float, "max_score_diff": float}``.
    """
    from tilead.runtime import Predictor

    predictors = {name: Predictor(path, threads=threads, max_batch=batch) for name, path in bundles.items()}
    try:
        batches = [np.stack(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]
        if not batches:
            raise SystemExit(f"--batch {batch}: more than the {len(images)} images")
        for p in predictors.values():  # warm-up: first-call allocations and thread pools
            p.predict(batches[0])
        ms: dict[str, list[float]] = {name: [] for name in predictors}
        outputs: dict[str, list[Any]] = {name: [] for name in predictors}
        for r in range(repeats):
            for b in batches:
                for name, p in predictors.items():
                    t0 = time.perf_counter()
                    res = p.predict(b)
                    ms[name].append((time.perf_counter() - t0) * 1e3 / len(b))
                    if r == 0:
                        outputs[name].extend(res if isinstance(res, list) else [res])
    finally:
        for p in predictors.values():
            p.close()
    first, second = (outputs[n] for n in bundles)
    return {
        "ms": ms,
        "max_map_diff": max(
            float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(first, second, strict=True)
        ),
        "max_score_diff": max(abs(x.score - y.score) for x, y in zip(first, second, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path, help="FP32 bundle")
    ap.add_argument("int8", type=Path, help="INT8 bundle (tilead-export --precision int8)")
    ap.add_argument("--data", type=Path, default=DATA, help="MVTec-layout category folder [%(default)s]")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None, help="inference threads per Predictor [all cores]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    for name in ("fp32", "int8"):
        manifest = json.loads((getattr(args, name) / "manifest.json").read_text())
        got = manifest["model"].get("precision", "fp32")
        if got != name:
            raise SystemExit(f"{getattr(args, name)}: model.precision is {got!r}, expected {name!r}")
    images = read_images(test_images(max(args.images, max(args.batch)), args.data))
    bundles = {"fp32": args.fp32, "int8": args.int8}
    rows = []
    for batch in args.batch:
        r = measure(bundles, images, batch, args.repeats, args.threads)
        med = {n: float(np.median(v)) for n, v in r["ms"].items()}
        rows.append({
            "batch": batch, "fp32_ms": med["fp32"], "int8_ms": med["int8"], "speedup": med["fp32"] / med["int8"],
            "samples": len(r["ms"]["fp32"]), "max_map_diff": r["max_map_diff"], "max_score_diff": r["max_score_diff"],
        })  # fmt: skip
    print(f"cpu: {cpu_model()}; images {len(images)}, repeats {args.repeats}, alternating fp32/int8 per call")
    head = ("batch", "fp32 ms/img", "int8 ms/img", "fp32/int8", "max map diff", "max score diff")
    print(f"{head[0]:>5} {head[1]:>12} {head[2]:>12} {head[3]:>10} {head[4]:>13} {head[5]:>15}")
    for row in rows:
        print(f"{row['batch']:>5} {row['fp32_ms']:>12.1f} {row['int8_ms']:>12.1f} {row['speedup']:>9.2f}x "
              f"{row['max_map_diff']:>13.4f} {row['max_score_diff']:>15.4f}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"cpu": cpu_model(), "fp32": str(args.fp32), "int8": str(args.int8), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
