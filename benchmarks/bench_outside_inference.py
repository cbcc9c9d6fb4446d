"""Where a Predictor call's time goes outside model inference, per stage, at batch 1 and 8 (issue #21, item 3).

Two tables for one bundle:

* **predict**: ``Predictor.predict_timed`` on real images, batch by batch (every batch
  size alternating, so all see the same load), the caller dropping each result before the
  next call as a loop does. Per stage (``input``, ``tile``, ``inference``, ``untile``,
  ``seam``, ``crop``, ``normalize``, ...) the median ms per image; the wall time per image;
  ``outside``: everything but ``inference``, in ms per image and as a share of the wall time.
* **kernels** (``--kernels``): each host kernel alone (tile, untile, seam, normalize) on
  pre-allocated buffers at the bundle's geometry, the best of ``--repeats`` runs, with 1
  thread and with the Predictor's budget: the floor the stages can reach. ``sum`` is the
  chain of the four; ``fused`` the one-pass kernel the Predictor runs instead of untile, seam
  and normalize when the canvas is the image (``_kernels.postprocess_maps``), and
  ``tile+fused`` what the Predictor's host kernels then cost; ``tile_u8`` the uint8 tile kernel
  (what the tile step is for a bf16 bundle whose backbone takes uint8 tiles, ``model.backbone_input``);
  for such bundles also a batch's uint8 tiles cut two ways, caches flushed: the images stacked into one array
  first (the Predictor before) and tiled where each image is (the Predictor now).

In the **predict** table the Predictor's CPU post-processing for a grid whose canvas is the
image is that one pass: its ``untile`` column is untile + seam + normalize together, and
``normalize`` only the image scores' bookkeeping after it (``seam`` and ``crop`` are absent).

Targets (issue #21, 2-core CPU): outside inference <= 5 % of the latency, i.e. <= about
7 ms per image at 2048x2048 (4x4 of 512) and <= about 1.5 ms on bottle (900x900, 2x2 of 464).

Usage:
    python benchmarks/bench_outside_inference.py BUNDLE IMAGES... [--batch 1 8] [--repeats 5]
        [--threads N] [--kernels] [--json out/bench/outside_inference.json]

``IMAGES`` are image files or directories (searched recursively for .png / .jpg / .bmp);
the first ``--images`` of them (default 8) are decoded once, resized to the bundle's size
if needed, before any timing. Run it on a quiet machine: the per-stage figures are a few
milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime import Predictor
from tilead.runtime.image_resize import resize_image

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
STAGES = ("input", "tile", "inference", "untile", "seam", "crop", "fuse", "normalize", "output_resize")
OUTSIDE_MAX = 0.05


def image_paths(sources: list[Path], count: int) -> list[Path]:
    """The first ``count`` image files of ``sources`` (files, or directories searched recursively, sorted)."""
    found: list[Path] = []
    for src in sources:
        if src.is_dir():
            found += sorted(p for p in src.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif src.is_file():
            found.append(src)
        else:
            raise SystemExit(f"{src}: no such file or directory")
    if not found:
        raise SystemExit(f"no images ({', '.join(SUFFIXES)}) under {', '.join(map(str, sources))}")
    return found[:count]


def load(paths: list[Path], size: tuple[int, int]) -> list[np.ndarray]:
    """Decoded RGB uint8 images at the bundle's ``(height, width)``."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            img = np.asarray(im.convert("RGB"))
        out.append(img if img.shape[:2] == size else resize_image(img, size))
    return out


