"""Which locations should share a PaDiM model? An in-memory study of task assignment (issue #20 item 2).

Embeds every location's fit and test tiles of bottle in 4x4 tiles of 256 once (the run's backbone and
channel subset), fits one PaDiM Gaussian per position per group of locations on the union of their tiles,
scores each test tile with its group's model, assembles the image maps (tile maps upsampled to the tile
and averaged where tiles overlap; no seam smoothing or normalization) and reports image AUROC (max of the
map), pixel AUROC and AUPRO (on maps and masks downsampled 4x). It compares groupings without a training
run per row; the quality of the chosen grouping is then measured by the real pipeline
(``benchmarks/bench_hires.py``).

Variants:

* ``one_to_one``, ``neighbourhood`` (k 2), ``all_to_one``: the fixed tables.
* ``cluster_mean``: today's ``cluster`` table (k-means over each location's mean embedding, pooled over
  positions; :func:`tilead.trainer.model_table.location_embeddings`).
* ``cluster_position``: k-means over each location's *per-position* mean embedding (option c).
* ``cluster_oriented``: locations grouped by the per-position distance after the best of the 8
  flips / 90-degree rotations (average-linkage clustering); each location's tiles are transformed before
  the model and its map transformed back (option a).

Usage:
    python benchmarks/study_assignment.py [--k 4 5] [--max-train-images 40] [--json out/study.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilead.runtime.orientation import apply as transform
from tilead.runtime.orientation import invert as inverse

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_bottle"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study and print one line per variant."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--max-train-images", type=int, default=40)
    ap.add_argument("--max-test-images", type=int, default=0, help="0: all")
    ap.add_argument("--variants", nargs="+")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tilead.trainer.assignment import cluster_assignment, fixed_assignment
    from tilead.trainer.components import make_backbone, make_preprocessing, run_grid
    from tilead.trainer.config import load_config
    from tilead.trainer.data import discover
    from tilead.trainer.detectors.padim.model import Embedding, PadimAccumulator, PadimHead, channel_subset
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.maps import map_size
    from tilead.trainer.metrics import aupro, auroc
    from tilead.trainer.model_table import location_embeddings
    from tilead.trainer.tiles import _location_tiles

    overrides: dict[str, Any] = {
        "data.root": str(BOTTLE),
        "grid.tile_size": 256,
        "grid.stride": 256,
        "data.max_train_images": args.max_train_images,
    }
    if args.max_test_images:
        overrides["data.max_test_images"] = args.max_test_images
    cfg = load_config(ROOT / "configs" / "padim_bottle.yaml", overrides)
    splits = discover(cfg.data)
    train, test = list(splits.train), list(splits.test)
    loader = ImageLoader(cfg.data)
    grid = run_grid(cfg, loader, train)
    backbone = make_backbone(cfg)
    prep = make_preprocessing(cfg, backbone)
    m: Any = cfg.model  # the padim section (n_features, covariance_eps, ...)
    size = map_size(grid.tile_size, m.feature_stride)
    index = channel_subset(sum(backbone.info.channels), m.n_features, cfg.seed)
    embed = Embedding(backbone, m.feature_stride, index, size).eval()
    t0 = time.perf_counter()

    def load(samples: list[Any], masks: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        imgs, msks, labels = [], [], []
        for b in loader.iter_batches(samples, 8, with_masks=masks):
            imgs.append(b.images)
            labels.append(b.labels)
            if masks:
                assert b.masks is not None
                msks.append(b.masks)
        return np.concatenate(imgs), np.concatenate(msks) if masks else None, np.concatenate(labels)

    train_images = load(train, False)[0]
    test_images, test_masks, test_labels = load(test, True)
    assert test_masks is not None
    train_tiles = _location_tiles(train_images, grid, prep, cfg.data.channel_order)  # (L, n, C, th, tw)
    test_tiles = _location_tiles(test_images, grid, prep, cfg.data.channel_order)
    print(f"tiles: train {train_tiles.shape}, test {test_tiles.shape} ({time.perf_counter() - t0:.0f} s)", flush=True)
    cache: dict[tuple[str, int, int], np.ndarray] = {}

    def emb(split: str, loc: int, t: int) -> np.ndarray:
        key = (split, loc, t)
        if key not in cache:
            tiles = (train_tiles if split == "train" else test_tiles)[loc]
            x = torch.from_numpy(np.ascontiguousarray(transform(tiles, t)))
            with torch.inference_mode():
                out = torch.cat([embed(x[i : i + 16]) for i in range(0, len(x), 16)]).numpy()
            cache[key] = out.astype(np.float16)
        return cache[key]

    num = grid.num_locations
    th, tw = grid.tile_size
    locs = grid.locations()
    h_img, w_img = test_images.shape[1:3]

    def tile_origin(loc: int) -> tuple[int, int]:
        r, c = locs[loc]
        return grid.origins_y[r], grid.origins_x[c]

    def evaluate(groups: Sequence[Sequence[int]], trans: Sequence[int]) -> dict[str, float]:
        total = np.zeros((len(test_images), h_img, w_img), np.float32)
        weight = np.zeros((h_img, w_img), np.float32)
        for group in groups:
            acc = PadimAccumulator(size[0] * size[1], m.n_features)
            for loc in group:
                e = emb("train", loc, trans[loc])
                for i in range(0, len(e), 16):
                    acc.update(torch.from_numpy(e[i : i + 16].astype(np.float32)))
            mean, inv_cov = acc.finalize(m.covariance_eps)
            head = PadimHead(mean, inv_cov.to(torch.float16), size, m.blur_sigma)
            for loc in group:
                e = emb("test", loc, trans[loc])
                with torch.inference_mode():
                    maps = torch.cat(
                        [head(torch.from_numpy(e[i : i + 16].astype(np.float32))) for i in range(0, len(e), 16)]
                    )
                maps = torch.from_numpy(np.ascontiguousarray(inverse(maps.numpy(), trans[loc])))
                up = torch.nn.functional.interpolate(maps, size=(th, tw), mode="bilinear", align_corners=False)
                y, x = tile_origin(loc)
                total[:, y : y + th, x : x + tw] += up[:, 0].numpy()
                weight[y : y + th, x : x + tw] += 1
        full = total / weight
        small = full[:, ::4, ::4]
        small_masks = test_masks[:, ::4, ::4] > 0 if test_masks.ndim == 3 else test_masks[:, ::4, ::4, 0] > 0
        return {
            "image_auroc": round(auroc(full.reshape(len(full), -1).max(axis=1), test_labels), 4),
            "pixel_auroc": round(auroc(small.ravel(), small_masks.ravel()), 4),
            "aupro": round(aupro(small, small_masks), 4),
        }

    def mean_maps() -> np.ndarray:
        return np.stack([emb("train", loc, 0).astype(np.float32).mean(axis=0) for loc in range(num)])  # (L, d, h, w)

    def oriented(k: int) -> tuple[list[list[int]], list[int]]:
        # Alignment in pixel space (exact and cheap: the mean of transformed tiles is the transformed mean):
        # every location's mean fit tile (downsampled 8x), distances after the best of the 8 transforms.
        from sklearn.cluster import AgglomerativeClustering

        means = train_tiles.mean(axis=1)[:, :, ::8, ::8]  # (L, C, th/8, tw/8)
        dist = np.zeros((num, num, 8))
        for t in range(8):
            moved = np.stack([transform(mm, t) for mm in means])
            dist[:, :, t] = np.sqrt(((means[:, None] - moved[None, :]) ** 2).sum(axis=(2, 3, 4)))
        best = dist.min(axis=2)
        best = np.minimum(best, best.T)
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(best)
        groups: list[list[int]] = [[] for _ in range(k)]
        trans = [0] * num
        for loc, lab in enumerate(labels):
            groups[lab].append(loc)
        for g in groups:
            ref = min(g, key=lambda a: sum(best[a, b] for b in g))  # medoid, kept as is
            for loc in g:
                trans[loc] = 0 if loc == ref else int(dist[ref, loc].argmin())
        return groups, trans

    def table_groups(table: Any) -> list[list[int]]:
        return [list(g) for g in table.groups]

    variants: dict[str, Callable[[], tuple[list[list[int]], list[int]]]] = {
        "one_to_one": lambda: ([[i] for i in range(num)], [0] * num),
        "neighbourhood2": lambda: (table_groups(fixed_assignment("neighbourhood", 2, grid)), [0] * num),
        "all_to_one": lambda: ([list(range(num))], [0] * num),
    }

    def by_table(embeddings: Callable[[], np.ndarray], k: int) -> Callable[[], tuple[list[list[int]], list[int]]]:
        def make() -> tuple[list[list[int]], list[int]]:
            return table_groups(cluster_assignment(embeddings(), k, cfg.seed)), [0] * num

        return make

    def by_orientation(k: int) -> Callable[[], tuple[list[list[int]], list[int]]]:
        return lambda: oriented(k)

    for k in args.k:
        variants[f"cluster_mean{k}"] = by_table(lambda: location_embeddings(cfg, train, grid, backbone), k)
        variants[f"cluster_position{k}"] = by_table(lambda: mean_maps().reshape(num, -1), k)
        variants[f"cluster_oriented{k}"] = by_orientation(k)
    results = []
    for name in args.variants or list(variants):
        if name not in variants:
            raise SystemExit(f"--variants: unknown {name!r}; expected some of {', '.join(variants)}")
        groups, trans = variants[name]()
        names = grid.location_names()
        row = {
            "variant": name,
            "models": len(groups),
            "groups": [[names[i] + (f"/t{trans[i]}" if trans[i] else "") for i in g] for g in groups],
            **evaluate(groups, trans),
        }
        results.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.json:  # after every row
            args.json.parent.mkdir(parents=True, exist_ok=True)
            payload = {"max_train_images": args.max_train_images, "test_images": len(test_images), "rows": results}
            args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
