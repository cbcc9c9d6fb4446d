"""Recalibrate a bundle's normalization and thresholds on images taken at the line (``tilead-calibrate``).

Torch-free and trainer-free: the bundle's own :class:`~tilead.runtime.Predictor`
scores the images, the runtime's post-processing gives raw merged maps and raw
image scores, and :mod:`tilead.thresholds` picks the thresholds.

Rules (all thresholds in raw units, as the manifest stores them):

* **Image threshold.** With defective images: F1-adaptive over the image
  scores of good (label 0) and defective (label 1) images, as training
  validation does. Good images only: :func:`~tilead.thresholds.false_alarm_threshold`
  of the good images' raw scores at the target false-alarm rate.
* **Pixel threshold.** With defective images and masks: F1-adaptive over all
  pixels of all images (good images' pixels are normal). Good images only:
  the false-alarm threshold of the good images' per-image *map maxima*, so at
  most the target share of good images shows any mask pixel (with the map max
  as image score the pixel and image thresholds then coincide).
* **Manual.** ``image_threshold`` / ``pixel_threshold`` given in raw units
  replace the corresponding rule.
* **Ranges.** ``image`` stage: the min/max of the calibration images' merged
  maps and image scores, widened to contain the thresholds (and to the
  smallest width the manifest accepts). With good images only, the upper
  ends keep the exported ones when those are higher (good images say nothing
  about how high anomalies score; without this every defect saturates at 1). ``tile`` stage: the per-location
  ``tile_stats`` are kept (they need per-location maps against masks); the
  pixel threshold is recalibrated on the tile-normalized merged maps inside
  the fixed pixel range [0, 1], and the image range and threshold are
  recalibrated. ``none`` stage: thresholds only.

Defect sources are iterables of :class:`Sample` (image plus mask): folders of
images with masks (:func:`folder_samples`) today; synthetic anomalies can be
another source of the same type.

The manifest is rewritten atomically with a new digest; the previous one is
kept as ``manifest.<k>.json`` (``k`` = 1, 2, ...), and a ``calibration``
section records the rules, counts and rates.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilead.atomic import atomic_write_bytes
from tilead.runtime.bundle import MANIFEST, BundleError, parse_manifest, read_manifest, write_manifest
from tilead.runtime.postprocessor import (
    MIN_WIDTH,
    RELATIVE_WIDTH,
    NormalizationStats,
    normalize_with_stats,
)
from tilead.runtime.predictor import Predictor
from tilead.runtime.thumbnail import fuser
from tilead.thresholds import f1_adaptive_threshold, false_alarm_threshold

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_GOOD_IMAGES = 10


@dataclass(frozen=True)
class Sample:
    """One calibration image.

    Attributes:
        name: For messages (usually the file path).
        image: uint8 ``(H, W)`` or ``(H, W, C)`` (BGR for 3 channels).
        mask: bool ``(H, W)`` defect pixels at the bundle's image size, or
            None for a good image.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class Scored:
    """Raw outputs on calibration images.

    Attributes:
        raw_scores: Image scores before normalization, one per image.
        labels: True for defective images.
        map_max: Max of each merged map.
        map_min: Min of each merged map.
        maps: Merged maps (kept only when pixel F1 needs them).
        masks: Their masks.
    """

    raw_scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    map_max: list[float] = field(default_factory=list)
    map_min: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def n_good(self) -> int:
        """Good images."""
        return len(self.labels) - sum(self.labels)

    @property
    def n_defective(self) -> int:
        """Defective images."""
        return sum(self.labels)


