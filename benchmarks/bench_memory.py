r"""Peak RSS of a Predictor: load, predict at each batch size, in a fresh process per bundle (issue #21).

For every bundle a fresh torch-free child process decodes the test images
(real images at the bundle's size; other sizes are resized first, before
anything is measured), loads the Predictor, predicts twice at each batch size
in turn (1 then 8 by default) and reads ``/proc/self/status`` after each
step: ``VmRSS`` (resident now) and ``VmHWM`` (peak so far; unlike
``ru_maxrss`` it does not carry the parent's peak over exec). It then
attributes what it can of the resident memory:

* ``images``: the decoded test images (the caller's, not the Predictor's);
* ``model files``: the bundle's ONNX files (the heads' initializers dominate
  them; ONNX Runtime holds them once, fp16 rows stay fp16);
* ``loaded other``: the rest of what loading added (ONNX Runtime's code and
  sessions, Python modules, thread stacks);
* ``pooled buffers``: idle buffers the Predictor keeps for the next call (tiles,
  stacked images, backbone features, image-size maps and masks), summed from
  the pools;
* ``rest``: the peak minus all of the above: ONNX Runtime's arenas (activations
  of the sessions that ran at once), the per-location maps of a call and
  allocator slack.

    python benchmarks/bench_memory.py /work/bq/2048_shared_backbone_fp32 /work/bq/2048_shared_backbone_int8 \
        --images /work/bq/data2048/test --batch 1 8 [--json out/bench/memory.json]

Memory figures hardly depend on the CPU's load; ``--threads`` (default 2) fixes
the thread budget so that the arenas of the sessions that run at once compare
between machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD_TAG = "MEMORY-JSON "
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TARGET_MIB = 1536.0  # issue #21: peak RSS at 2048x2048 <= 1.5 GB


def status_mib() -> dict[str, float]:
    """This process's ``VmRSS`` and ``VmHWM`` in MiB (:func:`tilead.benchmarking.environment.process_memory_mib`)."""
    from tilead.benchmarking.environment import process_memory_mib

    try:
        return process_memory_mib()
    except RuntimeError:
        raise SystemExit("bench_memory needs Linux's /proc/self/status (VmRSS, VmHWM)") from None


def image_paths(folder: Path, count: int) -> list[Path]:
    """The first ``count`` images under ``folder`` (recursively, sorted by path).

    Raises:
        SystemExit: If the folder holds fewer than ``count`` images.
    """
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < count:
        raise SystemExit(f"--images {folder}: {len(paths)} image(s) found, the largest batch needs {count}")
    return paths[:count]


def pool_bytes(pool: Any) -> int:
    """Bytes of the idle buffers a :class:`BufferPool` or :class:`LeasePool` holds now."""
    total: int = pool.idle_bytes
    return total


def child(bundle: Path, paths: list[Path], batches: list[int], threads: int | None) -> dict[str, Any]:
    """Load, predict at each batch size, measure (runs in the fresh process)."""
    import numpy as np
    from PIL import Image

    from tilead.runtime import Predictor, read_manifest
    from tilead.runtime.image_resize import resize_image

    start = status_mib()
    manifest = read_manifest(bundle)
    h, w = manifest.grid.image_size
    images = []
    for p in paths:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        images.append(bgr if bgr.shape[:2] == (h, w) else resize_image(bgr, (h, w)))
    decoded = status_mib()
    model_bytes = sum((bundle / f.file).stat().st_size for f in manifest.files)
    steps: dict[str, dict[str, float]] = {"start": start, "images": decoded}
    pools: dict[str, dict[str, float]] = {}
    with Predictor(bundle, threads=threads, max_batch=max(batches)) as predictor:
        steps["loaded"] = status_mib()
        for batch in batches:
            for _ in range(2):
                results = predictor.predict(images[:batch])
                del results
            steps[f"batch {batch}"] = status_mib()
            backend_pool = getattr(predictor._open(), "_buffers", None)
            pools[f"batch {batch}"] = {
                "tiles": pool_bytes(predictor._tiles) / 2**20,
                "outputs": pool_bytes(predictor._outputs) / 2**20,
                "features": (pool_bytes(backend_pool) if backend_pool is not None else 0) / 2**20,
            }
    last = f"batch {batches[-1]}"
    peak = steps[last]["VmHWM"]
    images_mib = decoded["VmRSS"] - start["VmRSS"]
    model_mib = model_bytes / 2**20
    loaded_mib = steps["loaded"]["VmRSS"] - decoded["VmRSS"]
    pooled = sum(pools[last].values())
    breakdown = {
        "interpreter": start["VmRSS"],
        "images": images_mib,
        "model files": model_mib,
        "loaded other": loaded_mib - model_mib,
        "pooled buffers": pooled,
        "rest": peak - start["VmRSS"] - images_mib - loaded_mib - pooled,
    }
    return {
        "bundle": str(bundle),
        "layout": manifest.layout,
        "precision": manifest.raw.get("model", {}).get("precision", "fp32"),
        "image_size": [h, w],
        "locations": len(manifest.locations),
        "threads": threads,
        "peak_rss_mib": peak,
        "steps": steps,
        "pools_mib": pools,
        "breakdown_mib": breakdown,
    }


def run_child(bundle: Path, paths: list[Path], batches: list[int], threads: int | None) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter; its JSON line parsed."""
    cmd = [sys.executable, __file__, "--child", str(bundle), "--batch", *map(str, batches), "--paths", *map(str, paths)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"memory child for {bundle} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith(CHILD_TAG)), None)
    if line is None:
        raise SystemExit(f"memory child for {bundle} printed no result:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(line[len(CHILD_TAG) :])
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (MiB): RSS after each step, peak, breakdown."""
    batches = [k for k in results[0]["steps"] if k.startswith("batch ")]
    parts = list(results[0]["breakdown_mib"])
    head = ["bundle", "loaded RSS", *(f"{b} RSS" for b in batches), "peak (VmHWM)", *parts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        name = Path(r["bundle"]).name
        cells = [name, f"{r['steps']['loaded']['VmRSS']:.0f}", *(f"{r['steps'][b]['VmRSS']:.0f}" for b in batches)]
        mark = " (over 1536)" if r["peak_rss_mib"] > TARGET_MIB else ""
        cells.append(f"**{r['peak_rss_mib']:.0f}**{mark}")
        cells += [f"{r['breakdown_mib'][p]:.0f}" for p in parts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def positive(text: str) -> int:
    """A positive integer (an argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Measure every bundle in its own process; print the table (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path, help="bundle folders")
    ap.add_argument("--images", type=Path, help="folder of test images (searched recursively)")
    ap.add_argument("--batch", type=positive, nargs="+", default=[1, 8], help="batch sizes, in this order")
    ap.add_argument("--threads", type=positive, default=2, help="the Predictor's thread budget")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", type=Path, nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(CHILD_TAG + json.dumps(child(args.child, args.paths, args.batch, args.threads)), flush=True)
        return 0
    if not args.bundles or args.images is None:
        ap.error("give one or more bundles and --images")
    paths = image_paths(args.images, max(args.batch))
    results = [run_child(b, paths, args.batch, args.threads) for b in args.bundles]
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"target_mib": TARGET_MIB, "results": results}, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
