"""``tilead-eval``: evaluate a trained run on its test set."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tilead.cli._common import fail_on_errors
from tilead.cli.train import _print_eval


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="[RUN_DIR/eval]")
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Evaluate this run's exported bundle through runtime.Predictor instead of PyTorch [RUN_DIR/eval_bundle].",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(run_dir: Path, output: Path | None, bundle: Path | None, quiet: bool) -> None:
    """Image/pixel AUROC, F1 and AUPRO, per-image results and overlay PNGs."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        from tilead.trainer.pipeline import evaluate

        result = evaluate(run_dir, output, bundle=bundle, progress=not quiet)
        click.echo(f"metrics:    {result.out_dir / 'metrics.json'}")
        click.echo(f"overlays:   {result.out_dir / 'overlays'} ({len(result.overlays)} images)")
        _print_eval(result.metrics)
