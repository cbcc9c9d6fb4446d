"""Two Predictor backends on the same bundle and real MVTec AD bottle test images: how far apart they are.

A quality check, not a timing: the largest difference of the normalized maps
and scores, the largest relative difference of the raw scores, and whether
every label agrees (ONNX Runtime is the reference).

Usage:
    python benchmarks/backend_parity.py BUNDLE [--backend openvino] [--data ../shared/data/mvtec_bottle]
        [--per-kind 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from tilead.runtime import Prediction, Predictor

KINDS = ("good", "broken_large", "broken_small", "contamination")


def main() -> None:
    """Parse the arguments, run both backends, print one line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", default="openvino", help="backend compared with onnxruntime")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_bottle"))
    parser.add_argument("--per-kind", type=int, default=3, help="test images per defect kind (and good)")
    args = parser.parse_args()
    paths = [p for kind in KINDS for p in sorted((args.data / "test" / kind).glob("*.png"))[: args.per_kind]]
    if not paths:
        parser.error(f"no test images under {args.data / 'test'}")
    images = [np.asarray(cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in paths]
    results: list[list[Prediction]] = []
    for backend in ("onnxruntime", args.backend):
        with Predictor(args.bundle, backend=backend, max_batch=4) as predictor:
            out = predictor.predict(images)
        assert isinstance(out, list)
        results.append(out)
    want, got = results
    pairs = list(zip(got, want, strict=True))
    maps = max(float(np.abs(g.anomaly_map - w.anomaly_map).max()) for g, w in pairs)
    scores = max(abs(g.score - w.score) for g, w in pairs)
    raw = max(abs(g.raw_score - w.raw_score) / max(abs(w.raw_score), 1e-12) for g, w in pairs)
    same = [g.label for g in got] == [w.label for w in want]
    print(
        f"{args.backend} vs onnxruntime on {len(images)} images: max |map diff| {maps:.2e}, max |score diff| "
        f"{scores:.2e}, max relative raw-score diff {raw:.2e}, labels identical {same} "
        f"({sum(w.label for w in want)} anomalous)"
    )


if __name__ == "__main__":
    main()