def measure_predict(
    predictor: Predictor, images: list[np.ndarray], batches: list[int], repeats: int
) -> dict[int, dict[str, Any]]:
    """Per batch size: median ms per image of every stage, of the wall time and of everything outside inference."""
    samples: dict[int, dict[str, list[float]]] = {b: {} for b in batches}
    chunks = {b: [images[i : i + b] for i in range(0, len(images), b)] for b in batches}
    for b in batches:  # warm-up: sessions, buffers
        for chunk in chunks[b][:2]:
            predictor.predict(chunk, input_order="RGB")
    for _ in range(repeats):
        for b in batches:
            for chunk in chunks[b]:
                t0 = time.perf_counter()
                results, times = predictor.predict_timed(chunk, input_order="RGB")
                wall = time.perf_counter() - t0
                del results  # as a loop that keeps no result
                per = samples[b]
                n = len(chunk)
                per.setdefault("wall", []).append(wall * 1000 / n)
                per.setdefault("outside", []).append((wall - times.seconds.get("inference", 0.0)) * 1000 / n)
                for stage in STAGES:
                    if stage in times.seconds:
                        per.setdefault(stage, []).append(times.seconds[stage] * 1000 / n)
    report: dict[int, dict[str, Any]] = {}
    for b, per in samples.items():
        row: dict[str, Any] = {k: float(np.median(v)) for k, v in per.items()}
        row["outside_share"] = row["outside"] / row["wall"]
        row["samples"] = len(per["wall"])
        report[b] = row
    return report


