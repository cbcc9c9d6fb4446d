"""Every native PaDiM head of a bundle, side by side as the hybrid backend runs them: two head forms (issue #21).

* ``rows``: the previous head: ``_kernels.mahalanobis_rows`` (each position's packed fp16 triangle
  read row by row, a masked tail per row) and the blur as one NumPy pass per tap (:func:`tap_blur`,
  the runtime's code before the lane layout);
* ``lanes``: :class:`tilead.runtime.native_heads.LaneHead`, what the runtime runs now: 16 positions
  in vector lanes (``_kernels.mahalanobis``) and the blur as two small matrix products.

All the bundle's heads run on ``--workers`` threads (one head per call, each single-threaded, as the
hybrid backend's location workers run them), on features drawn around each head's means, for each
``--batch`` and kernel path; the forms alternate round by round. Reported: median ms per image of all
heads together, the ratio ``rows / lanes``, and the largest difference between the two forms' maps
relative to the map's range. With ``--images``, the whole Predictor too (backend ``hybrid``, the best
kernel path): its heads swapped between the two forms call by call on the same images, median ms per image.
Run it on a quiet CPU.

Usage:
    python benchmarks/bench_head_layouts.py BUNDLE [--batch 1 8] [--repeats 15] [--workers 2]
        [--paths avx2 avx512] [--images DIR [--count 8]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tilead import _kernels
from tilead.runtime.bundle import read_manifest, read_verified_file
from tilead.runtime.native_heads import LaneHead, NativeHead


def tap_blur(maps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The blur as the runtime computed it before: reflect (or edge) padding, one NumPy pass per tap and axis."""
    r = (len(kernel) - 1) // 2
    h, w = maps.shape[-2:]
    width = ((0, 0), (0, 0), (r, r), (r, r))
    padded = np.pad(maps, width, mode="reflect") if min(h, w) > r else np.pad(maps, width, mode="edge")
    taps = kernel.astype(maps.dtype)
    rows = np.zeros((*maps.shape[:2], h + 2 * r, w), dtype=maps.dtype)
    for t, k in enumerate(taps):
        rows += k * padded[..., :, t : t + w]
    out = np.zeros(maps.shape, dtype=maps.dtype)
    for t, k in enumerate(taps):
        out += k * rows[..., t : t + h, :]
    return out


def rows_head(head: NativeHead, features: np.ndarray, path: str) -> np.ndarray:
    """``head``'s map through the previous kernel and blur: float32 ``(n, 1, h, w)``."""
    n = features.shape[0]
    h, w = head.size
    sq = np.empty((n, h * w), np.float32)
    _kernels.mahalanobis_rows(features.reshape(n, head.channels, h * w), head.mean, head.packed, sq, path)
    np.maximum(sq, 0.0, out=sq)
    np.sqrt(sq, out=sq)
    maps = sq.reshape(n, 1, h, w)
    return tap_blur(maps, head.blur) if head.blur.size else maps


class RowsHead:
    """A :class:`NativeHead` called as the hybrid backend calls its heads, through :func:`rows_head`."""

    def __init__(self, head: NativeHead) -> None:
        self.head = head

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """float32 ``(n, 1, h, w)`` of ``(n, d, h, w)`` features."""
        return rows_head(self.head, features, "auto")


