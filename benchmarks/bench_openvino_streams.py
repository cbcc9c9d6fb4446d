"""The shared backbone on one OpenVINO stream vs one stream per location worker, in one process (issue #21).

Two Predictors on the same bundle, the same backend (``hybrid`` for bf16 and int8_bf16 bundles, else ``openvino``), the
same threads and location workers, called alternating image by image on the same images:

* **streams**: the runtime as it is: the backbone compiled with one OpenVINO stream per location worker
  (:func:`tilead.runtime.backends.openvino.stream_config`), the workers' backbone calls side by side;
* **one stream**: the same Predictor with its backbone compiled again as before this change: one stream
  (``hybrid``: on all the threads, its calls made in turn on the calling thread, as that backend made them;
  ``openvino``: on a worker's share of the threads, the workers' calls then running one at a time, as that
  backend compiled it).

Reported per batch: the median ms per image of each (``Predictor.predict``), their ratio, and the largest
difference between their maps (the per-stream threads may change the backbone's summation order, nothing else).
Run it on a quiet CPU.

Usage:
    python benchmarks/bench_openvino_streams.py BUNDLE [--batch 1 8] [--images 16] [--repeats 5]
        [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import read_images

from tilead.runtime import Predictor
from tilead.runtime.backends.base import run_backbone, run_backbone_stream
from tilead.runtime.backends.hybrid import bf16_config
from tilead.runtime.backends.openvino import compile_backbone, import_openvino, stream_config
from tilead.runtime.bundle import read_manifest, read_verified_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_bottle"


def one_stream(predictor: Predictor, bundle: Path) -> None:
    """Compile ``predictor``'s backbone again on one stream, as the backends did before (see the docstring)."""
    backend: Any = predictor._backend
    manifest = predictor.manifest
    if manifest.backbone is None:
        raise SystemExit(f"{bundle}: layout {manifest.layout!r} has no shared backbone")
    threads = backend.threads
    if predictor.backend == "hybrid":
        config = bf16_config(threads, 1)
    else:
        hint = "bf16" if backend.bf16_backbone else "f32"
        config = stream_config({"INFERENCE_PRECISION_HINT": hint}, max(1, threads // backend.location_workers), 1)
    onnx = read_verified_file(bundle, manifest.backbone)
    core = import_openvino().Core()
    tile = manifest.grid.tile_size
    backend._backbone = compile_backbone(core, onnx, config, manifest.preprocessing, tile, manifest.uint8_backbone)
    assert int(backend._backbone.compiled.get_property("NUM_STREAMS")) == 1
    if predictor.backend == "hybrid":  # its calls in turn on the calling thread, as before (no worker pool)

        def infer(tiles: np.ndarray, timer: Any = None) -> Any:
            run = backend._run_features
            return backend._run_heads(run_backbone(manifest, tiles, run, backend._buffers, None, timer), timer)

        def infer_stream(stream: Any, timer: Any = None) -> Any:
            run = backend._run_features
            return backend._run_heads(run_backbone_stream(manifest, stream, run, backend._buffers, None, timer), timer)

        backend.infer, backend.infer_stream = infer, infer_stream


def images_for(bundle: Path, count: int) -> list[np.ndarray]:
    """``count`` bottle test images at the bundle's image size, else random ones of that size."""
    manifest = read_manifest(bundle)
    h, w = manifest.grid.image_size
    if DATA.is_dir() and (h, w) == (900, 900):
        return read_images(sorted((DATA / "test").rglob("*.png"))[:count])
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print the table (see the module docstring); returns the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="rounds over the images per batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    manifest = read_manifest(args.bundle)
    backend = "hybrid" if manifest.openvino_refit else "openvino"
    images = images_for(args.bundle, args.images)
    options = {"backend": backend, "threads": args.threads, "max_batch": max(args.batch)}
    rows: list[dict[str, Any]] = []
    with Predictor(args.bundle, **options) as streams, Predictor(args.bundle, **options) as single:
        one_stream(single, args.bundle)
        runs = {"streams": streams, "one stream": single}
        for batch in args.batch:
            groups = [np.stack(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]
            for p in runs.values():  # warm-up
                p.predict(groups[0])
            ms: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for group in groups:
                    for name, p in runs.items():
                        start = time.perf_counter()
                        p.predict(group)
                        ms[name].append((time.perf_counter() - start) * 1e3 / batch)
            a, b = streams.location_maps(groups[0]), single.location_maps(groups[0])
            span = float(b.max() - b.min()) or 1.0
            row = {
                "batch": batch,
                "streams_ms": float(np.median(ms["streams"])),
                "one_stream_ms": float(np.median(ms["one stream"])),
                "max_map_difference_of_range": float(np.abs(a - b).max()) / span,
                "samples": len(ms["streams"]),
            }
            row["ratio"] = row["one_stream_ms"] / row["streams_ms"]
            rows.append(row)
        workers = streams.location_workers
    print(f"{args.bundle} ({backend}), {args.threads} threads, {workers} location workers, {os.cpu_count()} cores")
    print(f"{'batch':>5} {'one stream ms/img':>18} {'streams ms/img':>15} {'ratio':>7} {'max map diff':>13}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['one_stream_ms']:>18.2f} {r['streams_ms']:>15.2f} {r['ratio']:>7.3f} "
            f"{r['max_map_difference_of_range']:>13.1e}"
        )
    report = {"bundle": str(args.bundle), "backend": backend, "threads": args.threads, "workers": workers, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
