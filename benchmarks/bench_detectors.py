"""PaDiM, PatchCore and STFPM side by side on MVTec AD bottle (900x900, the same 2x2 grid of 464).

For every entry (a detector family, or PatchCore with its reweighted image
score deployed) this reads its trained run (``runs/<entry>_bottle``) and
exported bundle (``bundles/<entry>_bottle``) and reports, in one table:

* quality from the run's last evaluation (``RUN/eval/metrics.json``, eager
  PyTorch, the bottle test set): image AUROC of the deployed image score,
  pixel AUROC, AUPRO, plus the other image score's AUROC where the detector
  has its own (PatchCore: the reweighted score, or the map's max when the
  reweighted score is the deployed one);
* train time (``run.json``: fit of the four locations + validation statistics;
  for ``patchcore_reweighted`` validation only: it reuses PatchCore's fitted
  locations and only re-validates, ``--resume`` with another
  ``postprocess.image_score``);
* bundle size on disk (manifest + ONNX files) and the Predictor's load time;
* runtime.Predictor latency on this CPU at batch 1 (ONNX Runtime, no torch):
  all bundles are loaded in this one process and called in turn on the same
  decoded images (entry A, B, C, A, B, C, ...), so every entry sees the same
  machine load. Ratios between the entries are the figures to quote.

Runs or bundles that are missing are created with ``--train`` (``tilead-train
--eval`` and ``tilead-export`` with ``configs/<family>_bottle.yaml``; 23 min
for all four on this project's 2-core AMD EPYC machine, 11 of them STFPM's);
without it the script names the commands and exits 1.

Usage:
    python benchmarks/bench_detectors.py [--entries padim patchcore patchcore_reweighted stfpm]
        [--images 10] [--repeats 2] [--train] [--json out/bench/detectors.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import DATA, read_images, summarize, test_images

from tilead.benchmarking.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ("image_auroc", "pixel_auroc", "aupro", "image_auroc_detector_score", "image_auroc_map_max")


@dataclass(frozen=True)
class Entry:
    """One row: a config, its overrides, and the run whose fitted locations it may reuse.

    Attributes:
        family: The detector family (names the config ``configs/<family>_bottle.yaml``).
        overrides: ``--set`` overrides of that config.
        reuses: Entry whose fitted run is copied and re-validated (``--resume``) instead of fitting anew.
    """

    family: str
    overrides: tuple[str, ...] = ()
    reuses: str | None = None


ENTRIES = {
    "padim": Entry("padim"),
    "patchcore": Entry("patchcore"),
    "patchcore_reweighted": Entry("patchcore", ("postprocess.image_score=detector",), reuses="patchcore"),
    "stfpm": Entry("stfpm"),
}


def paths_of(name: str) -> tuple[Path, Path, Path]:
    """``(config, run folder, bundle folder)`` of an entry on bottle."""
    return (
        ROOT / "configs" / f"{ENTRIES[name].family}_bottle.yaml",
        ROOT / "runs" / f"{name}_bottle",
        ROOT / "bundles" / f"{name}_bottle",
    )


def _bundle_matches(run: Path, bundle: Path) -> bool:
    manifest = bundle / "manifest.json"
    if not (manifest.is_file() and (run / "run.json").is_file()):
        return False
    fit_key = json.loads((run / "run.json").read_text())["fit_key"]
    image_score = json.loads((run / "eval" / "metrics.json").read_text()).get("image_score", "max")
    data = json.loads(manifest.read_text())
    return bool(
        data["source"].get("fit_key") == fit_key and data["postprocess"].get("image_score", "max") == image_score
    )


def _has_run(run: Path) -> bool:
    return (run / "stats.json").is_file() and (run / "eval" / "metrics.json").is_file()


def ensure(name: str, train: bool) -> None:
    """Train (with evaluation) and export when the run or its bundle is missing; or say how.

    Raises:
        SystemExit: When something is missing and ``train`` is False.
    """
    entry = ENTRIES[name]
    config, run, bundle = paths_of(name)
    bindir = Path(sys.executable).parent
    sets = [arg for o in entry.overrides for arg in ("--set", o)]
    train_cmd = [
        str(bindir / "tilead-train"),
        "--config",
        str(config),
        "--output",
        str(run),
        *sets,
        "--eval",
        "--quiet",
    ]
    export_cmd = [str(bindir / "tilead-export"), str(run), "-o", str(bundle), "--overwrite"]
    has_run = _has_run(run)
    if has_run and _bundle_matches(run, bundle):
        return
    if not train:
        missing = [" ".join(train_cmd)] if not has_run else []
        raise SystemExit(f"{name}: missing run or bundle; run with --train, or:\n  " + "\n  ".join(
            [*missing, " ".join(export_cmd)]))  # fmt: skip
    if not has_run:
        base = paths_of(entry.reuses)[1] if entry.reuses is not None else None
        if base is not None and _has_run(base):
            print(f"{name}: re-validating the fitted locations of {base.name} ...", flush=True)
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run, ignore=shutil.ignore_patterns("eval", "eval_*", "overlays"))
            train_cmd.insert(-2, "--resume")
        else:
            print(f"{name}: training {config.name} {' '.join(entry.overrides)} ...", flush=True)
        subprocess.run(train_cmd, check=True)
    print(f"{name}: exporting {run} ...", flush=True)
    subprocess.run(export_cmd, check=True)


def describe(name: str) -> dict[str, Any]:
    """Quality, train time and bundle size of an entry's run and bundle."""
    _, run, bundle = paths_of(name)
    info = json.loads((run / "run.json").read_text())
    report = json.loads((run / "eval" / "metrics.json").read_text())
    metrics = report["metrics"]
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
        "image_score": report.get("image_score", "max"),
        "refitted": ENTRIES[name].reuses is None,
    }


