"""The demo run: synthetic data through the deployment runtime, end to end.

Until the trainer (issue #3) and the exporter (issue #4) land, the per-location
model here is a transparent stand-in, labelled as such everywhere it is
reported: for every tile location, the mean and standard deviation of 8x8
average-pooled, ImageNet-normalized colour at every map position, fitted on
the defect-free training images; a tile's anomaly map is the largest z-score
over the three channels. Everything after the per-location model is the real
runtime: ``tile_images`` cuts and normalizes, ``merge_maps`` untiles with
feathered blending and smooths the seams, ``normalize_maps`` normalizes with
validation statistics and thresholds. Metrics come from scikit-learn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tilead.demo.synthetic import DEFECT_TYPES, SyntheticSpec, generate
from tilead.runtime import Preprocessing, SeamSmoothing, TileGrid, merge_maps, normalize_maps, tile_images

POOL = 8  # output stride of the stand-in model


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    out_dir: Path
    metrics: dict[str, Any]
    overlays: list[Path] = field(default_factory=list)


def _read(paths: list[Path]) -> np.ndarray:
    images = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"could not read image {p}")
        images.append(image)
    return np.stack(images)


def _pooled_features(images: np.ndarray, grid: TileGrid, prep: Preprocessing) -> np.ndarray:
    """(L, n, 3, th/POOL, tw/POOL) mean colour per POOLxPOOL cell of every tile."""
    tiles = tile_images(images, grid, prep, input_order="BGR")
    locations, n, c, th, tw = tiles.shape
    pooled: np.ndarray = tiles.reshape(locations, n, c, th // POOL, POOL, tw // POOL, POOL).mean(axis=(4, 6))
    return pooled


class PooledColourModel:
    """Stand-in per-location model: z-scores of pooled colour (see the module docstring)."""

    def __init__(self, grid: TileGrid, prep: Preprocessing) -> None:
        self.grid = grid
        self.prep = prep
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, images: np.ndarray) -> None:
        """Fit per-location statistics on ``(n, H, W, 3)`` defect-free images."""
        feats = _pooled_features(images, self.grid, self.prep)
        self.mean = feats.mean(axis=1, keepdims=True)
        self.std = feats.std(axis=1, keepdims=True) + 1e-3

    def maps(self, images: np.ndarray) -> np.ndarray:
        """``(L, n, th/POOL, tw/POOL)`` float32 anomaly maps of ``(n, H, W, 3)`` images."""
        if self.mean is None or self.std is None:
            raise RuntimeError("fit() first")
        feats = _pooled_features(images, self.grid, self.prep)
        z = np.abs(feats - self.mean) / self.std
        return np.ascontiguousarray(z.max(axis=2), dtype=np.float32)


def _overlay(image: np.ndarray, norm_map: np.ndarray, mask: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    heat = cv2.applyColorMap(np.clip(norm_map * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(image, 0.6, heat, 0.4, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 2)
    if truth is not None:
        contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 2)
    return out


def run(out_dir: str | Path, spec: SyntheticSpec | None = None, overlays: int = 6) -> DemoResult:
    """Generate the synthetic data, fit the stand-in model, run the runtime, score and draw.

    Args:
        out_dir: Folder for ``data/``, ``overlays/`` and ``metrics.json``.
        spec: Synthetic dataset settings.
        overlays: Number of test images to draw (defective ones first).

    Returns:
        Metrics and the files written.
    """
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    spec = spec if spec is not None else SyntheticSpec()
    out = Path(out_dir)
    root = generate(out / "data", spec)
    size = spec.image_size
    tile = size // 4
    grid = TileGrid(size, tile, tile * 7 // 8)  # overlapping tiles: blending and seams at work
    prep = Preprocessing()
    seam = SeamSmoothing(sigma=2.0, width=0.1)

    train = sorted((root / "train" / "good").glob("*.png"))
    n_val = max(1, len(train) // 4)
    model = PooledColourModel(grid, prep)
    model.fit(_read(train[:-n_val]))

    def predict(images: np.ndarray) -> np.ndarray:
        return merge_maps(model.maps(images), grid, weights="feather", seam=seam)

    # Validation statistics on held-out good images, on merged maps.
    val_maps = predict(_read(train[-n_val:]))
    val_scores = val_maps.reshape(len(val_maps), -1).max(axis=1)
    pixel_threshold = float(np.quantile(val_maps, 0.999))
    image_threshold = float(val_scores.max())
    pixel_range = (float(val_maps.min()), float(val_maps.max()))
    image_range = (float(val_scores.min()), float(max(val_scores.max(), val_scores.min() + 1e-6)))

    cases: list[tuple[Path, Path | None]] = [(p, None) for p in sorted((root / "test" / "good").glob("*.png"))]
    for kind in DEFECT_TYPES:
        for p in sorted((root / "test" / kind).glob("*.png")):
            cases.append((p, root / "ground_truth" / kind / f"{p.stem}_mask.png"))
    scores, labels, pixel_scores, pixel_truth = [], [], [], []
    drawn: list[Path] = []
    order = sorted(range(len(cases)), key=lambda i: cases[i][1] is None)  # defective first for drawing
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for rank, i in enumerate(tqdm(order, desc="demo: test images", unit="img")):
        path, mask_path = cases[i]
        image = _read([path])
        t0 = time.perf_counter()
        merged = predict(image)
        res = normalize_maps(
            merged,
            pixel_threshold=pixel_threshold,
            image_threshold=image_threshold,
            pixel_range=pixel_range,
            image_range=image_range,
        )
        seconds += time.perf_counter() - t0
        truth = None if mask_path is None else cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        scores.append(float(res.scores[0]))
        labels.append(0 if truth is None else 1)
        gt = np.zeros((size, size), np.uint8) if truth is None else (truth > 0).astype(np.uint8)
        pixel_scores.append(res.maps[0][::4, ::4].ravel())
        pixel_truth.append(gt[::4, ::4].ravel())
        if rank < overlays:
            target = out / "overlays" / f"{path.parent.name}_{path.stem}.png"
            cv2.imwrite(str(target), _overlay(image[0], res.maps[0], res.masks[0], truth))
            drawn.append(target)
    metrics = {
        "model": "stand-in: per-location z-score of 8x8-pooled colour (not a product detector)",
        "grid": grid.to_dict(),
        "locations": grid.num_locations,
        "test_images": len(cases),
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": float(roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores))),
        "seconds_per_image": seconds / len(cases),
        "thresholds": {"pixel": pixel_threshold, "image": image_threshold},
    }
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out / "metrics.json")
    return DemoResult(out, metrics, drawn)
