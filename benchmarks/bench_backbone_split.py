"""The shared backbone alone: tiles per call and threads vs side-by-side calls, ONNX Runtime and OpenVINO (issue #21).

For each ``shared_backbone`` bundle given, the backbone runs on ``--tiles`` random
tiles of the bundle's tile size in every configuration ``WxTxK``: ``W`` calls side by
side on worker threads, each session/compiled model with ``T`` threads, ``K`` tiles
per call (``K`` = all tiles: one batched call). Backends: ONNX Runtime with the
runtime's own session options (:func:`tilead.runtime.backends.onnxruntime.load_session`),
OpenVINO with the backend's compile config (``f32``, and ``bf16`` where the CPU has
bf16 units; one stream per worker, so ``W`` calls really run side by side). All
configurations alternate round by round in this one process, so they see the same
machine load; reported: median and minimum ms per round (all tiles).

Run it on a quiet CPU; the runtime's choice (``BACKBONE_CHUNK_BYTES``: one tile per call
for tiles of 296x296 RGB and larger, calls spread over the location workers) should be
the fastest row or close to it.

Usage:
    python benchmarks/bench_backbone_split.py BUNDLE [BUNDLE...] [--tiles 16] [--repeats 7]
        [--configs 1x2x16 1x2x1 2x1x1 2x1x2] [--backends onnxruntime openvino] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime import read_manifest
from tilead.runtime.bundle import INPUT_NAME


def parse_config(text: str) -> tuple[int, int, int]:
    """``WxTxK`` -> (workers, threads each, tiles per call), all positive.

    Raises:
        argparse.ArgumentTypeError: Naming the expected form.
    """
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WORKERSxTHREADSxTILES, e.g. 2x1x1")
    w, t, k = (int(p) for p in parts)
    return w, t, k


def runner(call: Callable[[np.ndarray], object], tiles: np.ndarray, workers: int, per_call: int) -> Callable[[], None]:
    """One round: every tile through ``call`` in runs of ``per_call``, spread over ``workers`` threads."""
    chunks = [tiles[i : i + per_call] for i in range(0, len(tiles), per_call)]
    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def one_round() -> None:
        if pool is None:
            for chunk in chunks:
                call(chunk)
        else:
            list(pool.map(call, chunks))

    return one_round


def ort_call(model: bytes, threads: int) -> Callable[[np.ndarray], object]:
    """A session with the runtime's options; the call runs it on a chunk."""
    import onnxruntime as ort

    from tilead.runtime.backends.onnxruntime import load_session

    session = load_session(ort, model, ["CPUExecutionProvider"], threads)
    return lambda x: session.run(None, {INPUT_NAME: x})


def ov_call(model: bytes, threads: int, hint: str, workers: int = 1) -> Callable[[np.ndarray], object]:
    """A model compiled as the OpenVINO backend compiles it; each worker thread gets its own infer request.

    One stream per worker, each on ``threads`` threads (:func:`tilead.runtime.backends.openvino.stream_config`):
    with one stream the workers' calls would run one at a time.
    """
    import threading

    import openvino as ov

    from tilead.runtime.backends.openvino import stream_config

    core = ov.Core()
    config = stream_config({"INFERENCE_PRECISION_HINT": hint}, threads * workers, workers)
    compiled = core.compile_model(core.read_model(model=model), "CPU", config)
    local = threading.local()

    def call(x: np.ndarray) -> object:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        return local.request.infer([x])

    return call


def main(argv: list[str] | None = None) -> int:
    """Measure every bundle x backend x configuration, alternating; print a table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path, help="shared_backbone bundles")
    ap.add_argument("--tiles", type=int, default=16, help="tiles per round (2048 in 4x4: 16 per image)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--configs", nargs="+", type=parse_config, default=["1x2x16", "1x2x1", "2x1x1", "2x1x2", "2x1x4"])
    ap.add_argument("--backends", nargs="+", choices=["onnxruntime", "openvino"], default=["onnxruntime", "openvino"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    configs = [parse_config(c) if isinstance(c, str) else c for c in args.configs]
    rounds: dict[str, Callable[[], None]] = {}
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        if manifest.backbone is None:
            raise SystemExit(f"{bundle}: layout {manifest.layout!r} has no shared backbone")
        model = (bundle / manifest.backbone.file).read_bytes()
        shape = (args.tiles, manifest.preprocessing.channels, *manifest.grid.tile_size)
        tiles = np.random.default_rng(0).random(shape, dtype=np.float32)
        precision = manifest.model.get("precision", "fp32")
        for w, t, k in configs:
            tag = f"{bundle.name} ({precision}) {w}x{t}x{k}"
            if "onnxruntime" in args.backends:
                rounds[f"onnxruntime {tag}"] = runner(ort_call(model, t), tiles, w, k)
            if "openvino" in args.backends:
                import openvino as ov

                hints = ["f32"] + (
                    ["bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else []
                )
                for hint in hints:
                    rounds[f"openvino/{hint} {tag}"] = runner(ov_call(model, t, hint, w), tiles, w, k)
    for run in rounds.values():  # warm-up
        run()
    ms: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(args.repeats):
        for name, run in rounds.items():
            start = time.perf_counter()
            run()
            ms[name].append((time.perf_counter() - start) * 1e3)
    print(f"{os.cpu_count()} logical cores; {args.tiles} tiles per round; configs WORKERSxTHREADSxTILES-PER-CALL")
    rows: list[dict[str, Any]] = []
    for name, values in ms.items():
        rows.append({"run": name, "median_ms": float(np.median(values)), "min_ms": float(min(values))})
        print(f"{name:64s} median {np.median(values):8.1f} ms   min {min(values):8.1f} ms")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tiles": args.tiles, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
