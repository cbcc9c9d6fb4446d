"""The thumbnail branch's sizes and fusion rules compared on one fitted run's test set (issue #20 item 1).

A study, not a deployment path: it reuses the fitted tile locations of ``--run`` (read only),
fits one thumbnail model per ``--sizes`` entry (PaDiM, the run's settings, on the run's fit
images; checkpoints under ``--work`` and reused), and caches under ``--work``:

* the merged tiled maps of the test images (the run's post-processing, before normalization);
* each size's thumbnail maps **without** the detector's blur (``blur_sigma`` 0), so that the
  blur can be varied here: ``--blurs`` are Gaussian sigmas in thumbnail-map pixels applied with
  the detector's own blur (``run`` means the run's ``model.blur_sigma``).

Every (size, blur) is then fused with the tiled maps by each rule of
:data:`tilead.runtime.thumbnail.FUSIONS` over a weight grid, with the per-branch statistics
validation would measure on these images (the run's split is ``same_as_test`` for bottle: the
statistics and the weights are then the test set's, an optimistic, in-sample choice, reported as
such). Metrics as ``tilead eval`` computes them: image AUROC (map max), pixel AUROC and AUPRO at
full resolution, on the fused maps before normalization.

Usage:
    nice -n 10 python benchmarks/thumbnail_study.py --run runs/padim_bottle --work out/thumb_study \
        --sizes 256 320 384 --blurs run 1 0.5 --json benchmarks/results/thumbnail_study.json
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilead.runtime.thumbnail import ThumbnailBranch, upsample
from tilead.trainer.config import load_config
from tilead.trainer.data import discover
from tilead.trainer.images import ImageLoader
from tilead.trainer.inference import location_forward
from tilead.trainer.metrics import aupro, auroc
from tilead.trainer.run import Run
from tilead.trainer.run_dir import RunPaths
from tilead.trainer.thumbnail import branch_stats, fit_thumbnail, load_thumbnail_model, thumbnail_forward

WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def _batches(fn: Any, images: np.ndarray, batch: int) -> np.ndarray:
    out = [fn(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(out, axis=1)


def test_set(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images ``(n, H, W, C)``, bool masks ``(n, H, W)``, bool labels ``(n,)`` of the run's test set."""
    cfg = run.config
    samples = discover(cfg.data).test
    images, masks = [], []
    for b in ImageLoader(cfg.data).iter_batches(samples, cfg.eval.batch_size, with_masks=True):
        images.append(b.images)
        assert b.masks is not None
        masks.append(b.masks)
    return np.concatenate(images), np.concatenate(masks), np.array([s.label for s in samples], dtype=bool)


def tiled_maps(run: Run, images: np.ndarray, cache: Path) -> np.ndarray:
    """float32 ``(n, H, W)``: the run's merged tiled maps (stage ``image``: no tile statistics), cached."""
    if cache.is_file():
        cached: np.ndarray = np.load(cache)
        return cached
    cfg = run.config
    if cfg.postprocess.normalization == "tile":
        raise SystemExit("this study handles normalization 'image' or 'none' (no tile statistics) only")
    forward = location_forward(cfg, run.models(), run.grid, run.preprocessing)
    maps = _batches(forward, images, cfg.eval.batch_size)
    merged: np.ndarray = cfg.postprocess.processor(run.grid).merge(maps)
    np.save(cache, merged)
    return merged


def thumbnail_maps(run: Run, work: Path, size: int, images: np.ndarray, suffix: str = "") -> np.ndarray:
    """float32 ``(n, h, w)``: the size's thumbnail maps without blur (model fitted under ``work``), cached."""
    cache = work / f"thumb{size}_noblur{suffix}.npy"
    if cache.is_file():
        cached: np.ndarray = np.load(cache)
        return cached
    cfg = load_config(run.paths.config, {"model.thumbnail": {"size": size, "fusion": "max"}})
    paths = RunPaths(work)
    if not paths.run_json.is_file():  # the thumbnail reads the image size from run.json's grid
        shutil.copyfile(run.paths.run_json, paths.run_json)
    fit_samples = discover(cfg.data).train  # same_as_test: every training image is a fit image
    if cfg.validation.split != "same_as_test":
        raise SystemExit("this study reuses a same_as_test run (its fit images are all training images)")
    start = time.perf_counter()
    fit_thumbnail(cfg, paths, fit_samples, run.backbone, run.preprocessing, progress=False)
    print(f"size {size}: fitted in {time.perf_counter() - start:.0f} s", flush=True)
    model = load_thumbnail_model(cfg, paths, run.backbone)
    for module in model.modules():
        if hasattr(module, "blur_sigma"):
            setattr(module, "blur_sigma", 0.0)  # noqa: B010  raw maps: the blur is varied below
    maps: np.ndarray = _batches(thumbnail_forward(cfg, model, run.preprocessing), images, cfg.eval.batch_size)[0]
    np.save(cache, maps)
    return maps


def blurred(maps: np.ndarray, sigma: float) -> np.ndarray:
    """The detector's Gaussian blur (sigma in map pixels) of float32 ``(n, h, w)`` maps."""
    if sigma <= 0:
        return maps
    from tilead.trainer.maps import blur_map, gaussian_kernel1d

    with torch.inference_mode():
        out = blur_map(torch.from_numpy(maps)[:, None], gaussian_kernel1d(sigma))
    return np.ascontiguousarray(out[:, 0].numpy(), dtype=np.float32)


