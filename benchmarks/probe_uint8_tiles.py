"""How far a bf16 bundle's maps move when its backbone takes uint8 tiles instead of float tiles (issue #21 item 3).

A bf16 bundle's heads were refit on the features of one backbone input: float32 tiles (bundles exported
before ``model.backbone_input``) or uint8 tiles normalized inside the compiled model (exported since).
This probe copies a bundle twice, marks one copy ``float32`` and the other ``uint8``
(:func:`tilead.runtime.bundle.write_manifest`; the model files are the same), and runs both on the
``hybrid`` backend over the given images, one image per call:

* features: the shared backbone's on every tile, mean and max absolute difference relative to the
  float path's mean absolute feature;
* maps: the raw per-location maps, max absolute difference relative to each image's map range, and
  relative to the bundle's normalization range (``pixel_range``);
* scores: the largest change of the normalized image score.

Parity figures only, no timing. Needs a CPU with bf16 units.

Usage::

    python benchmarks/probe_uint8_tiles.py BF16_BUNDLE IMAGES_DIR [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tilead.imagefile import read_image
from tilead.runtime import Predictor
from tilead.runtime.bundle import DIGEST_KEY, write_manifest
from tilead.runtime.preprocess import tile_images, tile_images_u8


def marked_copy(bundle: Path, target: Path, backbone_input: str) -> Path:
    """A copy of ``bundle`` whose manifest says ``model.backbone_input`` = ``backbone_input``."""
    shutil.copytree(bundle, target)
    data: dict[str, Any] = json.loads((target / "manifest.json").read_text())
    data.pop(DIGEST_KEY, None)
    data["model"]["backbone_input"] = backbone_input
    write_manifest(target, data)
    return target


def probe(bundle: Path, paths: list[Path]) -> dict[str, Any]:
    """The figures of the module docstring for ``bundle`` on the images at ``paths``."""
    raw = json.loads((bundle / "manifest.json").read_text())
    low, high = raw["normalization"]["pixel_range"]
    with tempfile.TemporaryDirectory(prefix="tilead-u8-") as scratch:
        old = marked_copy(bundle, Path(scratch) / "float32", "float32")
        new = marked_copy(bundle, Path(scratch) / "uint8", "uint8")
        feat_mean, feat_max, feat_scale, map_rel, map_norm, score = [], [], [], [], [], []
        with Predictor(old, threads=2) as before, Predictor(new, threads=2) as after:
            b_old: Any = before._open()
            b_new: Any = after._open()
            m = before.manifest
            for path in paths:
                image = read_image(path, gray=False)[None]  # (1, H, W, 3) BGR
                floats = tile_images(image, m.grid, m.preprocessing, input_order="BGR")[:, 0]
                pixels = tile_images_u8(image, m.grid, m.preprocessing, input_order="BGR")[:, 0]
                f_old = np.empty((len(floats), *(m.features or ())), dtype=np.float32)
                f_new = np.empty_like(f_old)
                for i in range(len(floats)):
                    b_old._run_features(floats[i : i + 1], f_old[i : i + 1])
                    b_new._run_features(pixels[i : i + 1], f_new[i : i + 1])
                scale = float(np.abs(f_old).mean())
                feat_scale.append(scale)
                feat_mean.append(float(np.abs(f_new - f_old).mean()) / scale)
                feat_max.append(float(np.abs(f_new - f_old).max()) / scale)
                a = before.location_maps(image, input_order="BGR")
                b = after.location_maps(image, input_order="BGR")
                diff = float(np.abs(a - b).max())
                map_rel.append(diff / (float(a.max() - a.min()) or 1.0))
                map_norm.append(diff / (high - low))
                r_old = before.predict(image[0], input_order="BGR")
                r_new = after.predict(image[0], input_order="BGR")
                score.append(abs(float(r_old.score) - float(r_new.score)))  # type: ignore[union-attr]
    return {
        "bundle": str(bundle),
        "images": len(paths),
        "features_mean_abs_diff_rel": float(np.mean(feat_mean)),
        "features_max_abs_diff_rel": float(np.max(feat_max)),
        "maps_max_abs_diff_over_map_range": float(np.max(map_rel)),
        "maps_mean_of_max_abs_diff_over_map_range": float(np.mean(map_rel)),
        "maps_max_abs_diff_over_pixel_range": float(np.max(map_norm)),
        "score_max_abs_diff": float(np.max(score)),
    }


def main() -> None:
    """Parse the command line, print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path, help="a folder searched recursively for .png images")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    paths = sorted(args.images.rglob("*.png"))
    if args.limit > 0:
        paths = paths[: args.limit]
    if not paths:
        parser.error(f"no .png images under {args.images}")
    result = probe(args.bundle, paths)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
