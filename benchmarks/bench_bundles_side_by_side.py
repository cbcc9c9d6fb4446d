"""Bundles of one grid side by side in one process: the whole Predictor, and their OpenVINO backbones alone (#21).

For comparing two exports of the same run that differ in one choice (an exporter rule, a precision):
every bundle is loaded into its own ``runtime.Predictor`` (``--backend``, ``auto`` by default), and the
calls alternate bundle by bundle on the same decoded images (decoding excluded), so all see the same
machine load. Reported per bundle and batch: the median ms per image (a batch's wall time / its
images), the ratio of the first bundle's median to this one's (above 1: this one is faster), and the
share outside model inference (``1 - inference / wall``, ``Predictor.predict_timed``). Each bundle's
maps are compared with the first's (largest difference relative to the first's map range): a quality
figure needs ``tilead eval RUN --bundle B``.

With ``--backbone``, each ``shared_backbone`` bundle's ``backbone.onnx`` is also compiled by OpenVINO
on one thread and one stream, as the ``hybrid`` backend compiles it (uint8 tiles where the manifest
says so, the bf16 hint for ``bf16`` and ``int8_bf16`` bundles, f32 otherwise), and run on one real tile
at a time, alternating bundle by bundle: the median ms per tile.

Run it on a quiet CPU; quote the ratios, not the milliseconds, across machines.

Usage:
    python benchmarks/bench_bundles_side_by_side.py BUNDLE_A BUNDLE_B [...] --images DIR [--count 8]
        [--batch 1 8] [--repeats 3] [--backend auto] [--backbone] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from bench_outside_inference import image_paths

from tilead.runtime import Predictor
from tilead.runtime.bundle import read_manifest, refit_on_openvino

T = TypeVar("T")


def one_bundle_args(doc: str | None, argv: list[str] | None, count: int, repeats: int) -> argparse.Namespace:
    """The arguments of a script that runs forms of one bundle side by side (``bundle``, ``--images``, ...).

    Args:
        doc: The script's docstring (its ``--help``).
        argv: The command line (None: ``sys.argv``).
        count: ``--count``'s default (images).
        repeats: ``--repeats``' default.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--count", type=int, default=count)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def rounds(names: Iterable[str], repeats: int, chunks: Sequence[T]) -> Iterator[tuple[T, list[str]]]:
    """``(chunk, names in this round's order)`` for every chunk of ``repeats`` rounds, every other round reversed."""
    forward = list(names)
    for r in range(repeats):
        order = forward if r % 2 == 0 else forward[::-1]
        for chunk in chunks:
            yield chunk, order


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """``report`` as indented JSON at ``path`` (its folder made), or nothing for None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def load_images(folder: Path, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` RGB uint8 ``(H, W, 3)`` images of ``size`` (``(h, w)``) from ``folder`` (recursively, evenly spread).

    Raises:
        SystemExit: If the folder holds fewer such images.
    """
    from PIL import Image

    paths = image_paths([folder], sys.maxsize)  # every image file, sorted (bench_outside_inference.py)
    step = max(1, len(paths) // count)
    images = []
    for path in paths[::step]:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        if rgb.shape[:2] == size:
            images.append(rgb)
        if len(images) == count:
            return images
    raise SystemExit(f"{folder}: {len(images)} images of {size[1]}x{size[0]}, --count asks for {count}")


def time_predictors(
    predictors: list[Predictor], images: list[np.ndarray], batch: int, repeats: int
) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Alternate the predictors batch by batch.

    Returns:
        Per predictor: seconds per image of every batch, the share outside inference of every batch, and the
        largest map difference from the first predictor's relative to the first's map range.
    """
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    for predictor in predictors:  # warm-up: buffers, lazy initialization
        predictor.predict(batches[0], input_order="RGB")
    per_image: list[list[float]] = [[] for _ in predictors]
    outside: list[list[float]] = [[] for _ in predictors]
    diffs = [0.0 for _ in predictors]
    for _ in range(repeats):
        for chunk in batches:
            first: np.ndarray | None = None
            for i, predictor in enumerate(predictors):
                start = time.perf_counter()
                results, times = predictor.predict_timed(chunk, input_order="RGB")
                wall = time.perf_counter() - start
                per_image[i].append(wall / len(chunk))
                inference = times.seconds.get("inference", 0.0)
                outside[i].append(max(0.0, 1.0 - inference / wall))
                maps = np.stack([r.anomaly_map for r in results])
                if first is None:
                    first = maps
                else:
                    span = float(first.max() - first.min()) or 1.0
                    diffs[i] = max(diffs[i], float(np.abs(maps - first).max()) / span)
    return per_image, outside, diffs


def backbone_request(bundle: Path) -> Any:
    """``bundle``'s backbone compiled by OpenVINO as the hybrid backend does, on 1 thread and 1 stream."""
    import openvino as ov

    from tilead.runtime.backends.hybrid import bf16_config
    from tilead.runtime.backends.openvino import compile_backbone, stream_config

    manifest = read_manifest(bundle)
    if manifest.backbone is None:
        raise SystemExit(f"{bundle}: --backbone needs shared_backbone bundles")
    config = bf16_config(1, 1) if refit_on_openvino(manifest.precision) else stream_config({}, 1, 1)
    location = compile_backbone(
        ov.Core(),
        str(bundle / manifest.backbone.file),
        config,
        manifest.preprocessing,
        manifest.grid.tile_size,
        manifest.uint8_backbone,
    )
    return location.compiled.create_infer_request(), manifest.uint8_backbone


def time_backbones(bundles: list[Path], image: np.ndarray, repeats: int) -> list[list[float]]:
    """Seconds per call of each bundle's backbone on one tile of ``image``, alternating bundle by bundle."""
    requests = [backbone_request(b) for b in bundles]
    manifest = read_manifest(bundles[0])
    th, tw = manifest.grid.tile_size
    tile_u8 = np.ascontiguousarray(image[:th, :tw][None])  # (1, th, tw, 3)
    mean = np.asarray(manifest.preprocessing.mean, np.float32)[:, None, None]
    std = np.asarray(manifest.preprocessing.std, np.float32)[:, None, None]
    tile_f32 = np.ascontiguousarray(((tile_u8[0].transpose(2, 0, 1) / 255.0 - mean) / std)[None], dtype=np.float32)
    inputs = [tile_u8 if uint8 else tile_f32 for _, uint8 in requests]
    for (request, _), x in zip(requests, inputs, strict=True):
        for _ in range(3):
            request.infer([x])
    seconds: list[list[float]] = [[] for _ in bundles]
    for _ in range(repeats):
        for i, ((request, _), x) in enumerate(zip(requests, inputs, strict=True)):
            start = time.perf_counter()
            request.infer([x])
            seconds[i].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Print the table (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--images", type=Path, required=True, help="a folder of images of the bundles' size")
    ap.add_argument("--count", type=int, default=8, help="images (a multiple of every batch)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--backbone", action="store_true", help="also each shared backbone alone, one tile per call")
    ap.add_argument("--backbone-calls", type=int, default=60)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if len(args.bundles) < 2:
        raise SystemExit("give at least two bundles")
    from tilead.benchmarking.environment import cpu_model

    manifests = [read_manifest(b) for b in args.bundles]
    size = manifests[0].grid.image_size
    for bundle, manifest in zip(args.bundles, manifests, strict=True):
        if manifest.grid != manifests[0].grid:
            raise SystemExit(f"{bundle}: another grid than {args.bundles[0]}'s; compare bundles of one grid")
    images = load_images(args.images, max(args.count, max(args.batch)), size)
    predictors = [Predictor(b, backend=args.backend) for b in args.bundles]
    report: dict[str, Any] = {
        "cpu": cpu_model(),
        "bundles": [str(b) for b in args.bundles],
        "backends": [p.backend for p in predictors],
        "images": len(images),
        "repeats": args.repeats,
        "batches": {},
    }
    print(f"{cpu_model()}; {len(images)} images of {size[1]}x{size[0]}, {args.repeats} repeats; ms per image (median)")
    print(f"{'batch':>5}  {'bundle':<58} {'ms/img':>8} {'ratio':>7} {'outside':>8} {'map diff':>9}")
    for batch in args.batch:
        per_image, outside, diffs = time_predictors(predictors, images, batch, args.repeats)
        base = float(np.median(per_image[0]))
        rows = []
        for bundle, secs, share, diff in zip(args.bundles, per_image, outside, diffs, strict=True):
            median = float(np.median(secs))
            row: dict[str, Any] = {
                "bundle": str(bundle),
                "ms_per_image": 1e3 * median,
                "ratio_to_first": base / median,
                "outside_share": float(np.median(share)),
                "map_diff_to_first": diff,
            }
            rows.append(row)
            print(
                f"{batch:>5}  {str(bundle)[-58:]:<58} {1e3 * median:>8.2f} {base / median:>6.3f}x "
                f"{100 * row['outside_share']:>7.1f}% {diff:>9.2e}"
            )
        report["batches"][str(batch)] = rows
    for predictor in predictors:
        predictor.close()
    if args.backbone:
        seconds = time_backbones(args.bundles, images[0], args.backbone_calls)
        base = float(np.median(seconds[0]))
        print(f"backbone alone, OpenVINO, 1 thread, one {manifests[0].grid.tile_size[0]}-pixel tile per call:")
        rows = []
        for bundle, secs in zip(args.bundles, seconds, strict=True):
            median = float(np.median(secs))
            rows.append({"bundle": str(bundle), "ms_per_tile": 1e3 * median, "ratio_to_first": base / median})
            print(f"       {str(bundle)[-58:]:<58} {1e3 * median:>8.2f} {base / median:>6.3f}x")
        report["backbone"] = rows
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
