"""``tilead eval``: evaluate a trained run on its test set."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tilead.cli._common import CONTEXT, fail_on_errors, output_option, parse_overrides, progress_option, set_option
from tilead.cli.train import _print_eval


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_option("Output folder.  [default: RUN_DIR/eval, RUN_DIR/eval_bundle with --bundle]")
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Evaluate this run's exported bundle through runtime.Predictor instead of PyTorch.",
)
@click.option(
    "--report",
    "report",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Also write a self-contained HTML report (curves, histograms, confusion, gallery).  "
    "[default PATH: OUTPUT/report.html]",
)
@set_option
@progress_option
def main(
    run_dir: Path,
    output: Path | None,
    bundle: Path | None,
    report: str | None,
    overrides: tuple[str, ...],
    progress: bool,
) -> None:
    """Image/pixel AUROC, F1 and AUPRO, per-image results and overlay PNGs (and, with --report, an HTML page).

    --set overrides the run's eval.* keys (and test-set keys such as data.max_test_images).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        from tilead.trainer.evaluation import evaluate

        page: bool | Path = False if report is None else Path(report) if report else True
        result = evaluate(
            run_dir, output, bundle=bundle, progress=progress, overrides=parse_overrides(overrides), report_page=page
        )
        click.echo(f"metrics:    {result.out_dir / 'metrics.json'}")
        if page is not False:
            click.echo(f"report:     {result.out_dir / 'report.html' if page is True else page}")
        click.echo(f"overlays:   {result.out_dir / 'overlays'} ({len(result.overlays)} images)")
        _print_eval(result.metrics)