def predictor_rows(
    bundle: Path, heads: list[NativeHead], images: Path, count: int, batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    """The whole Predictor with its native heads in either form, alternating call by call (median ms per image)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_outside_inference import image_paths, load

    from tilead.runtime import Predictor
    from tilead.runtime.backends.hybrid import HybridBackend

    predictor = Predictor(bundle, backend="hybrid")
    backend = predictor._open()
    if not isinstance(backend, HybridBackend) or not backend.native_heads:
        raise SystemExit(f"{bundle}: the hybrid backend does not run native heads here")
    lanes_heads = backend._native
    forms: dict[str, Any] = {"rows": [RowsHead(h) for h in heads], "lanes": lanes_heads}
    pictures = load(image_paths([images], count), predictor.image_size)
    out: list[dict[str, Any]] = []
    for b in batches:
        chunks = [pictures[i : i + b] for i in range(0, len(pictures), b)]
        ms: dict[str, list[float]] = {name: [] for name in forms}
        for form in forms.values():  # warm-up
            backend._native = form
            predictor.predict(chunks[0], input_order="RGB")
        for _ in range(repeats):
            for chunk in chunks:
                for name, form in forms.items():
                    backend._native = form
                    t0 = time.perf_counter()
                    results = predictor.predict(chunk, input_order="RGB")
                    ms[name].append((time.perf_counter() - t0) * 1e3 / len(chunk))
                    del results
        before, after = float(np.median(ms["rows"])), float(np.median(ms["lanes"]))
        out.append({"batch": b, "rows_ms": before, "lanes_ms": after, "ratio": before / after})
    backend._native = lanes_heads
    predictor.close()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print the table (see the module docstring); returns the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--workers", type=int, default=2, help="heads side by side (the hybrid backend's workers)")
    ap.add_argument("--paths", nargs="+", default=None, help="kernel paths (default: every one this CPU runs)")
    ap.add_argument("--images", type=Path, help="also time the whole Predictor on these images (a folder)")
    ap.add_argument("--count", type=int, default=8, help="images for --images")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = read_manifest(args.bundle)
    if not manifest.native_heads:
        raise SystemExit(f"{args.bundle}: no native heads (export it again with --precision bf16)")
    paths = args.paths or _kernels.mahalanobis_paths()
    for path in paths:
        if path not in _kernels.mahalanobis_paths():
            raise SystemExit(f"--paths: this CPU runs {_kernels.mahalanobis_paths()}, not {path!r}")
    heads = [
        NativeHead.from_bytes(read_verified_file(args.bundle, e, "native head"), e.file) for e in manifest.native_heads
    ]
    lanes: list[LaneHead] = [head.lanes() for head in heads]
    h, w = heads[0].size
    d = heads[0].channels
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(max(1, args.workers))
    rows: list[dict[str, Any]] = []
    for n in args.batch:
        feats = [
            (head.mean.T.reshape(1, d, h, w) + rng.standard_normal((n, d, h, w))).astype(np.float32) for head in heads
        ]
        for path in paths:
            forms = {
                "rows": lambda i, path=path, feats=feats: rows_head(heads[i], feats[i], path),
                "lanes": lambda i, path=path, feats=feats: lanes[i](feats[i], path),
            }
            ms: dict[str, list[float]] = {name: [] for name in forms}
            outputs: dict[str, list[np.ndarray]] = {}
            for name, run in forms.items():  # warm-up, and the maps compared
                outputs[name] = list(pool.map(run, range(len(heads))))
            for _ in range(args.repeats):
                for name, run in forms.items():
                    t0 = time.perf_counter()
                    list(pool.map(run, range(len(heads))))
                    ms[name].append((time.perf_counter() - t0) * 1e3 / n)
            span = max(float(m.max() - m.min()) for m in outputs["rows"]) or 1.0
            diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["rows"], outputs["lanes"], strict=True))
            before, after = float(np.median(ms["rows"])), float(np.median(ms["lanes"]))
            rows.append(
                {"batch": n, "path": path, "rows_ms": before, "lanes_ms": after, "ratio": before / after,
                 "max_diff_of_range": diff / span}
            )  # fmt: skip
    pool.shutdown()
    print(f"{args.bundle}: {len(heads)} heads, d={d}, map {h}x{w}, {args.workers} workers; ms per image, all heads")
    print(f"{'batch':>5} {'path':>7} {'rows':>9} {'lanes':>9} {'rows/lanes':>11} {'max diff/range':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['path']:>7} {r['rows_ms']:>9.3f} {r['lanes_ms']:>9.3f} {r['ratio']:>10.2f}x "
              f"{r['max_diff_of_range']:>15.2e}")  # fmt: skip
    report: dict[str, Any] = {"bundle": str(args.bundle), "heads": len(heads), "workers": args.workers, "rows": rows}
    if args.images is not None:
        whole = predictor_rows(args.bundle, heads, args.images, args.count, args.batch, max(1, args.repeats // 3))
        print("whole Predictor (hybrid, best path), ms per image")
        print(f"{'batch':>5} {'rows':>9} {'lanes':>9} {'rows/lanes':>11}")
        for r in whole:
            print(f"{r['batch']:>5} {r['rows_ms']:>9.2f} {r['lanes_ms']:>9.2f} {r['ratio']:>10.2f}x")
        report["predictor"] = whole
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
