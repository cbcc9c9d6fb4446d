"""``tilead-demo``: the built-in demo, synthetic data through train, export, runtime and evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tilead.cli._common import CONTEXT, fail_on_errors, output_option, parse_overrides, progress_option, set_option
from tilead.demo.synthetic import SyntheticSpec


@click.command(context_settings=CONTEXT)
@output_option(
    "Output folder (data, run, bundle, predictions, overlays, eval).", default=Path("out/demo"), legacy=("--out",)
)
@click.option(
    "--image-size",
    type=click.IntRange(256, 4096),
    default=SyntheticSpec().image_size,
    show_default=True,
    help="Synthetic image size; other sizes than the default get a 2x2 grid computed for them.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Run config [configs/padim_demo.yaml]; data.root is set to the generated data.",
)
@click.option("--overlays", type=click.IntRange(0, 1000), default=8, show_default=True, help="Overlay PNGs to draw.")
@set_option
@progress_option
def main(
    output: Path,
    image_size: int,
    config_path: Path | None,
    overlays: int,
    overrides: tuple[str, ...],
    progress: bool,
) -> None:
    """Generate synthetic inspection data, train the PaDiM tiled ensemble, export it, run it, evaluate it.

    A second run with the same settings reuses the data, the trained run and the bundle.
    """
    # Warnings and errors on the console; the trainer's INFO records go to the run's train.log only.
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[console])
    with fail_on_errors():
        from tilead.demo.pipeline import run, summary_lines

        try:
            result = run(
                output,
                SyntheticSpec(image_size=image_size),
                config=config_path,
                overlays=overlays,
                progress=progress,
                echo=click.echo,
                overrides=parse_overrides(overrides),
            )
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to continue (fitted locations are kept)", err=True)
            raise SystemExit(130) from None
        for line in summary_lines(result):
            click.echo(line)
