"""Run a bundle through the installed tilead runtime: the check of ``scripts/check_runtime_wheel.sh``.

Run with the interpreter of the environment under test. It checks that the environment holds
neither torch nor OpenCV (unless ``--allow-heavy``), that ``tilead`` is the installed copy (not this
source tree), scores every image of ``--images`` with :class:`tilead.runtime.Predictor`, writes
``{file: raw score}`` as JSON, and with ``--expect`` compares the scores with another
environment's (the development install's) within ``--atol``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

HEAVY = ("torch", "torchvision", "cv2", "onnx", "timm")


def main(argv: list[str] | None = None) -> int:
    """Check the environment, score the images, compare; 0 on success, 1 with a ``FAIL:`` line otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images, walked recursively")
    parser.add_argument("--json", type=Path, required=True, help="where to write {file: raw score}")
    parser.add_argument("--expect", type=Path, help="JSON of the same run in another environment")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest raw-score difference accepted")
    parser.add_argument("--limit", type=int, default=16, help="images scored at most")
    parser.add_argument("--allow-heavy", action="store_true", help="do not require torch/OpenCV to be absent")
    args = parser.parse_args(argv)

    present = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
    if present and not args.allow_heavy:
        print(f"FAIL: the runtime install holds {', '.join(present)}", file=sys.stderr)
        return 1

    import tilead
    from tilead import _kernels
    from tilead.imagefile import read_image
    from tilead.runtime import Predictor

    source = Path(__file__).resolve().parents[1] / "tilead"
    if not args.allow_heavy and Path(tilead.__file__).resolve().parent == source:
        print(f"FAIL: imported tilead from the source tree {source}, not the installed wheel", file=sys.stderr)
        return 1
    files = sorted(p for p in args.images.rglob("*.png") if p.is_file())[: args.limit]
    if not files:
        print(f"FAIL: no PNG images under {args.images}", file=sys.stderr)
        return 1
    scores: dict[str, float] = {}
    with Predictor(args.bundle) as predictor:
        gray = predictor.channels == 1
        for path in files:
            image = read_image(path, gray=gray)
            result = predictor.predict(image, input_order="GRAY" if gray else "BGR", resize=True)
            assert not isinstance(result, list)
            scores[str(path.relative_to(args.images))] = float(result.raw_score)
    args.json.write_text(json.dumps(scores, indent=1) + "\n")
    print(f"tilead {tilead.__version__} from {Path(tilead.__file__).parent}; kernels {Path(_kernels.__file__).name}")
    print(f"scored {len(scores)} images with {args.bundle}")
    if args.expect is not None:
        expected = json.loads(args.expect.read_text())
        if set(expected) != set(scores):
            print(f"FAIL: scored files differ from {args.expect}", file=sys.stderr)
            return 1
        worst = max(abs(scores[k] - expected[k]) for k in scores)
        if not math.isfinite(worst) or worst > args.atol:
            print(f"FAIL: raw scores differ from {args.expect} by up to {worst:.3g} (> {args.atol})", file=sys.stderr)
            return 1
        print(f"same raw scores as {args.expect} (largest difference {worst:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