@dataclass(frozen=True)
class Rates:
    """Decisions of a statistics set on the calibration images.

    Attributes:
        false_alarm: Share of good images labelled anomalous (None without good images).
        miss: Share of defective images labelled good (None without defective images).
    """

    false_alarm: float | None
    miss: float | None

    def to_dict(self) -> dict[str, float | None]:
        """Plain-data form."""
        return {"false_alarm": self.false_alarm, "miss": self.miss}


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` computed (and wrote unless ``dry_run``).

    Attributes:
        old: Statistics before.
        new: Statistics after.
        before: Rates of ``old`` on the calibration images.
        after: Rates of ``new``.
        rules: How each threshold was chosen.
        revision: The previous manifest's copy (None for a dry run).
        counts: Good and defective images used.
    """

    old: NormalizationStats
    new: NormalizationStats
    before: Rates
    after: Rates
    rules: dict[str, str]
    revision: Path | None
    counts: dict[str, int]


# -- sources ---------------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted.

    Raises:
        ValueError: If the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no images found (extensions {', '.join(EXTENSIONS)})")
    return files


def _read(path: Path, gray: bool) -> np.ndarray:
    from tilead.imagefile import read_image

    return read_image(path, gray=gray)  # ImageFileError is a ValueError naming the file


def _mask_for(image: Path, images_root: Path, masks_root: Path) -> Path:
    rel = image.relative_to(images_root)
    for stem in (rel.stem, f"{rel.stem}_mask"):
        for ext in EXTENSIONS:
            candidate = masks_root / rel.parent / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    raise ValueError(
        f"no mask for defective image {image}: expected {masks_root / rel.parent / rel.stem}[_mask].png "
        "(same relative path as the image)"
    )


def good_samples(folder: Path, gray: bool) -> Iterator[Sample]:
    """Good images of a folder (recursive)."""
    for path in image_files(folder):
        yield Sample(str(path), _read(path, gray))


def folder_samples(images: Path, masks: Path, gray: bool) -> Iterator[Sample]:
    """Defective images with their masks (same relative path, name ``x.png`` or ``x_mask.png``, nonzero = defect)."""
    for path in image_files(images):
        mask_path = _mask_for(path, Path(images), Path(masks))
        mask = _read(mask_path, gray=True) > 0
        yield Sample(str(path), _read(path, gray), mask)


def synthetic_samples(
    good: Sequence[Sample], *, seed: int = 0, per_image: int = 1, tile_size: tuple[int, int] | None = None
) -> list[Sample]:
    """Defective samples made by drawing synthetic defects into the good images (:mod:`tilead.synthesis`).

    Every kind of :data:`tilead.synthesis.KINDS` in turn, seeded and deterministic,
    with exact masks: the calibration's stand-in for defective parts when the
    line has none to show. The good images themselves are not changed.

    Args:
        good: Good samples, each uint8 ``(H, W)`` or ``(H, W, C)``.
        seed: Seed of the synthesis.
        per_image: Defects drawn from each good image (one defect per copy).
        tile_size: The bundle's tile size (defect sizes scale with it; some sit on tile seams).

    Returns:
        ``len(good) * per_image`` samples with masks, named after their source image and kind.
    """
    from tilead.synthesis import synthesize_defects

    images = [s.image if s.image.ndim == 3 else s.image[:, :, None] for s in good]
    made = synthesize_defects(images, seed=seed, per_image=per_image, tile_size=tile_size)
    return [
        Sample(
            f"{good[d.source].name} [synthetic {d.kind}]",
            d.image if good[d.source].image.ndim == 3 else d.image[:, :, 0],
            d.mask,
        )
        for d in made
    ]


# -- scoring ---------------------------------------------------------------------------------------------


def score(
    predictor: Predictor,
    samples: Iterable[Sample],
    *,
    keep_maps: bool,
    resize: bool = False,
    into: Scored | None = None,
) -> Scored:
    """Run the bundle on samples; collect raw image scores and map statistics (and maps when asked).

    Raises:
        ValueError: For a mask whose size is not the merged map's (the bundle's image size).
    """
    from tilead.imagefile import resize_nearest

    out = into if into is not None else Scored()
    gray = predictor.channels == 1
    for sample in samples:
        maps, tile_scores, thumbnail = predictor.branch_outputs(
            sample.image, input_order="GRAY" if gray else "BGR", resize=resize
        )
        branch = predictor.manifest.thumbnail
        fuse = None if branch is None or thumbnail is None else fuser(branch, thumbnail)
        merged, result = predictor.post.apply(maps, tile_scores=tile_scores, fuse=fuse)
        merged_map = merged[0]
        if not np.isfinite(merged_map).all() or not np.isfinite(result.raw_scores[0]):
            raise ValueError(f"{sample.name}: the model gives non-finite values; cannot calibrate on it")
        out.raw_scores.append(float(result.raw_scores[0]))
        out.labels.append(sample.mask is not None)
        out.map_max.append(float(merged_map.max()))
        out.map_min.append(float(merged_map.min()))
        if keep_maps:
            mask = np.zeros(merged_map.shape, bool) if sample.mask is None else sample.mask
            if mask.shape != merged_map.shape:
                if not resize:
                    raise ValueError(
                        f"{sample.name}: mask of {mask.shape[0]}x{mask.shape[1]}, expected "
                        f"{merged_map.shape[0]}x{merged_map.shape[1]} (the bundle's image size); pass resize"
                    )
                mask = resize_nearest(mask, merged_map.shape)
            out.maps.append(merged_map)
            out.masks.append(mask)
    return out


# -- statistics ------------------------------------------------------------------------------------------


def _widen(lo: float, hi: float, *thresholds: float) -> tuple[float, float]:
    """``[lo, hi]`` grown to contain the thresholds and to the smallest width the manifest accepts."""
    lo, hi = min(lo, *thresholds), max(hi, *thresholds)
    need = max(MIN_WIDTH, RELATIVE_WIDTH * max(abs(lo), abs(hi))) * 2
    if hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
    return lo, hi


def rates(scored: Scored, stats: NormalizationStats) -> Rates:
    """False-alarm and miss rates of ``stats`` on scored images (labels as the runtime computes them)."""
    raw = np.asarray(scored.raw_scores, dtype=np.float32).reshape(-1, 1, 1)
    predicted = normalize_with_stats(np.ascontiguousarray(raw), stats).labels
    truth = np.asarray(scored.labels, dtype=bool)
    good, bad = ~truth, truth
    fa = float(predicted[good].mean()) if good.any() else None
    miss = float((~predicted[bad]).mean()) if bad.any() else None
    return Rates(fa, miss)


def new_stats(
    old: NormalizationStats,
    scored: Scored,
    *,
    target_false_alarm: float,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> tuple[NormalizationStats, dict[str, str]]:
    """Statistics recalibrated on scored images (rules in the module docstring).

    Raises:
        ValueError: Without good images, or for a manual pixel threshold outside
            [0, 1] on a ``tile`` stage bundle.
    """
    truth = np.asarray(scored.labels, dtype=bool)
    raw = np.asarray(scored.raw_scores, dtype=np.float32)
    maxima = np.asarray(scored.map_max, dtype=np.float32)
    if not (~truth).any():
        raise ValueError("calibration needs good images (--good)")
    rules: dict[str, str] = {}
    with_defects = bool(truth.any())
    if image_threshold is not None:
        it, rules["image_threshold"] = float(image_threshold), "manual (raw units)"
    elif with_defects:
        res = f1_adaptive_threshold(raw, truth)
        it, rules["image_threshold"] = res.threshold, f"f1_adaptive (F1 {res.f1:.3f} on the calibration images)"
    else:
        it = false_alarm_threshold(raw[~truth], target_false_alarm)
        rules["image_threshold"] = f"false-alarm rate <= {target_false_alarm:g} on {int((~truth).sum())} good images"
    if pixel_threshold is not None:
        pt, rules["pixel_threshold"] = float(pixel_threshold), "manual (raw units)"
    elif with_defects and scored.maps:
        pixels = np.stack(scored.maps)
        res = f1_adaptive_threshold(pixels, np.stack(scored.masks))
        pt, rules["pixel_threshold"] = res.threshold, f"f1_adaptive over pixels (F1 {res.f1:.3f})"
    else:
        pt = false_alarm_threshold(maxima[~truth], target_false_alarm)
        rules["pixel_threshold"] = (
            f"false-alarm rate <= {target_false_alarm:g} of good images with any mask pixel (map maxima)"
        )
    if old.stage == "none":
        return NormalizationStats("none", pt, it), rules
    hi = float(raw.max())
    if not with_defects and old.image_range is not None:
        # Good images only say nothing about how high anomalies score: keep the exported upper end if higher,
        # so defective parts do not all saturate at 1.
        hi = max(hi, old.image_range[1])
    image_range = _widen(float(raw.min()), hi, it)
    if old.stage == "tile":
        if not 0.0 <= pt <= 1.0:
            raise ValueError(
                f"pixel threshold {pt} must lie in [0, 1] for a 'tile' stage bundle (tile-normalized maps)"
            )
        rules["tile_stats"] = "kept (per-location normalization from training)"
        return NormalizationStats("tile", pt, it, (0.0, 1.0), image_range, old.tile_stats), rules
    top = max(scored.map_max)
    if not with_defects and old.pixel_range is not None:
        top = max(top, old.pixel_range[1])
    pixel_range = _widen(min(scored.map_min), top, pt)
    return NormalizationStats("image", pt, it, pixel_range, image_range), rules


# -- the manifest ----------------------------------------------------------------------------------------


def next_revision(bundle: Path) -> Path:
    """``manifest.<k>.json`` with ``k`` one more than the largest kept revision."""
    taken = []
    for p in Path(bundle).glob("manifest.*.json"):
        middle = p.name[len("manifest.") : -len(".json")]
        if middle.isdigit():
            taken.append(int(middle))
    return Path(bundle) / f"manifest.{max(taken, default=0) + 1}.json"


def calibrate(
    bundle: Path,
    good: Iterable[Sample],
    defects: Iterable[Sample] | None = None,
    *,
    target_false_alarm: float = 0.01,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    min_good: int = MIN_GOOD_IMAGES,
    resize: bool = False,
    threads: int | None = None,
    dry_run: bool = False,
    sources: Sequence[str] = (),
) -> Calibration:
    """Recalibrate ``bundle`` on good (and optionally defective) images and rewrite its manifest.

    Args:
        bundle: Bundle directory.
        good: Good images at the line.
        defects: Defective images with masks (any source of :class:`Sample`), or None.
        target_false_alarm: Accepted share of good images labelled anomalous
            (rules without defects).
        image_threshold: Manual image threshold, raw units.
        pixel_threshold: Manual pixel threshold, raw units.
        min_good: Fewest good images accepted.
        resize: Resize images (and masks) of another size to the bundle's.
        threads: CPU threads for inference.
        dry_run: Compute and report, write nothing.
        sources: Descriptions of the image sources, recorded in the manifest.

    Returns:
        The calibration.

    Raises:
        BundleError: For an invalid bundle or resulting manifest.
        ValueError: For bad images, masks or arguments.
    """
    if not 0.0 <= target_false_alarm < 1.0:
        raise ValueError(f"target false-alarm rate: expected a rate in [0, 1), got {target_false_alarm}")
    bundle = Path(bundle)
    with Predictor(bundle, threads=threads) as predictor:
        old = predictor.manifest.stats
        raw_manifest = copy.deepcopy(predictor.manifest.raw)
        # Pixel F1 needs every pixel of every image (good ones too): maps are kept only then.
        keep = defects is not None and pixel_threshold is None
        scored = score(predictor, good, keep_maps=keep, resize=resize)
        if scored.n_good < min_good:
            raise ValueError(
                f"{scored.n_good} good images given, fewer than the {min_good} needed for a threshold to mean "
                "anything; add good images from the line (or lower --min-images knowingly)"
            )
        if defects is not None:
            scored = score(predictor, defects, keep_maps=keep, resize=resize, into=scored)
            if scored.n_defective == 0:
                raise ValueError("the defect source gave no image")
    stats, rules = new_stats(
        old, scored, target_false_alarm=target_false_alarm, image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
    )  # fmt: skip
    before, after = rates(scored, old), rates(scored, stats)
    counts = {"good": scored.n_good, "defective": scored.n_defective}
    data = dict(raw_manifest)
    data["normalization"] = stats.to_dict()
    previous = data.get("calibration")
    data["calibration"] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": counts,
        "sources": list(sources),
        "target_false_alarm": target_false_alarm,
        "rules": rules,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "previous_revisions": (previous or {}).get("previous_revisions", 0) + (1 if not dry_run else 0),
    }
    parse_manifest(data, source=f"{bundle / MANIFEST} (recalibrated)")  # refuse before writing anything
    revision = None
    if not dry_run:
        revision = next_revision(bundle)
        atomic_write_bytes(revision, (bundle / MANIFEST).read_bytes())
        write_manifest(bundle, data)
        read_manifest(bundle)  # what was written reads back
    return Calibration(old, stats, before, after, rules, revision, counts)


def summary(result: Calibration) -> str:
    """Human-readable report: thresholds and rates before and after."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    o, n, r = result.old, result.new, result.rules
    lines = [
        f"images: {result.counts['good']} good, {result.counts['defective']} defective",
        f"image threshold (raw): {o.image_threshold:.6g} -> {n.image_threshold:.6g}  [{r['image_threshold']}]",
        f"pixel threshold (raw): {o.pixel_threshold:.6g} -> {n.pixel_threshold:.6g}  [{r['pixel_threshold']}]",
        f"false alarms on good images: {pct(result.before.false_alarm)} -> {pct(result.after.false_alarm)}",
        f"misses on defective images:  {pct(result.before.miss)} -> {pct(result.after.miss)}",
    ]
    if n.image_range is not None:
        lines.append(f"image range (raw): {list(o.image_range or ())} -> {list(n.image_range)}")
    if result.revision is not None:
        lines.append(f"previous manifest kept as {result.revision}")
    return "\n".join(lines)


def dumps(result: Calibration) -> str:
    """JSON of a calibration (for ``--json``)."""
    return json.dumps(
        {
            "old": result.old.to_dict(),
            "new": result.new.to_dict(),
            "before": result.before.to_dict(),
            "after": result.after.to_dict(),
            "rules": result.rules,
            "counts": result.counts,
            "revision": None if result.revision is None else str(result.revision),
        },
        indent=2,
    )


__all__ = [
    "BundleError",
    "Calibration",
    "Rates",
    "Sample",
    "Scored",
    "calibrate",
    "folder_samples",
    "good_samples",
    "new_stats",
    "rates",
    "score",
    "summary",
]
