"""tilead-calibrate on MVTec-layout data: false alarms and misses on held-out images, before and after.

Calibration images: test/good files with an index below ``--good-count`` and
the even-numbered defective test images (with their masks); evaluation: the
other good and the odd-numbered defective images. Each mode calibrates its own
copy of the bundle (the bundle given is never written)::

    python benchmarks/bench_calibrate.py BUNDLE --data ../shared/data/mvtec_bottle [--json out/bench/calibrate.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tilead.calibrate import Sample, calibrate
from tilead.runtime import Predictor


def _load(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path}")
    return np.asarray(image)


def _mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read {path}")
    out: np.ndarray = np.asarray(mask) > 0
    return out


def _split(data: Path, good_count: int, limit: int | None) -> dict[str, list[tuple[Path, Path | None]]]:
    out: dict[str, list[tuple[Path, Path | None]]] = {"cal_good": [], "eval_good": [], "cal_def": [], "eval_def": []}
    for path in sorted((data / "test" / "good").glob("*.png")):
        out["cal_good" if int(path.stem) < good_count else "eval_good"].append((path, None))
    for kind in sorted(p.name for p in (data / "test").iterdir() if p.is_dir() and p.name != "good"):
        for path in sorted((data / "test" / kind).glob("*.png")):
            mask = data / "ground_truth" / kind / f"{path.stem}_mask.png"
            out["cal_def" if int(path.stem) % 2 == 0 else "eval_def"].append((path, mask))
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out


def _rates(bundle: Path, good: list[tuple[Path, Path | None]], bad: list[tuple[Path, Path | None]]) -> dict[str, Any]:
    with Predictor(bundle, threads=1) as predictor:
        g = [bool(predictor.predict(_load(p)).label) for p, _ in good]  # type: ignore[union-attr]
        b = [bool(predictor.predict(_load(p)).label) for p, _ in bad]  # type: ignore[union-attr]
        stats = predictor.manifest.stats
    return {
        "image_threshold": stats.image_threshold,
        "pixel_threshold": stats.pixel_threshold,
        "false_alarms": f"{sum(g)}/{len(g)}",
        "false_alarm_rate": sum(g) / len(g),
        "misses": f"{b.count(False)}/{len(b)}",
        "miss_rate": b.count(False) / len(b),
    }


def main() -> None:
    """Run the modes and print (and optionally write) the table as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="MVTec AD category folder (test/, ground_truth/)")
    ap.add_argument("--good-count", type=int, default=10, help="test/good images used for calibration")
    ap.add_argument("--target-false-alarm", type=float, default=0.0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per split (smoke runs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    split = _split(args.data, args.good_count, args.limit)
    good = [Sample(str(p), _load(p)) for p, _ in split["cal_good"]]
    defects = [Sample(str(p), _load(p), _mask(m)) for p, m in split["cal_def"] if m is not None]
    rows: dict[str, Any] = {"exported": _rates(args.bundle, split["eval_good"], split["eval_def"])}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, source in (("good_only", None), ("good_and_defects", defects)):
            copy = Path(tmp) / mode
            shutil.copytree(args.bundle, copy)
            calibrate(copy, good, source, target_false_alarm=args.target_false_alarm, min_good=min(10, len(good)),
                      threads=1)  # fmt: skip
            rows[mode] = _rates(copy, split["eval_good"], split["eval_def"])
    report = {"bundle": str(args.bundle), "counts": {k: len(v) for k, v in split.items()}, "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
