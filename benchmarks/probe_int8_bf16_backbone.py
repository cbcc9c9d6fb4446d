"""OpenVINO's INT8 QDQ backbone against its FP32 backbone, with the bf16 and f32 hints, one tile per call (#21).

The feasibility check of the ``int8_bf16`` precision (docs/cpu_speed.md, "INT8 backbone on OpenVINO, heads
refit"): two ``shared_backbone`` bundles of one run (FP32 and ``--precision int8``), each ``backbone.onnx``
compiled by OpenVINO (``PERFORMANCE_HINT`` ``LATENCY``, ``INFERENCE_NUM_THREADS`` 1, ``ENABLE_CPU_PINNING``
off) with ``INFERENCE_PRECISION_HINT`` ``bf16`` and ``f32``; the tiles of one image (float tiles, the
Predictor's tile kernel) go through each model one tile per call, the models alternating round by round (the
order reversed every other round), so all see the same machine load. Prints the median ms per image's tiles,
the ratio FP32+bf16 / INT8+bf16 (median of the rounds, and of the per-round ratios) and the convolutions'
runtime precisions.

Usage:
    python benchmarks/probe_int8_bf16_backbone.py FP32_BUNDLE INT8_BUNDLE IMAGE [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from tilead.runtime import read_manifest
from tilead.runtime.preprocess import tile_images


def main(argv: list[str] | None = None) -> int:
    """Compile the four models, alternate them, print the figures (JSON last)."""
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path, help="shared_backbone FP32 bundle")
    ap.add_argument("int8", type=Path, help="shared_backbone INT8 bundle of the same run")
    ap.add_argument("image", type=Path, help="an image of the bundles' size")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    manifest = read_manifest(args.fp32)
    image = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"{args.image}: not an image")
    tiles = tile_images(image[None], manifest.grid, manifest.preprocessing)
    tiles = np.ascontiguousarray(tiles.reshape(-1, *tiles.shape[2:]))
    core = ov.Core()
    models = {
        "fp32@bf16": (args.fp32, "bf16"),
        "int8@bf16": (args.int8, "bf16"),
        "int8@f32": (args.int8, "f32"),
        "fp32@f32": (args.fp32, "f32"),
    }
    requests = {}
    for name, (bundle, hint) in models.items():
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": args.threads,
            "INFERENCE_PRECISION_HINT": hint,
            "ENABLE_CPU_PINNING": False,
        }
        compiled = core.compile_model(core.read_model(str(bundle / "backbone.onnx")), "CPU", config)
        request = compiled.create_infer_request()
        for tile in tiles:  # warm-up
            request.infer([tile[None]])
        requests[name] = request
        kinds = Counter(
            str(op.get_rt_info()["runtimePrecision"].astype(str))
            for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"
        )
        print(f"{name}: convolutions by runtime precision {dict(kinds)}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.rounds):
        for name in list(models) if i % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            for tile in tiles:
                requests[name].infer([tile[None]])
            times[name].append((time.perf_counter() - start) * 1e3)
    median = {name: float(np.median(v)) for name, v in times.items()}
    pairs = np.array(times["fp32@bf16"]) / np.array(times["int8@bf16"])
    report = {
        "tiles": len(tiles),
        "rounds": args.rounds,
        "ms": median,
        "fp32_bf16_over_int8_bf16": median["fp32@bf16"] / median["int8@bf16"],
        "per_round_ratio_median": float(np.median(pairs)),
        "per_round_ratio_quartiles": [float(q) for q in np.percentile(pairs, [25, 75])],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
