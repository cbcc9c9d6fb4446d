"""Train + evaluate on MVTec AD bottle: the tiled ensemble and the monolithic baseline, side by side.

Each configuration runs ``tilead-train --eval`` from scratch in its own
process (so wall time and peak RSS are that process's alone: peak RSS comes
from ``os.wait4``'s resource usage of the child), then the table gives the
metrics from ``eval/metrics.json`` and the fitted state size from
``run.json``.

Usage:
    python benchmarks/bench_train_bottle.py [--json out/bench/train_bottle.json]
        [--configs configs/padim_bottle.yaml configs/padim_bottle_monolithic.yaml]
        [--runs-dir out/bench/runs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [ROOT / "configs" / "padim_bottle.yaml", ROOT / "configs" / "padim_bottle_monolithic.yaml"]
BARS = {"image_auroc": 0.98, "pixel_auroc": 0.98, "aupro": 0.93}
LIMIT_S = 600.0
LIMIT_MIB = 6 * 1024.0


def run_one(config: Path, out: Path) -> dict[str, Any]:
    """Train + eval one config in a child process; wall time and that child's peak RSS."""
    if out.exists():
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("tilead-train")
    cmd = [str(exe), "--config", str(config), "--output", str(out), "--eval", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout is not None else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}:\n{output}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    grid = run["grid"]
    return {
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "grid": f"{run['grid_shape'][0]}x{run['grid_shape'][1]} of {grid['tile_size'][0]} "
        f"(stride {grid['stride'][0]}) over {grid['image_size'][0]}",
        "evaluated_at": metrics["evaluated_at"],
        "map": f"{run['model']['map_size'][0]}x{run['model']['map_size'][1]} @ stride {run['model']['output_stride']}",
        "state_mib_per_location": run["model"]["state_bytes_per_location"] / 2**20,
        "locations": len(run["locations"]),
        **metrics["metrics"],
        "train_s": run["timings"]["train_s"],
        "eval_s": metrics["timings"]["eval_s"],
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the comparison table."""
    cols = [
        ("config", "config", "{}"),
        ("grid", "grid", "{}"),
        ("image_auroc", "img AUROC", "{:.4f}"),
        ("pixel_auroc", "px AUROC", "{:.4f}"),
        ("aupro", "AUPRO", "{:.4f}"),
        ("image_f1", "img F1", "{:.4f}"),
        ("pixel_f1", "px F1", "{:.4f}"),
        ("state_mib_per_location", "MiB/loc", "{:.1f}"),
        ("wall_s", "train+eval s", "{:.0f}"),
        ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ]
    cells = [[fmt.format(r[key]) for key, _, fmt in cols] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(cols)]
    print("  ".join(title.ljust(w) for (_, title, _), w in zip(cols, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "out" / "bench" / "runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        print(f"running {config} ...", flush=True)
        rows.append(run_one(config.resolve(), args.runs_dir / config.stem))
    print()
    print_table(rows)
    first = rows[0]
    checks = {
        **{f"{k} >= {v}": first[k] >= v for k, v in BARS.items()},
        f"train+eval <= {LIMIT_S:.0f} s": first["wall_s"] <= LIMIT_S,
        f"peak RSS <= {LIMIT_MIB:.0f} MiB": first["peak_rss_mib"] <= LIMIT_MIB,
    }
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {rows[0]['config']}: {name}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version}
        args.json.write_text(json.dumps({"rows": rows, "checks": checks, "environment": env}, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