def metrics(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, *, pixel: bool = True) -> dict[str, float]:
    """Image AUROC (max of the map), pixel AUROC and AUPRO, as ``tilead eval`` on maps before normalization."""
    out = {"image_auroc": auroc(maps.reshape(len(maps), -1).max(axis=1), labels)}
    if pixel:
        out["pixel_auroc"] = auroc(maps.reshape(-1), masks.reshape(-1))
    out["aupro"] = aupro(maps, masks)
    return {k: round(v, 4) for k, v in out.items()}


def cross_selection(
    run: Run, tiled: np.ndarray, raw: np.ndarray, masks: np.ndarray, labels: np.ndarray, size: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Two-fold selection: statistics and weight chosen on one half of the images, measured on the other.

    The halves are seeded and stratified by label; the choice is validation's own (:func:`choose_branch`,
    ``weighted`` over :data:`WEIGHTS`, the thumbnail blurred as ``blur: matched``).
    """
    from tilead.trainer.thumbnail import choose_branch, thumbnail_blur

    cfg = load_config(run.paths.config, {"model.thumbnail": {"size": size, "fusion": "weighted", "blur": "matched"}})
    small = blurred(raw, thumbnail_blur(cfg, tiled.shape[1:]))
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=int)
    for value in (False, True):
        idx = np.flatnonzero(labels == value)
        fold[rng.permutation(idx)[: len(idx) // 2]] = 1
    out = []
    for chosen_on in (0, 1):
        a, b = fold == chosen_on, fold != chosen_on
        branch, _ = choose_branch(cfg, tiled[a], small[a], masks[a], labels[a])
        fused = branch.fuse(tiled[b], upsample(small[b], tiled.shape[1:]))
        out.append(
            {
                "variant": "cross_selection",
                "size": size,
                "blur": "matched",
                "chosen_on_images": int(a.sum()),
                "weight": branch.weight,
                "measured_on_images": int(b.sum()),
                "fused": metrics(fused, masks[b], labels[b]),
                "tiled": metrics(tiled[b], masks[b], labels[b]),
            }
        )
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Fit, cache, fuse, measure; print one line per variant and write ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a fitted same_as_test run (read only)")
    ap.add_argument("--work", type=Path, required=True, help="thumbnail checkpoints and map caches")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 320, 384])
    ap.add_argument("--blurs", nargs="+", default=["run"], help="thumbnail blur sigmas (map px); 'run': the run's")
    ap.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    ap.add_argument("--max-test-images", type=int, default=0, help="smoke runs: first N test images only")
    ap.add_argument("--cross", action="store_true", help="only the two-fold selection (cached maps, each size)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    run = Run.open(args.run)
    images, masks, labels = test_set(run)
    if args.max_test_images:
        pick = np.linspace(0, len(images) - 1, args.max_test_images).round().astype(int)
        images, masks, labels = images[pick], masks[pick], labels[pick]
    suffix = f"_{len(images)}" if args.max_test_images else ""
    tiled = tiled_maps(run, images, args.work / f"tiled{suffix}.npy")
    if args.cross:
        cross = [r for size in args.sizes for r in cross_selection(
            run, tiled, thumbnail_maps(run, args.work, size, images, suffix), masks, labels, size
        )]  # fmt: skip
        if args.json:
            from tilead.atomic import atomic_write_json

            atomic_write_json(args.json, {"run": str(args.run), "test_images": len(images), "rows": cross})
        return 0
    rows: list[dict[str, Any]] = [{"variant": "tiled", **metrics(tiled, masks, labels)}]
    print(rows[-1], flush=True)
    q = run.config.validation.good_quantile
    tiled_stats, _ = branch_stats(tiled, masks, q)
    for size in args.sizes:
        raw = thumbnail_maps(run, args.work, size, images, suffix)
        for blur_arg in args.blurs:
            sigma = run.config.model.blur_sigma if blur_arg == "run" else float(blur_arg)
            up = upsample(blurred(raw, sigma), tiled.shape[1:])
            thumb_stats, _ = branch_stats(up, masks, q)
            key = {"size": size, "blur": sigma}
            rows.append({"variant": "thumbnail", **key, **metrics(up, masks, labels)})
            print(rows[-1], flush=True)
            for fusion, weights in (("max", [None]), ("weighted", args.weights)):
                for w in weights:
                    branch = ThumbnailBranch(size, fusion, w, raw.shape[1:], tiled_stats, thumb_stats)  # type: ignore[arg-type]
                    fused = branch.fuse(tiled, up)
                    rows.append({"variant": fusion, **key, "weight": w, **metrics(fused, masks, labels)})
                    print(rows[-1], flush=True)
    if args.json:
        from tilead.atomic import atomic_write_json

        payload = {
            "run": str(args.run),
            "test_images": len(images),
            "note": "per-branch statistics and weights measured on the test set (same_as_test): in-sample",
            "tiled_stats": tiled_stats.to_dict(),
            "rows": rows,
        }
        atomic_write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