def latency(names: list[str], images: list[np.ndarray], repeats: int) -> dict[str, dict[str, Any]]:
    """Predictor load time and batch-1 latency per entry, calls interleaved across entries."""
    from tqdm import tqdm

    from tilead.runtime import Predictor

    predictors: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        predictors[name] = Predictor(paths_of(name)[2])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        predictors[name].warmup()
        out[name] = {"load_s": load_s, "first_call_s": time.perf_counter() - t0}
    times: dict[str, list[float]] = {n: [] for n in names}
    inference: dict[str, list[float]] = {n: [] for n in names}
    try:
        for _ in tqdm(range(repeats), desc="batch 1, entries in turn", unit="round"):
            for image in images:
                for name in names:
                    t0 = time.perf_counter()
                    _, stages = predictors[name].predict_timed(image)
                    times[name].append(time.perf_counter() - t0)
                    inference[name].append(stages.seconds.get("inference", 0.0))
    finally:
        for p in predictors.values():
            p.close()
    for name in names:
        out[name]["latency"] = summarize(times[name])
        out[name]["inference_share"] = float(np.sum(inference[name]) / np.sum(times[name]))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """The detector table of docs/benchmarks.md."""
    base = rows[next(iter(rows))]["latency"]["median_ms"]
    head = (
        f"{'entry':<20} {'score':>8} {'img AUROC':>9} {'(other)':>8} {'px AUROC':>8} {'AUPRO':>7} {'train s':>8} "
        f"{'bundle MiB':>10} {'load s':>6} {'median ms':>9} {'p90 ms':>7} {'x first':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        q = r["quality"]
        lat = r["latency"]
        other = q.get("image_auroc_detector_score", q.get("image_auroc_map_max"))
        train = f"{r['train_s']:.0f}" if r["refitted"] else f"+{r['train_s']:.0f}"
        print(
            f"{name:<20} {r['image_score']:>8} {q['image_auroc']:>9.4f} {_fmt(other, '.4f'):>8} "
            f"{q['pixel_auroc']:>8.4f} {q['aupro']:>7.4f} {train:>8} {r['bundle_mib']:>10.1f} "
            f"{r['load_s']:>6.2f} {lat['median_ms']:>9.1f} {lat['p90_ms']:>7.1f} {lat['median_ms'] / base:>7.2f}"
        )
    print("\n(other): the image score not deployed (PatchCore: reweighted score, or the map's max);")
    print("train s '+N': no fit, only re-validation of the run it reuses")


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", choices=list(ENTRIES), default=list(ENTRIES))
    parser.add_argument("--images", type=int, default=10, help="bottle test images, round-robin over defect types")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
    parser.add_argument("--train", action="store_true", help="train / export what is missing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    for name in args.entries:
        ensure(name, args.train)
    paths = test_images(args.images, DATA)
    images = read_images(paths)
    rows = {name: describe(name) for name in args.entries}
    for name, lat in latency(args.entries, images, args.repeats).items():
        rows[name].update(lat)
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
