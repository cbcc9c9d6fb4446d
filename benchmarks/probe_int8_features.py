"""How far INT8 moves a shared backbone's features, by what is quantized (issue #21, docs/cpu_speed.md).

Reads a ``shared_backbone`` FP32 bundle's ``backbone.onnx`` and the run's training images, cuts them
into the bundle's tiles (stride = tile, no edge shift: the 2048 benchmark's grid), quantizes the
backbone with ONNX Runtime (QDQ, per-channel INT8 weights, UINT8 activations, calibrated on one tile
per location) in a few variants, and prints per variant the median over tiles of
``|INT8 - FP32| / |FP32|`` (norms of the whole feature tensor). Quality figure, not a speed figure.

Usage::

    python benchmarks/probe_int8_features.py BUNDLE IMAGE_DIR [--variants all stem_fp32 ...] [--images 6]

Variants: ``all`` (every backbone node, MinMax), ``percentile``, ``entropy`` (calibration methods),
``stem_fp32`` (what the exporter does: :func:`tilead.exporter.quantize.stem_nodes` kept FP32), ``stem_res_fp32``
(the rule before: every node at the stem's resolution kept FP32, its trailing expansion convolution included).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from tilead.exporter.quantize import TileReader, split_nodes, stem_nodes

VARIANTS = ("all", "percentile", "entropy", "stem_fp32", "stem_res_fp32")


def image_tiles(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """``(locations, C, th, tw)`` float32 tiles of one image, normalized as the manifest says."""
    grid = manifest["grid"]
    prep = manifest["preprocessing"]
    th, tw = grid["tile_size"]
    h, w = grid["image_size"]
    if grid["stride"] != [th, tw] or h % th or w % tw:
        raise SystemExit("this probe cuts non-overlapping tiles only (stride = tile, image a multiple of it)")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.shape[:2] != (h, w):
        raise SystemExit(f"{path}: expected a {w}x{h} image")
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    norm = (rgb - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    tiles = norm.reshape(h // th, th, w // tw, tw, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, th, tw)
    return np.ascontiguousarray(tiles)


def features(path: Path, tiles: np.ndarray) -> np.ndarray:
    """The backbone's features of ``tiles``, 4 at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: tiles[i : i + 4]})[0] for i in range(0, len(tiles), 4)])


def main(argv: list[str] | None = None) -> int:
    """Print the feature error per variant."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("images", type=Path, help="folder of the run's training images (.png)")
    ap.add_argument("--images-max", type=int, default=6)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    backbone = args.bundle / manifest["backbone"]["file"]
    paths = sorted(args.images.glob("*.png"))[: args.images_max]
    tiles = np.stack([image_tiles(p, manifest) for p in paths])  # (images, locations, C, th, tw)
    flat = tiles.reshape(-1, *tiles.shape[2:])
    ref = features(backbone, flat)
    model = onnx.load(str(backbone))
    bb, rest = split_nodes(model)
    calib = [tiles[i % len(tiles), i][None] for i in range(tiles.shape[1])]  # one tile per location
    methods = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            keep = stem_nodes(model, bb, expansion=variant == "stem_res_fp32") if variant.startswith("stem") else []
            out = Path(tmp) / f"{variant}.onnx"
            quantize_static(
                str(backbone), str(out), TileReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods.get(variant, CalibrationMethod.MinMax),
                nodes_to_quantize=[n for n in bb if n not in keep], nodes_to_exclude=rest + keep,
                extra_options={"CalibTensorRangeSymmetric": False},
            )  # fmt: skip
            got = features(out, flat)
            err = np.linalg.norm((got - ref).reshape(len(flat), -1), axis=1)
            rel = err / np.linalg.norm(ref.reshape(len(flat), -1), axis=1)
            print(f"{variant:12s} feature error median {np.median(rel):.4f} max {rel.max():.4f} ({len(flat)} tiles)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
