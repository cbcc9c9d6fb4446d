"""runtime.Predictor (ONNX Runtime, no torch) against the trainer's eager PyTorch ensemble, on bottle images.

One run, side by side, on real 900x900 MVTec AD bottle test images already
decoded in memory (decoding is excluded from both):

* **eager**: the trainer's inference of the ensemble (:class:`EagerEnsemble`:
  runtime tile kernel, each location's PyTorch model in turn, runtime
  post-processing), as evaluation runs it;
* **predictor**: ``runtime.Predictor.predict`` on the exported bundle.

Calls alternate (eager, predictor, eager, ...) so both see the same machine
load. Latency is per image at batch 1 (median over images x repeats); larger
batches are reported as time per image. The Predictor's per-stage times come
from ``Predictor.predict_timed``: the share outside model inference is
``1 - inference / end-to-end``. Load time and peak RSS come from a separate
child process that only imports ``tilead.runtime`` (importing torch raises
there), loads the bundle and predicts the same images: its ``ru_maxrss``.

The run folder and bundle are created when missing (``tilead-train`` with
``configs/padim_bottle.yaml``, ~5 min; ``tilead-export``, ~1 min).

Usage:
    python benchmarks/bench_predictor.py [--run runs/padim_bottle] [--bundle bundles/padim_bottle]
        [--images 10] [--repeats 3] [--batch 1 4 8] [--json out/bench/predictor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilead.benchmarking.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_bottle"
CONFIG = ROOT / "configs" / "padim_bottle.yaml"
# anomalib 2.7 tiled ensemble (PaDiM resnet18, 896x896, 2x2 tiles of 448) measured on this machine class (issue #4).
ANCHOR_MS = {"tile + forward + merge + smoothing": 765.0, "full evaluation pipeline": 1419.0}
BARS = {"speedup_vs_eager": 5.0, "outside_inference_share": 0.05, "speedup_vs_anchor": 5.0, "peak_rss_mib": 2048.0}
STAGES = ("input", "tile", "inference", "untile", "seam", "crop", "normalize")


def test_images(count: int, data: Path) -> list[Path]:
    """The first ``count`` test images of an MVTec-layout category (bottle), round-robin over the defect folders."""
    folders = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    lists = [sorted(f.glob("*.png")) for f in folders]
    out: list[Path] = []
    while len(out) < count and any(lists):
        for files in lists:
            if files and len(out) < count:
                out.append(files.pop(0))
    if not out:
        raise SystemExit(f"no test images under {data / 'test'}")
    return out


def read_images(paths: list[Path]) -> list[np.ndarray]:
    """Decode BGR uint8 images."""
    import cv2

    images = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read {p}")
        images.append(image)
    return images


def ensure_run_and_bundle(run: Path, bundle: Path) -> None:
    """Train and export when the run or a bundle of that run is missing."""
    bindir = Path(sys.executable).parent
    if not (run / "stats.json").is_file():
        print(f"{run} has no finished run: training configs/padim_bottle.yaml (~5 min) ...", flush=True)
        subprocess.run(
            [str(bindir / "tilead-train"), "--config", str(CONFIG), "--output", str(run), "--quiet"], check=True
        )
    fit_key = json.loads((run / "run.json").read_text())["fit_key"]
    manifest = bundle / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["source"].get("fit_key") != fit_key:
        print(f"exporting {run} to {bundle} ...", flush=True)
        subprocess.run([str(bindir / "tilead-export"), str(run), "-o", str(bundle), "--overwrite"], check=True)


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, mean, min, p90 in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "p90_ms": float(np.percentile(ms, 90)),
    }


# -- the Predictor-only child -------------------------------------------------------------------------


class _BlockTorch:
    """Import hook: any import of torch fails (proves the runtime runs without it)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in the Predictor-only benchmark process")


def child(bundle: Path, paths: list[Path], repeats: int) -> None:
    """Predictor-only process: load time, latency, peak RSS; JSON on stdout."""
    sys.meta_path.insert(0, _BlockTorch())
    t0 = time.perf_counter()
    from tilead.runtime import Predictor

    import_s = time.perf_counter() - t0
    images = read_images(paths)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    predictor = Predictor(bundle)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor.warmup()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        for image in images:
            t0 = time.perf_counter()
            predictor.predict(image)
            times.append(time.perf_counter() - t0)
    predictor.close()
    out = {
        "import_s": import_s,
        "load_s": load_s,
        "first_call_s": warmup_s,
        "latency": summarize(times),
        "rss_before_load_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch_imported": "torch" in sys.modules,
    }
    print("CHILD-JSON " + json.dumps(out))


