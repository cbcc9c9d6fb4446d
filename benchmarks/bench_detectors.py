"""PaDiM, PatchCore and STFPM side by side on MVTec AD bottle (900x900, the same 2x2 grid of 464).

For every detector family this reads its trained run (``runs/<family>_bottle``)
and exported bundle (``bundles/<family>_bottle``) and reports, in one table:

* quality from the run's last evaluation (``RUN/eval/metrics.json``, eager
  PyTorch, the bottle test set): image AUROC, pixel AUROC, AUPRO, plus
  PatchCore's image AUROC with its own reweighted image score where present;
* train time (``run.json``: fit of the four locations + validation statistics);
* bundle size on disk (manifest + ONNX files) and the Predictor's load time;
* runtime.Predictor latency on this CPU at batch 1 (ONNX Runtime, no torch):
  all bundles are loaded in this one process and called in turn on the same
  decoded images (family A, B, C, A, B, C, ...), so every family sees the same
  machine load. Ratios between the families are the figures to quote.

Runs or bundles that are missing are created with ``--train`` (``tilead-train
--eval`` and ``tilead-export`` with ``configs/<family>_bottle.yaml``; about
8 min for PaDiM, 12 for PatchCore and 25 for STFPM on a 2-core CPU); without it
the script names the commands and exits 1.

Usage:
    python benchmarks/bench_detectors.py [--families padim patchcore stfpm] [--images 10] [--repeats 2]
        [--train] [--json out/bench/detectors.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import read_images, summarize, test_images

from tilead.benchmarking.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("padim", "patchcore", "stfpm")
QUALITY = ("image_auroc", "pixel_auroc", "aupro", "image_auroc_detector_score")


def paths_of(family: str) -> tuple[Path, Path, Path]:
    """``(config, run folder, bundle folder)`` of a family on bottle."""
    return (
        ROOT / "configs" / f"{family}_bottle.yaml",
        ROOT / "runs" / f"{family}_bottle",
        ROOT / "bundles" / f"{family}_bottle",
    )


def _bundle_matches(run: Path, bundle: Path) -> bool:
    manifest = bundle / "manifest.json"
    if not (manifest.is_file() and (run / "run.json").is_file()):
        return False
    fit_key = json.loads((run / "run.json").read_text())["fit_key"]
    return bool(json.loads(manifest.read_text())["source"].get("fit_key") == fit_key)


def ensure(family: str, train: bool) -> None:
    """Train (with evaluation) and export when the run or its bundle is missing; or say how.

    Raises:
        SystemExit: When something is missing and ``train`` is False.
    """
    config, run, bundle = paths_of(family)
    bindir = Path(sys.executable).parent
    train_cmd = [str(bindir / "tilead-train"), "--config", str(config), "--output", str(run), "--eval", "--quiet"]
    export_cmd = [str(bindir / "tilead-export"), str(run), "-o", str(bundle), "--overwrite"]
    has_run = (run / "stats.json").is_file() and (run / "eval" / "metrics.json").is_file()
    if has_run and _bundle_matches(run, bundle):
        return
    if not train:
        missing = [" ".join(train_cmd)] if not has_run else []
        raise SystemExit(f"{family}: missing run or bundle; run with --train, or:\n  " + "\n  ".join(
            [*missing, " ".join(export_cmd)]))  # fmt: skip
    if not has_run:
        print(f"{family}: training {config.name} ...", flush=True)
        subprocess.run(train_cmd, check=True)
    print(f"{family}: exporting {run} ...", flush=True)
    subprocess.run(export_cmd, check=True)


def describe(family: str) -> dict[str, Any]:
    """Quality, train time and bundle size of a family's run and bundle."""
    _, run, bundle = paths_of(family)
    info = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    files = [p for p in bundle.rglob("*") if p.is_file() and "engines" not in p.relative_to(bundle).parts]
    return {
        "run": str(run.relative_to(ROOT)),
        "bundle": str(bundle.relative_to(ROOT)),
        "quality": {k: metrics[k] for k in QUALITY if k in metrics},
        "train_s": info["timings"]["train_s"],
        "fit_s": info["timings"]["fit_s"],
        "peak_rss_mib_train": info.get("peak_rss_mib_train"),
        "bundle_mib": sum(p.stat().st_size for p in files) / 2**20,
        "fit_key": info["fit_key"],
    }


def latency(families: list[str], images: list[np.ndarray], repeats: int) -> dict[str, dict[str, Any]]:
    """Predictor load time and batch-1 latency per family, calls interleaved across families."""
    from tqdm import tqdm

    from tilead.runtime import Predictor

    predictors: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for family in families:
        t0 = time.perf_counter()
        predictors[family] = Predictor(paths_of(family)[2])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        predictors[family].warmup()
        out[family] = {"load_s": load_s, "first_call_s": time.perf_counter() - t0}
    times: dict[str, list[float]] = {f: [] for f in families}
    inference: dict[str, list[float]] = {f: [] for f in families}
    try:
        for _ in tqdm(range(repeats), desc="batch 1, families in turn", unit="round"):
            for image in images:
                for family in families:
                    t0 = time.perf_counter()
                    _, stages = predictors[family].predict_timed(image)
                    times[family].append(time.perf_counter() - t0)
                    inference[family].append(stages.seconds.get("inference", 0.0))
    finally:
        for p in predictors.values():
            p.close()
    for family in families:
        out[family]["latency"] = summarize(times[family])
        out[family]["inference_share"] = float(np.sum(inference[family]) / np.sum(times[family]))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """The README's table."""
    base = rows[next(iter(rows))]["latency"]["median_ms"]
    head = (
        f"{'detector':<10} {'img AUROC':>9} {'(own score)':>11} {'px AUROC':>8} {'AUPRO':>7} {'train s':>8} "
        f"{'bundle MiB':>10} {'load s':>6} {'median ms':>9} {'p90 ms':>7} {'x first':>7}"
    )
    print(head)
    print("-" * len(head))
    for family, r in rows.items():
        q = r["quality"]
        lat = r["latency"]
        print(
            f"{family:<10} {q['image_auroc']:>9.4f} {_fmt(q.get('image_auroc_detector_score'), '.4f'):>11} "
            f"{q['pixel_auroc']:>8.4f} {q['aupro']:>7.4f} {r['train_s']:>8.0f} {r['bundle_mib']:>10.1f} "
            f"{r['load_s']:>6.2f} {lat['median_ms']:>9.1f} {lat['p90_ms']:>7.1f} {lat['median_ms'] / base:>7.2f}"
        )


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--images", type=int, default=10, help="bottle test images, round-robin over defect types")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
    parser.add_argument("--train", action="store_true", help="train / export what is missing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    for family in args.families:
        ensure(family, args.train)
    paths = test_images(args.images)
    images = read_images(paths)
    rows = {f: describe(f) for f in args.families}
    for family, lat in latency(args.families, images, args.repeats).items():
        rows[family].update(lat)
    print(f"\nMVTec AD bottle, 900x900, 2x2 tiles of 464; {len(images)} test images x {args.repeats}; {cpu_model()}")
    print("quality: eager evaluation of each run (RUN/eval/metrics.json); latency: runtime.Predictor, batch 1\n")
    print_table(rows)
    if args.json is not None:
        from tilead.atomic import atomic_write_json

        report = {"images": [str(p) for p in paths], "repeats": args.repeats, "cpu": cpu_model(), "rows": rows}
        atomic_write_json(args.json, report)
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
