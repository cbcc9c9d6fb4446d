"""Load test of the served Predictor (``tilead-serve``) beside direct Predictor calls, in one run.

A bounded client on localhost: for each concurrency level (default 1, 4, 16) a
fixed number of requests (PNG bodies of real images, read from disk once) is
sent by that many client threads (``http.client``, one connection per thread)
to a Ray Serve deployment started by this script on 127.0.0.1 (a local Ray
cluster; everything is shut down at the end). Reported per level: throughput
(images/s), p50 / p99 latency, errors, and the mean batch size the server
formed.

In the same run, on the same images already decoded in memory, direct
``runtime.Predictor.predict`` calls: one image per call, and batches of
``--max-batch`` images (the reference of issue #22's target: at concurrency 16,
served throughput >= 0.9x direct batched throughput, with no errors). The
direct Predictor gets the same threads as all replicas together. The server is
idle (started, warmed) while the direct calls run, so both see the same machine.

Usage:
    python benchmarks/bench_serve.py [--bundle bundles/padim_bottle] [--images DIR]
        [--requests 48] [--concurrency 1 4 16] [--replicas 1] [--max-batch 8] [--batch-wait-ms 10]
        [--threads N] [--json out/bench/serve.json]

Images default to the MVTec AD bottle test images (``../shared/data/mvtec_bottle/test``), cycled.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_bottle" / "test"
TARGET_RATIO = 0.9


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_files(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    files = [p for p in files if "ground_truth" not in p.parts and not p.stem.endswith("_mask")]
    if not files:
        raise SystemExit(f"no images under {folder}")
    return [files[i % len(files)] for i in range(count)]


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, q)) if latencies else float("nan")


def load_level(port: int, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once with ``concurrency`` client threads; statistics of the level."""
    queue = list(enumerate(bodies))
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []

    def client(items: list[tuple[int, bytes]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            for _, body in items:
                start = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
                    response = conn.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as err:
                    errors.append(f"{type(err).__name__}: {err}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                    continue
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {payload[:200]!r}")
                    continue
                latencies.append(elapsed)
                batch_sizes.append(int(json.loads(payload)["batch_size"]))
        finally:
            conn.close()

    shards = [queue[i::concurrency] for i in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, shards))
    wall = time.perf_counter() - start
    return {
        "mode": "served",
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 3),
        "throughput": round(len(latencies) / wall, 3),
        "p50_ms": round(percentile_ms(latencies, 50), 1),
        "p99_ms": round(percentile_ms(latencies, 99), 1),
        "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else float("nan"),
    }


def direct(bundle: Path, images: list[np.ndarray], batch: int, threads: int) -> dict[str, Any]:
    """Direct ``Predictor.predict`` calls of ``batch`` images each, over all images."""
    from tilead.runtime import Predictor

    latencies: list[float] = []
    with Predictor(bundle, threads=threads, max_batch=batch) as predictor:
        predictor.warmup()
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            t = time.perf_counter()
            predictor.predict(images[i : i + batch])
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    return {
        "mode": f"direct batch {batch}",
        "concurrency": None,
        "requests": len(images),
        "errors": 0,
        "seconds": round(wall, 3),
        "throughput": round(len(images) / wall, 3),
        "p50_ms": round(percentile_ms(latencies, 50), 1),  # per call (``batch`` images)
        "p99_ms": round(percentile_ms(latencies, 99), 1),
        "mean_batch": float(batch),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "padim_bottle")
    parser.add_argument("--images", type=Path, default=DATA, help="folder of images (searched recursively)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="threads per replica [cores // replicas]")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import cv2

    from tilead.runtime.bundle import read_manifest
    from tilead.serve.app import ServeOptions, serving

    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"{args.bundle}: no bundle (make bundles/padim_bottle/manifest.json, or pass --bundle)")
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // args.replicas)
    manifest = read_manifest(args.bundle)
    channels = manifest.preprocessing.channels
    h, w = manifest.grid.image_size
    files = image_files(args.images, args.requests)
    bodies = [p.read_bytes() for p in files]
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    images: list[np.ndarray] = []
    for path, body in zip(files, bodies, strict=True):
        image = cv2.imdecode(np.frombuffer(body, np.uint8), flag)
        if image is None or image.shape[:2] != (h, w):
            raise SystemExit(f"{path}: does not decode at the bundle's size {h}x{w}")
        images.append(image[:, :, None] if image.ndim == 2 else image)

    options = ServeOptions(
        str(args.bundle.resolve()),
        replicas=args.replicas,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        threads=threads,
    )
    port = free_port()
    rows: list[dict[str, Any]] = []
    with serving(options, port=port, num_cpus=max(cores, threads * args.replicas)):
        load_level(port, bodies[: min(4, len(bodies))], 1)  # warm the proxy and the replica's route
        rows.append(direct(args.bundle, images, 1, threads * args.replicas))
        rows.append(direct(args.bundle, images, args.max_batch, threads * args.replicas))
        for c in args.concurrency:
            rows.append(load_level(port, bodies, c))

    reference = rows[1]["throughput"]
    print(f"bundle {args.bundle}  images {h}x{w}  {len(bodies)} requests per level  cores {cores}")
    print(f"server: {args.replicas} replica(s) x {threads} thread(s), max batch {args.max_batch}, "
          f"wait {args.batch_wait_ms:g} ms")  # fmt: skip
    columns: tuple[tuple[str, str], ...] = (
        ("mode", "<18"),
        ("conc", ">5"),
        ("req", ">6"),
        ("err", ">5"),
        ("img/s", ">9"),
        ("p50 ms", ">9"),
    )
    columns += (("p99 ms", ">9"), ("batch", ">7"), ("ratio", ">7"))
    print("".join(f"{name:{fmt}}" for name, fmt in columns))
    for r in rows:
        ratio = r["throughput"] / reference if reference else float("nan")
        r["ratio_vs_direct_batched"] = round(ratio, 3)
        conc = "-" if r["concurrency"] is None else str(r["concurrency"])
        print(
            f"{r['mode']:<18}{conc:>5}{r['requests']:>6}{r['errors']:>5}{r['throughput']:>9.2f}"
            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['mean_batch']:>7.2f}{ratio:>7.2f}"
        )
    print("(direct rows: p50/p99 per Predictor call; served rows: per request, HTTP round trip)")
    top = max(args.concurrency)
    served = next(r for r in rows if r["mode"] == "served" and r["concurrency"] == top)
    passed = served["errors"] == 0 and served["ratio_vs_direct_batched"] >= TARGET_RATIO
    print(
        f"target (#22): concurrency {top} >= {TARGET_RATIO}x direct batched, no errors: "
        f"{served['ratio_vs_direct_batched']:.2f}x, {served['errors']} errors -> {'PASS' if passed else 'FAIL'}"
    )
    best = max(rows[0]["throughput"], rows[1]["throughput"])
    vs_best = served["throughput"] / best if best else float("nan")
    print(f"concurrency {top} vs the faster direct mode (batch 1 or {args.max_batch}): {vs_best:.2f}x")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "bundle": str(args.bundle),
            "image_size": [h, w],
            "cores": cores,
            "replicas": args.replicas,
            "threads_per_replica": threads,
            "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms,
            "rows": rows,
            "target": {"concurrency": top, "ratio": TARGET_RATIO, "passed": passed},
            "ratio_vs_best_direct": round(vs_best, 3),
        }
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)
        print(f"json: {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
