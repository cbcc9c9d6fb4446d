"""Kernel throughput: tile, untile and seam smoothing against memcpy and the NumPy reference.

For a 2048x2048x3 uint8 image cut into 512x512 tiles (stride 512 and 384),
batch 1 and 8, one run measures side by side:

* ``copy``: ``np.copyto`` of a buffer as large as the tile buffer (the memory
  bandwidth ceiling),
* ``tile``: the tile kernel (uint8 HWC -> float32 tiles), and the NumPy
  reference of it,
* ``untile``: per-location maps at stride 8 (64x64 per tile) -> full map,
  and its reference,
* ``seam``: seam smoothing (sigma 2, width 0.1) of the full map, and its
  reference,

and reports GB/s as bytes read plus bytes written per second, the median over
repeats, with the two targets: tile >= 50% of copy bandwidth; untile + seam
smoothing >= 5x faster than the reference.

Usage:
    python benchmarks/bench_kernels.py [--repeats 7] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference as ref

from tilead import __version__, _kernels
from tilead.runtime import (
    Preprocessing,
    SeamSmoothing,
    TileGrid,
    get_num_threads,
    set_num_threads,
    smooth_seams,
    tile_images,
    untile_maps,
)

GB = 1e9


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(size: int, tile: int, stride: int, batch: int, repeats: int, ref_repeats: int) -> dict[str, Any]:
    """Measure every kernel for one grid and batch size."""
    grid = TileGrid(size, tile, stride)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    prep = Preprocessing()
    tiles = np.empty((grid.num_locations, batch, 3, tile, tile), dtype=np.float32)
    map_size = tile // 8
    maps = rng.random((grid.num_locations, batch, map_size, map_size), dtype=np.float32)
    canvas = np.empty((batch, size, size), dtype=np.float32)
    seam = SeamSmoothing(sigma=2.0, width=0.1)

    src = np.ones_like(tiles)
    dst = np.empty_like(tiles)
    t_copy = timeit(lambda: np.copyto(dst, src), repeats)
    t_tile = timeit(lambda: tile_images(images, grid, prep, input_order="BGR", out=tiles), repeats)
    threads = get_num_threads()
    set_num_threads(1)  # np.copyto is single-threaded: show the kernel on one thread too
    try:
        t_tile_1t = timeit(lambda: tile_images(images, grid, prep, input_order="BGR", out=tiles), repeats)
    finally:
        set_num_threads(threads)
    t_untile = timeit(lambda: untile_maps(maps, grid, out=canvas), repeats)
    merged = canvas.copy()
    t_seam = timeit(lambda: smooth_seams(merged, grid, seam, inplace=True), repeats)

    mean, std = list(prep.mean), list(prep.std)
    t_tile_ref = timeit(lambda: ref.tile(images, grid.tile_size, grid.stride, "shift", mean, std, 3, True), ref_repeats)
    t_untile_ref = timeit(lambda: ref.untile(maps, grid.image_size, grid.tile_size, grid.stride, "shift"), ref_repeats)
    t_seam_ref = timeit(
        lambda: ref.smooth_seams(merged, grid.image_size, grid.tile_size, grid.stride, "shift", seam.sigma, seam.width),
        ref_repeats,
    )

    bytes_copy = 2 * tiles.nbytes
    bytes_tile = images.nbytes + tiles.nbytes
    bytes_untile = maps.nbytes + canvas.nbytes
    bytes_seam = 2 * canvas.nbytes
    return {
        "image": [batch, size, size, 3],
        "tile": tile,
        "stride": stride,
        "batch": batch,
        "locations": grid.num_locations,
        "seconds": {
            "copy": t_copy,
            "tile": t_tile,
            "tile_1thread": t_tile_1t,
            "tile_ref": t_tile_ref,
            "untile": t_untile,
            "untile_ref": t_untile_ref,
            "seam": t_seam,
            "seam_ref": t_seam_ref,
        },
        "gbps": {
            "copy": bytes_copy / t_copy / GB,
            "tile": bytes_tile / t_tile / GB,
            "tile_1thread": bytes_tile / t_tile_1t / GB,
            "tile_ref": bytes_tile / t_tile_ref / GB,
            "untile": bytes_untile / t_untile / GB,
            "untile_ref": bytes_untile / t_untile_ref / GB,
            "seam": bytes_seam / t_seam / GB,
            "seam_ref": bytes_seam / t_seam_ref / GB,
        },
        "tile_vs_copy": (bytes_tile / t_tile) / (bytes_copy / t_copy),
        "tile_1thread_vs_copy": (bytes_tile / t_tile_1t) / (bytes_copy / t_copy),
        "untile_seam_speedup_vs_ref": (t_untile_ref + t_seam_ref) / (t_untile + t_seam),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print one line per case: GB/s of each kernel and reference, and the target ratios."""
    head = (
        f"{'tile/stride':>11} {'batch':>5} {'loc':>4} | {'copy':>6} | {'tile':>6} {'1 thr':>6} {'ref':>6} | "
        f"{'untile':>6} {'ref':>6} | {'seam':>6} {'ref':>6} | {'tile/copy':>9} {'(untile+seam) vs ref':>21}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        g = r["gbps"]
        tile_ok = "ok" if r["tile_vs_copy"] >= 0.5 else "LOW"
        speed_ok = "ok" if r["untile_seam_speedup_vs_ref"] >= 5 else "LOW"
        print(
            f"{r['tile']:>5}/{r['stride']:<5} {r['batch']:>5} {r['locations']:>4} | {g['copy']:6.2f} | "
            f"{g['tile']:6.2f} {g['tile_1thread']:6.2f} {g['tile_ref']:6.2f} | "
            f"{g['untile']:6.2f} {g['untile_ref']:6.2f} | "
            f"{g['seam']:6.2f} {g['seam_ref']:6.2f} | {r['tile_vs_copy']:7.0%} {tile_ok:<3}"
            f" {r['untile_seam_speedup_vs_ref']:15.1f}x {speed_ok}"
        )
    print(
        "GB/s = (bytes read + bytes written) / median time. copy: np.copyto (one thread) of a buffer "
        "the size of the tile buffer. tile: all kernel threads; 1 thr: the tile kernel on one thread. ref: the NumPy "
        "reference in tests/reference.py (float64). Targets: tile >= 50% of copy; untile + seam >= 5x "
        "faster than ref."
    )


def environment() -> dict[str, Any]:
    """Machine and library facts stored with the figures."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "tilead": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "kernel_threads": get_num_threads(),
        "cuda_built": bool(_kernels.cuda.is_built()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per kernel (median reported)")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed runs per NumPy reference")
    parser.add_argument("--json", type=Path, help="write every figure and the environment to this file")
    parser.add_argument("--quick", action="store_true", help="small image (512x512, tiles of 128) for smoke tests")
    args = parser.parse_args(argv)
    size, tile = (512, 128) if args.quick else (2048, 512)
    cases = [(tile, tile), (tile, tile * 3 // 4)]
    rows = []
    for t, s in cases:
        for batch in (1, 8):
            rows.append(bench_case(size, t, s, batch, args.repeats, args.ref_repeats))
    env = environment()
    threads = env["kernel_threads"]
    print(f"tilead {env['tilead']} | {env['cpu']} | kernel threads {threads} | numpy {env['numpy']}")
    print(f"image {size}x{size}x3 uint8, tiles {tile}, maps at stride 8\n")
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"environment": env, "cases": rows}, indent=2))
        tmp.replace(args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