def measure_kernels(predictor: Predictor, threads: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Best-of-``repeats`` ms per image of each host kernel alone, on pre-allocated buffers, per thread count."""
    from tilead import _kernels
    from tilead.runtime.devices import thread_budget
    from tilead.runtime.postprocess import BLEND_CODES, tile_norm_arrays
    from tilead.runtime.preprocess import tile_images, tile_images_u8, tile_shape, tile_shape_u8, uint8_tiles_fit

    m = predictor.manifest
    grid, post = m.grid, predictor.post
    rng = np.random.default_rng(0)
    n = 1
    h, w = m.map_size
    lo, hi = m.stats.pixel_range if m.stats.pixel_range is not None else (0.0, 1.0)
    maps = (rng.random((grid.num_locations, n, h, w), dtype=np.float32) * (hi - lo) + lo).astype(np.float32)
    canvas = np.empty((n, *grid.canvas_size), np.float32)
    merged = np.empty_like(canvas)
    masks = np.empty(canvas.shape, np.uint8)
    raw, scores = np.empty(n, np.float32), np.empty(n, np.float32)
    images = rng.integers(0, 256, (n, *grid.image_size, m.preprocessing.channels), dtype=np.uint8)
    tiles = np.empty(tile_shape(grid, n, m.preprocessing), m.preprocessing.dtype)
    pixels = np.empty(tile_shape_u8(grid, n, m.preprocessing), np.uint8) if uint8_tiles_fit(grid) else None
    spec = post.native()
    seam = None if post.seam is None else post.seam.native
    thresholds, scales = tile_norm_arrays(m.stats.tile_stats.as_tuple() if m.stats.tile_stats else None, grid)
    fused = None
    if grid.canvas_size == grid.image_size:
        seam_spec = _kernels.SeamSpec.off() if seam is None else seam

        def fused() -> None:
            _kernels.postprocess_maps(
                maps, grid.native, canvas, masks, raw, scores, spec.weights, thresholds, scales, seam_spec, spec.norm
            )

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1000 / n

    out: dict[int, dict[str, float]] = {}
    for t in threads:
        with thread_budget(t):
            row = {"tile": best(lambda: tile_images(images, grid, m.preprocessing, out=tiles))}
            row["untile"] = best(lambda: _kernels.untile_maps(maps, grid.native, canvas, BLEND_CODES[post.weights]))
            if seam is not None:
                row["seam"] = best(lambda: _kernels.smooth_seams(canvas, grid.native, seam))
            np.copyto(merged, canvas)
            row["normalize"] = best(lambda: _kernels.normalize_maps(merged, canvas, masks, raw, scores, spec.norm))
            row["sum"] = sum(row.values())
            if fused is not None:  # the Predictor's pass: untile + seams + normalize in one
                row["fused"] = best(fused)
                row["tile+fused"] = row["tile"] + row["fused"]
            if pixels is not None:  # the uint8 tiles an OpenVINO backbone takes (bf16 bundles' backbone_input uint8)
                row["tile_u8"] = best(lambda: tile_images_u8(images, grid, m.preprocessing, out=pixels))
        out[t] = row
    return out


def measure_batch_tiling(predictor: Predictor, images: list[np.ndarray], repeats: int) -> dict[str, float] | None:
    """uint8 tiles of a batch: stacked into one array first (before issue #21's change) vs tiled where each image is.

    Every image of ``images`` in one call, caches flushed before each (64 MB read), the two ways alternating;
    median ms per image. None unless the bundle's backend takes uint8 tiles (and there are two images or more).
    """
    from tilead.runtime.devices import thread_budget
    from tilead.runtime.predictor import takes_uint8_tiles
    from tilead.runtime.preprocess import tile_images_u8, tile_shape_u8, uint8_tiles_fit

    m = predictor.manifest
    if not takes_uint8_tiles(predictor._open()) or not uint8_tiles_fit(m.grid) or len(images) < 2:
        return None
    n = len(images)
    out = np.empty(tile_shape_u8(m.grid, n, m.preprocessing), np.uint8)
    staging = np.empty((n, *images[0].shape), np.uint8)
    flush = np.ones(64 << 20, np.uint8)
    stacked: list[float] = []
    in_place: list[float] = []
    with thread_budget(predictor.threads):
        for _ in range(repeats):
            flush.sum()
            t0 = time.perf_counter()
            tile_images_u8(np.stack(images, out=staging), m.grid, m.preprocessing, input_order="RGB", out=out)
            stacked.append(time.perf_counter() - t0)
            flush.sum()
            t0 = time.perf_counter()
            tile_images_u8(images, m.grid, m.preprocessing, input_order="RGB", out=out)
            in_place.append(time.perf_counter() - t0)
    a, b = float(np.median(stacked)) * 1000 / n, float(np.median(in_place)) * 1000 / n
    return {"images": n, "stacked_ms": a, "in_place_ms": b, "ratio": a / b}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("images", type=Path, nargs="+", help="image files or directories")
    ap.add_argument("--images", dest="count", type=int, default=8, help="images to use")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="Predictor threads [all cores]")
    ap.add_argument("--kernels", action="store_true", help="also each host kernel alone (1 thread and the budget)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with Predictor(args.bundle, max_batch=max(args.batch), threads=args.threads) as predictor:
        images = load(image_paths(args.images, args.count), predictor.image_size)
        report: dict[str, Any] = {
            "bundle": str(args.bundle),
            "image_size": list(predictor.image_size),
            "images": len(images),
            "threads": predictor.threads,
            "predict": measure_predict(predictor, images, args.batch, args.repeats),
        }
        if args.kernels:
            report["kernels"] = measure_kernels(predictor, sorted({1, predictor.threads}), max(args.repeats, 10))
            report["batch_tiling"] = measure_batch_tiling(predictor, images, max(args.repeats, 10))
    print_tables(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_tables(report: dict[str, Any]) -> None:
    """The tables as text."""
    h, w = report["image_size"]
    print(f"{report['bundle']}: {h}x{w}, {report['images']} images, {report['threads']} threads; ms per image (median)")
    cols = [s for s in STAGES if any(s in row for row in report["predict"].values())]
    print(f"{'batch':>5} {'wall':>8} " + " ".join(f"{c:>9}" for c in cols) + f" {'outside':>8} {'share':>7}")
    for b, row in report["predict"].items():
        mark = "ok" if row["outside_share"] <= OUTSIDE_MAX else "MISS"
        cells = " ".join(f"{row[c]:>9.2f}" if c in row else f"{'-':>9}" for c in cols)
        print(f"{b:>5} {row['wall']:>8.2f} {cells} {row['outside']:>8.2f} {row['outside_share'] * 100:>6.1f}% {mark}")
    if all("seam" not in row and "crop" not in row for row in report["predict"].values()):
        print("  (untile: the fused pass, untile + seams + normalization in one; normalize: the scores after it)")
    if "kernels" in report:
        print("host kernels alone, best of N, ms per image (1 image, pre-allocated buffers)")
        for t, row in report["kernels"].items():
            print(f"  threads {t}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    tiling = report.get("batch_tiling")
    if tiling:
        a, b, ratio = tiling["stacked_ms"], tiling["in_place_ms"], tiling["ratio"]
        print(f"uint8 tiles of {tiling['images']} images, cold, ms per image: stacked first {a:.2f}, "
              f"where they are {b:.2f} ({ratio:.2f}x)")  # fmt: skip
    print(f"target: outside inference <= {OUTSIDE_MAX:.0%} of the wall time")


if __name__ == "__main__":
    sys.exit(main())
