"""The fused pixel threshold of a thumbnail run at every candidate weight, old and new pinning test (issue #20).

An analysis, not a deployment path. ``--run`` is a validated thumbnail run with ``validation.split:
synthetic`` (read only). Its fitted models (``locations/``, ``thumbnail/``) are copied under ``--work``,
validated and evaluated again there (``tilead-train --resume`` and eager ``tilead eval``: nothing is
refitted); on the way the merged tiled maps and the raw thumbnail maps of the validation images (held-out
good images and their synthetic defects) and of the test images are saved (cached: delete ``--work`` to
recompute). Then, for every weight of ``model.thumbnail.weights``, both branches are fused with the run's
per-branch statistics and the pixel threshold is chosen on the fused validation maps:

* ``old``: the pinning test on the F1-best threshold alone (pinned iff it is at most the limit
  ``max + 0.25 x (max - median)`` of the good pixels), as before the fix;
* ``new``: :func:`tilead.trainer.validation.bounded_pixel_threshold` (also pinned when the F1-best
  threshold above the limit does not beat the best one below it in 95 % of bootstrap resamples).

Reported per weight: both thresholds, the win share, and the pixel F1 of each on the test set
(``map > threshold`` on the fused maps at the image size: the deployed decision); and the pixel F1 of
the tiled validation maps at raw thresholds 20, 23, ... 98 (the plateau the maximum falls on).

Usage:
    nice -n 10 python benchmarks/thumbnail_threshold_sweep.py --run runs/bottle_thumb_synth \
        --work out/thumb_threshold [--json out/thumb_threshold/sweep.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import tilead.trainer.evaluation as evaluation
import tilead.trainer.pipeline as pipeline
from tilead.runtime.thumbnail import upsample
from tilead.thresholds import metrics_at_threshold
from tilead.trainer.config import load_config
from tilead.trainer.run_dir import RunPaths
from tilead.trainer.thumbnail import load_branch
from tilead.trainer.validation import bounded_pixel_threshold

NAMES = ("val_tiled", "val_thumb", "val_masks", "val_labels", "test_tiled", "test_thumb", "test_masks")


def capture(run: Path, work: Path) -> dict[str, np.ndarray]:
    """Validation and test maps of a copy of ``run`` (cached as ``work/<name>.npy``)."""
    if all((work / f"{n}.npy").is_file() for n in NAMES):
        return {n: np.load(work / f"{n}.npy") for n in NAMES}
    copy = work / "run"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for part in ("locations", "thumbnail"):
        shutil.copytree(run / part, copy / part)
    for part in ("config.yaml", "run.json"):
        shutil.copy2(run / part, copy / part)
    saved: dict[str, np.ndarray] = {}
    choose = pipeline.choose_branch  # type: ignore[attr-defined]  # the name the pipeline calls
    merge, infer = evaluation.merge_checked, evaluation.infer_maps

    def choose_saving(cfg: Any, tiled: np.ndarray, thumb: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> Any:
        saved.update(val_tiled=tiled, val_thumb=thumb, val_masks=masks, val_labels=np.asarray(labels, dtype=bool))
        return choose(cfg, tiled, thumb, masks, labels)

    def infer_saving(*args: Any, **kwargs: Any) -> Any:
        res = infer(*args, **kwargs)
        if res.thumbnail is None:
            raise SystemExit("the run's evaluation has no thumbnail maps: not a thumbnail run")
        saved.update(test_thumb=res.thumbnail, test_masks=np.stack(list(res.masks)))
        return res

    def merge_saving(post: Any, maps: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        saved["test_tiled"] = post.merge(maps)
        return merge(post, maps, *args, **kwargs)

    pipeline.choose_branch = choose_saving  # type: ignore[attr-defined,assignment]
    evaluation.infer_maps = infer_saving
    evaluation.merge_checked = merge_saving
    try:
        pipeline.train(load_config(copy / "config.yaml"), copy, resume=True, progress=False)
        evaluation.evaluate(copy, progress=False)
    finally:
        pipeline.choose_branch = choose  # type: ignore[attr-defined]
        evaluation.infer_maps, evaluation.merge_checked = infer, merge
    for name in NAMES:
        np.save(work / f"{name}.npy", saved[name])
    return saved


def old_rule(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, pixel_false_positive: float) -> float:
    """The pixel threshold before the fix: pinned iff the F1-best threshold is at most the limit."""
    _, rule = bounded_pixel_threshold(maps, masks, labels, 0.99, pixel_false_positive)
    value = float(rule["f1_adaptive"])
    return min(value, float(rule["good_pixel_quantile"])) if value <= rule["pinned_below"] else value


def sweep(run: Path, data: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Old and new fused pixel thresholds and their test pixel F1 at every candidate weight."""
    cfg = load_config(run / "config.yaml")
    thumb = cfg.model.thumbnail
    branch = load_branch(RunPaths(run))
    if thumb is None or branch is None:
        raise SystemExit(f"{run}: not a validated thumbnail run")
    q = cfg.validation.pixel_false_positive
    size = data["val_tiled"].shape[1:]
    val_up, test_up = upsample(data["val_thumb"], size), upsample(data["test_thumb"], size)
    masks, labels, truth = data["val_masks"], data["val_labels"], data["test_masks"]
    rows = []
    for weight in thumb.weights:
        fused = dataclasses.replace(branch, fusion="weighted", weight=weight)
        val, test = fused.fuse(data["val_tiled"], val_up), fused.fuse(data["test_tiled"], test_up)
        new, rule = bounded_pixel_threshold(val, masks, labels, 0.99, q)
        old = old_rule(val, masks, labels, q)

        def f1(t: float, test: np.ndarray = test) -> float:
            return round(metrics_at_threshold(test, truth, t).f1, 4)

        rows.append(
            {
                "weight": weight,
                "f1_adaptive": round(float(rule["f1_adaptive"]), 4),
                "pinning_limit": round(float(rule["pinned_below"]), 4),
                "f1_win_share": rule.get("f1_win_share"),
                "old_threshold": round(old, 4),
                "old_test_pixel_f1": f1(old),
                "new_threshold": round(new, 4),
                "new_test_pixel_f1": f1(new),
            }
        )
        print(rows[-1], flush=True)
    return rows


def tiled_f1_curve(data: dict[str, np.ndarray], thresholds: np.ndarray) -> dict[str, float]:
    """Pixel F1 of the merged tiled validation maps at each raw threshold (the synthetic F1 plateau)."""
    maps, masks = data["val_tiled"], data["val_masks"]
    return {f"{t:g}": round(metrics_at_threshold(maps, masks, float(t)).f1, 4) for t in thresholds}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a validated thumbnail run (read only)")
    parser.add_argument("--work", type=Path, default=Path("out/thumb_threshold"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = capture(args.run, args.work)
    curve = tiled_f1_curve(data, np.arange(20.0, 100.0, 3.0))
    print("tiled validation F1 by raw threshold:", curve, flush=True)
    rows = sweep(args.run, data)
    if args.json is not None:
        out = {"run": str(args.run), "rows": rows, "tiled_validation_f1_curve": curve}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
