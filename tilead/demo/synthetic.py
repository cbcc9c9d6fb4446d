"""Deterministic synthetic inspection data in MVTec AD layout.

Textured high-resolution surfaces (brushed metal: anisotropic noise, a slow
illumination gradient, a per-image tint) with small defects and pixel masks:

* ``scratch``: thin bright or dark line segments,
* ``spot``: small dark blobs with soft edges,
* ``stain``: low-contrast tinted patches.

Layout (as MVTec AD)::

    root/train/good/000.png ...
    root/test/good/000.png ...
    root/test/<type>/000.png ...
    root/ground_truth/<type>/000_mask.png ...
    root/spec.json          # the generator settings; a matching root is reused

The same spec always produces the same bytes (NumPy PCG64 streams seeded per
image). Writing is atomic: images go to a temporary folder that is renamed
into place when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "spot", "stain")
GENERATOR_VERSION = 2  # bump whenever the drawing changes, so cached datasets are regenerated


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
        image_size: Height and width of every image in pixels.
        train_good: Defect-free training images.
        test_good: Defect-free test images.
        test_per_defect: Test images per defect type.
        seed: Base seed; every image draws from its own stream.
    """

    image_size: int = 1024
    train_good: int = 24
    test_good: int = 8
    test_per_defect: int = 6
    seed: int = 2026

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size: expected at least 64 pixels, got {self.image_size}")
        for name in ("train_good", "test_good", "test_per_defect"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1 image, got {getattr(self, name)}")


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 in 0..255: brushed-metal texture."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    brushed = cv2.GaussianBlur(noise, (0, 0), sigmaX=9.0, sigmaY=0.8) * 14.0
    grain = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.0) * 3.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Controlled line lighting: a fixed direction and level with small jitter.
    angle = 0.8 + rng.uniform(-0.15, 0.15)
    light = rng.uniform(14.0, 18.0) * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
    base = 128.0 + rng.uniform(-3, 3) + light + brushed + grain
    tint = np.array([1.0, 1.0, 1.0], dtype=np.float32) + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    surface: np.ndarray = base[..., None] * tint[None, None, :]
    return surface


def _defect(rng: np.random.Generator, kind: str, image: np.ndarray) -> np.ndarray:
    """Draw one defect of ``kind`` into ``image`` (in place); return its uint8 mask."""
    size = image.shape[0]
    mask = np.zeros((size, size), dtype=np.uint8)
    cx, cy = (int(v) for v in rng.integers(size // 10, size - size // 10, 2))
    if kind == "scratch":
        length = rng.uniform(0.06, 0.2) * size
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p0 = (int(cx - dx), int(cy - dy))
        p1 = (int(cx + dx), int(cy + dy))
        cv2.line(mask, p0, p1, 255, thickness=int(rng.integers(2, 5)))
        delta = rng.choice([-1.0, 1.0]) * rng.uniform(45, 70)
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 0.8)
        image += (soft * delta)[..., None]
    elif kind == "spot":
        axes = (int(rng.integers(size // 90, size // 40)), int(rng.integers(size // 90, size // 40)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 2.0)
        image *= (1.0 - 0.55 * soft)[..., None]
    elif kind == "stain":
        axes = (int(rng.integers(size // 40, size // 18)), int(rng.integers(size // 40, size // 18)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 4.0)
        color = np.array([rng.uniform(-35, -20), rng.uniform(5, 15), rng.uniform(20, 35)], dtype=np.float32)
        image += soft[..., None] * color[None, None, :]
    else:
        raise ValueError(f"defect kind: expected one of {', '.join(DEFECT_TYPES)}, got {kind!r}")
    return mask


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def generate(root: str | Path, spec: SyntheticSpec | None = None) -> Path:
    """Generate the dataset at ``root`` (reused when ``root/spec.json`` matches).

    Args:
        root: Target folder; created, or replaced when its spec differs.
        spec: What to generate (defaults: 1024 px, 24 train, 8 + 3 x 6 test).

    Returns:
        The dataset root.
    """
    spec = spec if spec is not None else SyntheticSpec()
    root = Path(root)
    wanted = {"generator_version": GENERATOR_VERSION, **asdict(spec)}
    spec_file = root / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        stream = 0

        def rng() -> np.random.Generator:
            nonlocal stream
            stream += 1
            return np.random.default_rng([spec.seed, stream])

        size = spec.image_size
        for i in range(spec.train_good):
            _write(tmp / "train" / "good" / f"{i:03d}.png", _to_u8(_surface(rng(), size)))
        for i in range(spec.test_good):
            _write(tmp / "test" / "good" / f"{i:03d}.png", _to_u8(_surface(rng(), size)))
        for kind in DEFECT_TYPES:
            for i in range(spec.test_per_defect):
                r = rng()
                image = _surface(r, size)
                mask = _defect(r, kind, image)
                _write(tmp / "test" / kind / f"{i:03d}.png", _to_u8(image))
                _write(tmp / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
        (tmp / "spec.json").write_text(json.dumps(wanted, indent=2))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _to_u8(image: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out
