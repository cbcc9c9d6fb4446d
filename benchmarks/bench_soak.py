"""Bounded soak of ``runtime.Predictor``: RSS slope per 1000 predictions (issue #16).

Loads a bundle once, runs ``--predictions`` single-image predictions on a few
fixed random images (the bundle's size), samples the process RSS every
``--every`` predictions, and fits a least-squares line to the samples taken
after ``--warmup`` predictions. A leak shows as a slope that does not vanish;
first-call allocations are what the warm-up excludes. It also checks that
every result equals the first pass's result for the same image (a drift
would mean state leaking between calls).

    python benchmarks/bench_soak.py BUNDLE [--predictions 1000] [--every 25] [--warmup 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    """Resident set size of this process (``/proc/self/status``), MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def slope_per_1000(counts: list[int], rss: list[float]) -> float:
    """Least-squares slope of RSS (MiB) against prediction count, per 1000 predictions."""
    if len(counts) < 2:
        raise ValueError("need at least two samples after the warm-up for a slope")
    fit = np.polyfit(np.asarray(counts, dtype=np.float64), np.asarray(rss, dtype=np.float64), 1)
    return float(fit[0] * 1000.0)


def main() -> None:
    """Run the soak and print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--predictions", type=int, default=1000)
    parser.add_argument("--every", type=int, default=25, help="Sample the RSS every N predictions.")
    parser.add_argument("--warmup", type=int, default=100, help="Predictions before the fit starts.")
    parser.add_argument("--images", type=int, default=4, help="Distinct random images cycled through.")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.predictions <= args.warmup + 2 * args.every:
        parser.error("--predictions must exceed --warmup by at least two sampling intervals")

    from tilead.runtime import Predictor

    rng = np.random.default_rng(0)
    with Predictor(args.bundle, backend=args.backend) as predictor:
        h, w = predictor.image_size
        images = [rng.integers(0, 256, (h, w, predictor.channels), dtype=np.uint8) for _ in range(args.images)]
        first: dict[int, tuple[float, int]] = {}
        counts: list[int] = []
        samples: list[float] = []
        drift = 0
        start = time.perf_counter()
        start_rss = rss_mib()
        for i in range(args.predictions):
            k = i % len(images)
            result = predictor.predict(images[k])
            assert not isinstance(result, list)
            key = (result.raw_score, int(np.count_nonzero(result.mask)))
            if k not in first:
                first[k] = key
            elif key != first[k]:
                drift += 1
            if (i + 1) % args.every == 0 and i + 1 >= args.warmup:
                counts.append(i + 1)
                samples.append(rss_mib())
        seconds = time.perf_counter() - start
    report = {
        "bundle": str(args.bundle),
        "backend": args.backend,
        "predictions": args.predictions,
        "warmup": args.warmup,
        "rss_start_mib": round(start_rss, 1),
        "rss_after_warmup_mib": round(samples[0], 1),
        "rss_end_mib": round(samples[-1], 1),
        "rss_slope_mib_per_1000": round(slope_per_1000(counts, samples), 3),
        "results_differing_from_first_pass": drift,
        "seconds": round(seconds, 1),
    }
    width = max(map(len, report))
    for name, value in report.items():
        print(f"{name:<{width}}  {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
