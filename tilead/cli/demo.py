"""``tilead-demo``: the built-in demo on synthetic data."""

from __future__ import annotations

from pathlib import Path

import click

from tilead.demo.synthetic import SyntheticSpec


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--image-size", type=click.IntRange(256, 4096), default=1024, show_default=True)
def main(out_dir: Path, image_size: int) -> None:
    """Generate synthetic inspection data and run it through the tilead runtime."""
    from tilead.demo.pipeline import run

    result = run(out_dir, SyntheticSpec(image_size=image_size))
    m = result.metrics
    click.echo(f"model:         {m['model']}")
    click.echo(f"grid:          {m['locations']} locations {m['grid']}")
    click.echo(f"image AUROC:   {m['image_auroc']:.3f}   pixel AUROC: {m['pixel_auroc']:.3f}")
    click.echo(f"runtime:       {m['seconds_per_image'] * 1e3:.0f} ms per image (tile + model + merge + normalize)")
    click.echo(f"data:          {result.out_dir / 'data'}")
    click.echo(f"overlays:      {result.out_dir / 'overlays'} ({len(result.overlays)} images)")
    click.echo(f"metrics:       {result.out_dir / 'metrics.json'}")