def run_child(bundle: Path, paths: list[Path], repeats: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and parse its report."""
    cmd = [sys.executable, __file__, "--child", "--bundle", str(bundle), "--repeats", str(repeats), "--paths"]
    proc = subprocess.run(cmd + [str(p) for p in paths], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Predictor-only child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CHILD-JSON "))
    result: dict[str, Any] = json.loads(line[len("CHILD-JSON ") :])
    return result


# -- side by side --------------------------------------------------------------------------------------


def side_by_side(run: Path, bundle: Path, paths: list[Path], repeats: int, batches: list[int]) -> dict[str, Any]:
    """Eager vs Predictor in one process, alternating calls."""
    from tilead.runtime import Predictor
    from tilead.runtime.timing import StageTimes
    from tilead.trainer.eager import load_eager_ensemble

    images = read_images(paths)
    eager = load_eager_ensemble(run)
    predictor = Predictor(bundle)
    predictor.warmup()
    eager.predict(images[0][None])
    lat: dict[str, list[float]] = {"eager": [], "predictor": []}
    stages = {"eager": StageTimes(), "predictor": StageTimes()}
    parity_max, labels_equal = 0.0, True
    from tqdm import tqdm

    for _ in tqdm(range(repeats), desc="batch 1, alternating", unit="round"):
        for image in images:
            timer = StageTimes()
            t0 = time.perf_counter()
            _, ref = eager.predict(image[None], timer)
            lat["eager"].append(time.perf_counter() - t0)
            for k, v in timer.seconds.items():
                stages["eager"].add(k, v)
            t0 = time.perf_counter()
            results, timer = predictor.predict_timed(image)
            lat["predictor"].append(time.perf_counter() - t0)
            for k, v in timer.seconds.items():
                stages["predictor"].add(k, v)
            parity_max = max(parity_max, float(np.abs(results[0].anomaly_map - ref.maps[0]).max()))
            labels_equal &= bool(results[0].label == bool(ref.labels[0]))
    calls = len(lat["predictor"])
    batch_rows = []
    for b in batches:
        if b == 1:
            continue
        stack = np.stack([images[i % len(images)] for i in range(b)])
        per: dict[str, list[float]] = {"eager": [], "predictor": []}
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            eager.predict(stack)
            per["eager"].append((time.perf_counter() - t0) / b)
            t0 = time.perf_counter()
            predictor.predict(stack)
            per["predictor"].append((time.perf_counter() - t0) / b)
        batch_rows.append(
            {
                "batch": b,
                "eager_ms_per_image": float(np.median(per["eager"]) * 1e3),
                "predictor_ms_per_image": float(np.median(per["predictor"]) * 1e3),
            }
        )
    info = {
        "grid": predictor.manifest.grid.to_dict(),
        "backbone": predictor.manifest.model.get("backbone"),
        "family": predictor.manifest.model.get("family"),
        "output_stride": predictor.manifest.model.get("output_stride"),
        "location_workers": predictor.location_workers,
        "threads": predictor.threads,
    }
    predictor.close()
    return {
        "calls": calls,
        "eager": summarize(lat["eager"]),
        "predictor": summarize(lat["predictor"]),
        "eager_stages_ms": {k: v * 1e3 / calls for k, v in stages["eager"].seconds.items()},
        "predictor_stages_ms": {k: v * 1e3 / calls for k, v in stages["predictor"].seconds.items()},
        "batches": batch_rows,
        "parity_max_abs_normalized": parity_max,
        "labels_identical": labels_equal,
        "model": info,
    }


def print_report(res: dict[str, Any], child_res: dict[str, Any]) -> dict[str, bool]:
    """Print the tables; return the bar checks."""
    m = res["model"]
    g = m["grid"]
    print(
        f"\nmodel: {m['family']} / {m['backbone']}, grid {g['image_size'][0]}x{g['image_size'][1]} in tiles of "
        f"{g['tile_size'][0]} (stride {g['stride'][0]}), maps at stride {m['output_stride']}; Predictor: "
        f"{m['location_workers']} location workers x {max(1, m['threads'] // m['location_workers'])} thread(s)"
    )
    e, p = res["eager"], res["predictor"]
    speedup = e["median_ms"] / p["median_ms"]
    print(f"\nlatency per 900x900 image, batch 1 ({res['calls']} calls each, alternating)")
    print(f"{'path':<32}{'median ms':>10}{'mean ms':>10}{'min ms':>10}{'p90 ms':>10}")
    for name, row in (("trainer eager PyTorch", e), ("runtime.Predictor (ORT)", p)):
        print(f"{name:<32}{row['median_ms']:>10.1f}{row['mean_ms']:>10.1f}{row['min_ms']:>10.1f}{row['p90_ms']:>10.1f}")
    print(f"{'speedup (median eager / median Predictor)':<52}{speedup:>10.2f}x")
    stages = res["predictor_stages_ms"]
    total = p["mean_ms"]
    print("\nPredictor stages, mean ms per image (share of mean end-to-end)")
    for name in STAGES:
        if name in stages:
            print(f"  {name:<12}{stages[name]:>8.2f}  {stages[name] / total:>6.1%}")
    outside = 1.0 - stages["inference"] / total
    print(f"  {'outside inference':<20}{total - stages['inference']:>8.2f}  {outside:>6.1%}  (end-to-end {total:.1f})")
    locs = {k: v for k, v in stages.items() if k.startswith("location:")}
    print("  per location (session run, overlapping): " + ", ".join(f"{k[9:]} {v:.1f}" for k, v in locs.items()))
    es = res["eager_stages_ms"]
    print(
        "eager stages, mean ms per image: "
        + ", ".join(f"{k} {es[k]:.1f}" for k in STAGES if k in es)
        + f" (end-to-end {e['mean_ms']:.1f})"
    )
    if res["batches"]:
        print("\nlarger batches, median ms per image")
        print(f"{'batch':>6}{'eager':>10}{'Predictor':>12}{'ratio':>8}")
        for row in res["batches"]:
            r = row["eager_ms_per_image"] / row["predictor_ms_per_image"]
            print(
                f"{row['batch']:>6}{row['eager_ms_per_image']:>10.1f}{row['predictor_ms_per_image']:>12.1f}{r:>7.2f}x"
            )
    print(
        f"\nparity: max |normalized map difference| {res['parity_max_abs_normalized']:.2e}, "
        f"labels identical: {res['labels_identical']}"
    )
    c = child_res
    print(
        f"\nPredictor-only process (torch import blocked; torch imported: {c['torch_imported']}): import "
        f"{c['import_s']:.2f} s, bundle load {c['load_s']:.2f} s (hash checks + sessions), first call "
        f"{c['first_call_s']:.2f} s, median latency {c['latency']['median_ms']:.1f} ms, peak RSS "
        f"{c['peak_rss_mib']:.0f} MiB ({c['rss_before_load_mib']:.0f} MiB before loading)"
    )
    print("\nanchor: anomalib 2.7 tiled ensemble (PaDiM resnet18, 896x896, 2x2 tiles of 448), measured in issue #4")
    for name, ms in ANCHOR_MS.items():
        print(f"  {name:<38}{ms:>8.0f} ms  -> Predictor {ms / p['median_ms']:.1f}x faster")
    anchor_speedup = ANCHOR_MS["tile + forward + merge + smoothing"] / p["median_ms"]
    return {
        f"speedup vs eager >= {BARS['speedup_vs_eager']:.0f}x ({speedup:.2f}x)": speedup >= BARS["speedup_vs_eager"],
        f"outside inference <= {BARS['outside_inference_share']:.0%} ({outside:.1%})": outside
        <= BARS["outside_inference_share"],
        f"speedup vs anomalib 765 ms >= {BARS['speedup_vs_anchor']:.0f}x ({anchor_speedup:.2f}x)": anchor_speedup
        >= BARS["speedup_vs_anchor"],
        f"Predictor-only peak RSS <= {BARS['peak_rss_mib']:.0f} MiB ({c['peak_rss_mib']:.0f})": c["peak_rss_mib"]
        <= BARS["peak_rss_mib"],
        "labels identical, maps within 1e-4": res["labels_identical"] and res["parity_max_abs_normalized"] <= 1e-4,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "padim_bottle")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "padim_bottle")
    parser.add_argument("--images", type=int, default=10, help="bottle test images (round-robin over folders)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (1 is always run)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.bundle, args.paths, args.repeats)
        return 0
    if not DATA.is_dir():
        raise SystemExit(f"the bottle data is missing: expected {DATA}")
    ensure_run_and_bundle(args.run, args.bundle)
    paths = test_images(args.images, DATA)
    print(f"{len(paths)} bottle test images x {args.repeats} repeats; Predictor-only child first ...", flush=True)
    child_res = run_child(args.bundle, paths, args.repeats)
    res = side_by_side(args.run, args.bundle, paths, args.repeats, args.batch)
    checks = print_report(res, child_res)
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json is not None:
        import onnxruntime

        args.json.parent.mkdir(parents=True, exist_ok=True)
        env = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": sys.version,
            "onnxruntime": onnxruntime.__version__,
        }
        doc = {"side_by_side": res, "predictor_only": child_res, "anchor_ms": ANCHOR_MS, "checks": checks, "env": env}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
