"""Does this CPU's INT8 convolution saturate? 8-bit vs 7-bit weights, fused integer kernels vs plain QDQ (issue #21).

ONNX Runtime fuses a QDQ graph's DequantizeLinear -> Conv -> QuantizeLinear into
integer convolutions (QLinearConv). On an x86 CPU without an 8-bit dot-product
instruction (VNNI, AMX) those use AVX2's ``vpmaddubsw``, whose 16-bit pair sums
saturate (:mod:`tilead.runtime.cpu_features`). With every graph optimization off
the same graph runs as written: float convolutions of the dequantized weights
and activations, the same rounding without any saturation. So, per variant:

* ``fused vs FP32``: the features as deployed, against the FP32 backbone;
* ``plain vs FP32``: the same INT8 graph without fused kernels (what a CPU with VNNI computes, to float rounding);
* ``fused vs plain``: the saturation (and the fused kernels' own requantization) alone;
* ``ms``: the fused INT8 backbone on a batch of tiles, alternated with the FP32 one (median of the repeats).

Errors are ``|A - B| / |B|`` over the whole feature tensor of every tile (norms).
The backbone is quantized by the exporter's own :func:`tilead.exporter.quantize.quantize_location`
(``weight_bits`` 8 and 7), calibrated and measured on the same training tiles.

Usage::

    python benchmarks/probe_int8_saturation.py SHARED_FP32_BUNDLE TRAIN_IMAGE_DIR [--images-max 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from tilead.exporter.quantize import WEIGHT_BITS, quantize_location
from tilead.runtime.cpu_features import cpu_flags, int8_arithmetic
from tilead.runtime.geometry import TileGrid
from tilead.runtime.preprocess import Preprocessing, tile_images


def image_tiles(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """``(locations, C, th, tw)`` float32 tiles of one image, cut and normalized as the Predictor does."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"{path}: not a readable image")
    grid = TileGrid.from_dict(manifest["grid"])
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    return np.ascontiguousarray(tile_images(image, grid, prep, input_order="BGR")[:, 0])


def session(path: Path, fused: bool, threads: int | None) -> Any:
    """An ONNX Runtime CPU session; ``fused`` False turns every graph optimization off (plain QDQ arithmetic)."""
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def features(sess: Any, tiles: np.ndarray, batch: int = 4) -> np.ndarray:
    """``(n, D, fh, fw)`` features of ``(n, C, th, tw)`` tiles, ``batch`` at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: tiles[i : i + batch]})[0] for i in range(0, len(tiles), batch)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """``|a - b| / |b|`` (Frobenius norms of the whole tensors)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv: list[str] | None = None) -> int:
    """Print the table; write JSON with ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="a shared_backbone FP32 bundle (its backbone.onnx is quantized)")
    ap.add_argument("images", type=Path, help="folder of the run's training images (.png)")
    ap.add_argument("--images-max", type=int, default=4)
    ap.add_argument("--bits", type=int, nargs="+", choices=WEIGHT_BITS, default=[8, 7])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per graph (alternating)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if manifest.get("layout") != "shared_backbone" or manifest["model"].get("precision", "fp32") != "fp32":
        raise SystemExit(f"{args.bundle}: expected a shared_backbone FP32 bundle")
    backbone = args.bundle / manifest["backbone"]["file"]
    paths = sorted(args.images.glob("*.png"))[: args.images_max]
    if not paths:
        raise SystemExit(f"{args.images}: no .png images")
    tiles = np.concatenate([image_tiles(p, manifest) for p in paths])
    per_call = len(manifest["locations"])  # one image's tiles per timed call
    flags = cpu_flags()
    arithmetic = int8_arithmetic(flags)
    dot = ", ".join(sorted(f for f in flags if "vnni" in f or "amx" in f)) or "none"
    print(f"CPU INT8 arithmetic: {arithmetic} (VNNI/AMX flags: {dot})")
    print(f"{len(tiles)} tiles of {len(paths)} images; timed: {per_call} tiles per call")
    ref_session = session(backbone, True, args.threads)
    ref = features(ref_session, tiles)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tilead-sat-") as tmp:
        graphs: dict[str, Any] = {"fp32": ref_session}
        for bits in args.bits:
            out = Path(tmp) / f"int8_w{bits}.onnx"
            quantize_location(backbone, out, [tiles[i : i + 8] for i in range(0, len(tiles), 8)], weight_bits=bits)
            fused = session(out, True, args.threads)
            plain = session(out, False, args.threads)
            a, b = features(fused, tiles), features(plain, tiles)
            graphs[f"int8_w{bits}"] = fused
            rows.append(
                {"variant": f"int8_w{bits}", "fused_vs_fp32": rel(a, ref), "plain_vs_fp32": rel(b, ref),
                 "fused_vs_plain": rel(a, b)}
            )  # fmt: skip
        batch = tiles[:per_call]
        times: dict[str, list[float]] = {k: [] for k in graphs}
        for sess in graphs.values():  # warm-up
            sess.run(None, {sess.get_inputs()[0].name: batch})
        for _ in range(args.repeats):
            for name, sess in graphs.items():
                start = time.perf_counter()
                sess.run(None, {sess.get_inputs()[0].name: batch})
                times[name].append(time.perf_counter() - start)
    ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    head = ("variant", "fused vs FP32", "plain vs FP32", "fused vs plain", "ms", "FP32/x")
    print(f"{head[0]:10s} {head[1]:>14s} {head[2]:>14s} {head[3]:>15s} {head[4]:>8s} {head[5]:>7s}")
    print(f"{'fp32':10s} {'':>14s} {'':>14s} {'':>15s} {ms['fp32']:8.1f} {1.0:7.2f}")
    for row in rows:
        row["ms"] = ms[row["variant"]]
        row["speedup_vs_fp32"] = ms["fp32"] / row["ms"]
        print(
            f"{row['variant']:10s} {row['fused_vs_fp32']:14.4f} {row['plain_vs_fp32']:14.4f} "
            f"{row['fused_vs_plain']:15.4f} {row['ms']:8.1f} {row['speedup_vs_fp32']:7.2f}"
        )
    if args.json:
        result = {
            "bundle": str(args.bundle), "tiles": len(tiles), "tiles_per_timed_call": per_call,
            "int8_arithmetic": arithmetic, "fp32_ms": ms["fp32"], "rows": rows,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
