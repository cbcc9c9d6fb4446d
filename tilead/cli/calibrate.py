"""``tilead-calibrate``: recompute a bundle's normalization and thresholds on images from the line.

Torch- and OpenCV-free: imports the runtime, :mod:`tilead.thresholds` and
:mod:`tilead.imagefile` (Pillow decoding) only, never torch, cv2 or the trainer (a test proves it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from tilead.cli._common import fail_on_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--good", "good_dir", type=click.Path(file_okay=False, path_type=Path), help="Folder of good images.")
@click.option("--defects", "defects_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of defective images (needs --masks).")  # fmt: skip
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Their masks: same relative path, name x.png or x_mask.png, nonzero = defect.")  # fmt: skip
@click.option(
    "--synthetic",
    is_flag=True,
    help="Synthetic defects drawn into the good images (seeded) instead of --defects/--masks.",
)
@click.option(
    "--synthetic-per-image",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Synthetic defects drawn from each good image.",
)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the synthetic defects.")
@click.option("--target-false-alarm", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.01,
              show_default=True, help="Accepted share of good images flagged (good-images-only rule).")  # fmt: skip
@click.option("--image-threshold", type=float, default=None, help="Manual image threshold, raw units.")
@click.option("--pixel-threshold", type=float, default=None, help="Manual pixel threshold, raw units.")
@click.option("--min-images", type=click.IntRange(1), default=10, show_default=True,
              help="Fewest good images accepted.")  # fmt: skip
@click.option("--resize", is_flag=True, help="Resize images (and masks) of another size to the bundle's.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for inference.")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def main(
    bundle: Path,
    good_dir: Path | None,
    defects_dir: Path | None,
    masks_dir: Path | None,
    synthetic: bool,
    synthetic_per_image: int,
    seed: int,
    target_false_alarm: float,
    image_threshold: float | None,
    pixel_threshold: float | None,
    min_images: int,
    resize: bool,
    threads: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Recalibrate BUNDLE's thresholds and normalization on images taken at the line.

    Good images only: the image threshold keeps the false-alarm rate on them at
    --target-false-alarm. With --defects and --masks: F1-adaptive thresholds, as
    training validation. --image-threshold / --pixel-threshold set raw values by
    hand. The manifest is rewritten atomically with a new digest; the previous one
    is kept as manifest.<k>.json.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (defects_dir is None) != (masks_dir is None):
        raise click.UsageError("--defects and --masks go together")
    if synthetic and defects_dir is not None:
        raise click.UsageError("--synthetic replaces --defects/--masks: give one or the other")
    if good_dir is None:
        raise click.UsageError("--good is required: the folder of good images from the line")
    with fail_on_errors():
        from tilead.calibrate import calibrate, dumps, folder_samples, good_samples, summary, synthetic_samples
        from tilead.runtime.bundle import read_manifest

        manifest = read_manifest(bundle)
        gray = manifest.preprocessing.channels == 1
        defects: Any = None
        good: Any = good_samples(good_dir, gray)
        sources = [f"good: {good_dir}"]
        if synthetic:
            good = list(good)
            defects = synthetic_samples(
                good, seed=seed, per_image=synthetic_per_image, tile_size=manifest.grid.tile_size
            )
            sources.append(f"synthetic defects: {synthetic_per_image} per good image, seed {seed}")
        if defects_dir is not None and masks_dir is not None:
            defects = folder_samples(defects_dir, masks_dir, gray)
            sources.append(f"defects: {defects_dir} (masks {masks_dir})")
        result = calibrate(
            bundle, good, defects, target_false_alarm=target_false_alarm,
            image_threshold=image_threshold, pixel_threshold=pixel_threshold, min_good=min_images,
            resize=resize, threads=threads, dry_run=dry_run, sources=sources,
        )  # fmt: skip
        click.echo(dumps(result) if as_json else summary(result))
        if dry_run and not as_json:
            click.echo("dry run: the manifest was not changed")
