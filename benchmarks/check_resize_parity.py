"""Raw scores: what training feeds a bundle vs ``Predictor(resize=True)`` on camera-size images (issue #19 item 3).

Each test image is first brought to a "camera" size (``--camera``, bicubic), then scored three ways:
``training`` (resized to the bundle's size with ``cv2.INTER_AREA``, as the trainer's loader does), ``runtime``
(``Predictor(resize=True)``: the area kernel) and ``bilinear`` (the runtime's bilinear resize, what
``resize=True`` did before #19). A quality check, not a timing.

    python benchmarks/check_resize_parity.py --bundle bundles/padim_bottle \
        ../shared/data/mvtec_bottle/test/good/000.png ../shared/data/mvtec_bottle/test/broken_large/000.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from tilead.runtime import Prediction, Predictor
from tilead.runtime.image_resize import resize_uint8


def _one(result: Prediction | list[Prediction]) -> Prediction:
    assert isinstance(result, Prediction)
    return result


def main() -> None:
    """Print the three raw scores per image and whether training and the runtime agree exactly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, nargs="+", help="Image files.")
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle directory.")
    parser.add_argument("--camera", type=int, default=1024, help="Camera image side the files are brought to.")
    args = parser.parse_args()
    with Predictor(args.bundle) as predictor:
        h, w = predictor.image_size
        for path in args.images:
            decoded = cv2.imread(str(path))
            if decoded is None:
                raise SystemExit(f"cannot read {path}")
            camera = cv2.resize(np.asarray(decoded), (args.camera, args.camera), interpolation=cv2.INTER_CUBIC)
            training = _one(predictor.predict(cv2.resize(camera, (w, h), interpolation=cv2.INTER_AREA))).raw_score
            runtime = _one(predictor.predict(camera, resize=True))
            bilinear = _one(predictor.predict(resize_uint8(camera, (h, w)))).raw_score
            print(
                f"{path}: training {training:.4f}  runtime {runtime.raw_score:.4f}  bilinear (before #19) "
                f"{bilinear:.4f}  equal: {training == runtime.raw_score}  map {runtime.anomaly_map.shape}"
            )


if __name__ == "__main__":
    main()
