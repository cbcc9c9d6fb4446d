"""Shared models on a CPU: the runtime's planned calls vs one batched call per model, in one process (issue #20).

A bundle whose locations share models (``grid.assignment``: ``cluster``, ``neighbourhood``, ``all_to_one``)
was run, until this change, with one batched call per model: all the tiles of the locations a model
serves in one ONNX Runtime call, the calls spread over the location workers, and as many workers as
models. Unevenly shared locations (k-means clusters of 7, 3, 3 and 3 locations) then load one worker
more than the other, and ``all_to_one`` runs on one worker. The runtime now sizes the workers by
locations and plans the calls (:func:`tilead.runtime.backends.base.location_jobs`): per model where
that loads the workers evenly, else one call per location.

Per bundle, two Predictors (ONNX Runtime, the same threads), called alternating image by image on the
same images with every other bundle's:

* **now**: the runtime as it is;
* **per_model** (bundles with shared models only): as before: location workers
  ``min(threads, models)``, one batched call per model (the backend's ``batch_per_model``).

Reported per bundle and batch: the median ms per image (``Predictor.predict``), ``per_model / now``,
each row's ratio to the first bundle's ``now`` row (give a one-to-one bundle first), the group sizes,
the calls ``now`` makes per image batch (``per model`` or ``per location``), and the largest difference
between the two Predictors' maps (batched and single-location calls may sum in another order, nothing
else). Run it on a quiet CPU.

Usage:
    python benchmarks/bench_assignment_calls.py BUNDLE... --images DIR [--count 8] [--batch 1 8]
        [--repeats 3] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from tilead.runtime import Prediction, Predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_outside_inference import image_paths, load


def open_variants(bundle: Path, threads: int, max_batch: int) -> dict[str, Predictor]:
    """``now`` (the runtime as it is) and, for shared models, ``per_model`` (the calls as before)."""
    now = Predictor(bundle, backend="onnxruntime", threads=threads, max_batch=max_batch)
    variants = {"now": now}
    if now.manifest.shared_models:
        workers = max(1, min(threads, len(now.manifest.models)))
        before = Predictor(
            bundle, backend="onnxruntime", threads=threads, max_batch=max_batch, location_workers=workers
        )
        backend: Any = before._backend
        backend.batch_per_model = True
        variants["per_model"] = before
    return variants


def groups_text(predictor: Predictor) -> str:
    """The number of locations each model serves, largest first (``9+5+1+1``)."""
    return "+".join(str(len(g)) for g in sorted(predictor.manifest.groups, key=len, reverse=True))


def measure(
    rows: dict[tuple[str, str], Predictor], images: list[np.ndarray], batches: list[int], repeats: int
) -> dict[int, dict[tuple[str, str], float]]:
    """Median ms per image of each (bundle, variant) per batch, calls alternating chunk by chunk."""
    samples: dict[int, dict[tuple[str, str], list[float]]] = {b: {k: [] for k in rows} for b in batches}
    for b in batches:  # warm-up
        for p in rows.values():
            p.predict(images[:b], input_order="RGB")
    for _ in range(repeats):
        for b in batches:
            for i in range(0, len(images), b):
                chunk = images[i : i + b]
                for key, p in rows.items():
                    t0 = time.perf_counter()
                    results = p.predict(chunk, input_order="RGB")
                    samples[b][key].append((time.perf_counter() - t0) * 1000 / len(chunk))
                    del results
    return {b: {k: float(np.median(v)) for k, v in per.items()} for b, per in samples.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", type=Path, nargs="+", help="bundles of one image size; the first is the reference")
    ap.add_argument("--images", type=Path, required=True, help="folder of test images (searched recursively)")
    ap.add_argument("--count", type=int, default=8, help="images to use")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows: dict[tuple[str, str], Predictor] = {}
    info: dict[str, dict[str, Any]] = {}
    try:
        for bundle in args.bundles:
            for variant, p in open_variants(bundle, args.threads, max(args.batch)).items():
                rows[(bundle.name, variant)] = p
                if variant == "now":
                    calls = "per model" if cast(Any, p._backend).batch_per_model else "per location"
                    info[bundle.name] = {"assignment": p.manifest.assignment, "groups": groups_text(p), "calls": calls}
        first = next(iter(rows.values()))
        images = load(image_paths([args.images], args.count), first.image_size)
        for name in info:  # the two variants' maps on the same images
            now, before = rows[(name, "now")], rows.get((name, "per_model"))
            if before is not None:
                a = np.stack(
                    [r.anomaly_map for r in cast(list[Prediction], now.predict(images[:2], input_order="RGB"))]
                )
                b = np.stack(
                    [r.anomaly_map for r in cast(list[Prediction], before.predict(images[:2], input_order="RGB"))]
                )
                info[name]["max_map_difference"] = float(np.max(np.abs(a - b)))
            info[name]["location_workers"] = {v: rows[(name, v)].location_workers for v in ("now", "per_model")
                                              if (name, v) in rows}  # fmt: skip
        medians = measure(rows, images, args.batch, args.repeats)
    finally:
        for p in rows.values():
            p.close()
    reference = (args.bundles[0].name, "now")
    report: dict[str, Any] = {
        "threads": args.threads,
        "images": len(images),
        "repeats": args.repeats,
        "bundles": info,
        "batches": {
            str(b): [
                {
                    "bundle": name,
                    "variant": variant,
                    "ms_per_image": ms,
                    "vs_reference": ms / medians[b][reference],
                    **(
                        {"per_model_over_now": medians[b][(name, "per_model")] / ms}
                        if variant == "now" and (name, "per_model") in medians[b]
                        else {}
                    ),
                }
                for (name, variant), ms in medians[b].items()
            ]
            for b in args.batch
        },
    }
    print_table(report, reference)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict[str, Any], reference: tuple[str, str]) -> None:
    """The table as text."""
    print(f"{report['images']} images, {report['threads']} threads, ONNX Runtime; median ms per image")
    print(f"{'batch':>5} {'bundle':<24} {'groups':<9} {'variant':<9} {'calls':<12} {'workers':>7} {'ms/img':>9} "
          f"{'vs ref':>7} {'before/now':>10}")  # fmt: skip
    for b, rows in report["batches"].items():
        for r in rows:
            meta = report["bundles"][r["bundle"]]
            ratio = r.get("per_model_over_now")
            calls = meta["calls"] if r["variant"] == "now" else "per model"
            groups = meta["groups"] if len(meta["groups"]) <= 9 else "1 each"
            print(
                f"{b:>5} {r['bundle']:<24} {groups:<9} {r['variant']:<9} {calls:<12} "
                f"{meta['location_workers'][r['variant']]:>7} {r['ms_per_image']:>9.1f} {r['vs_reference']:>7.3f} "
                + (f"{ratio:>10.3f}" if ratio is not None else f"{'':>10}")
            )
    diffs = {k: v["max_map_difference"] for k, v in report["bundles"].items() if "max_map_difference" in v}
    if diffs:
        print("largest map difference, per_model vs now: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print(f"reference: {reference[0]} {reference[1]}")


if __name__ == "__main__":
    sys.exit(main())
