"""``tilead-train``: fit a tiled ensemble from a YAML config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import yaml

from tilead.cli._common import CONTEXT, fail_on_errors, output_option, parse_overrides, progress_option, set_option


@click.command(context_settings=CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="YAML config (configs/padim_bottle.yaml, patchcore_bottle.yaml, stfpm_bottle.yaml, ...).",
)
@output_option("Run folder.  [default: runs/<name>]")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --output; finished locations are kept.")
@set_option
@click.option(
    "--ray-address",
    default=None,
    help="Fit the locations as Ray tasks on this cluster (auto, HEAD:6379; sets train.backend=ray). "
    "The run folder and data must be on storage every node mounts.",
)
@click.option("--eval/--no-eval", "then_eval", default=False, help="Evaluate on the test set after training.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (with --set applied) as YAML and exit.")
@progress_option
def main(
    config_path: Path,
    output: Path | None,
    resume: bool,
    overrides: tuple[str, ...],
    ray_address: str | None,
    then_eval: bool,
    print_config: bool,
    progress: bool,
) -> None:
    """Fit one detector (model.family: padim, patchcore, stfpm) per tile location, then the validation statistics."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        from tilead.trainer.config import load_config
        from tilead.trainer.evaluation import evaluate
        from tilead.trainer.pipeline import train, validation_summary

        extra = parse_overrides(overrides)
        if ray_address is not None:
            extra.update({"train.backend": "ray", "train.ray_address": ray_address})
        cfg = load_config(config_path, extra)
        if print_config:
            click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
            return
        out = output if output is not None else Path("runs") / cfg.name
        result = train(cfg, out, resume=resume, progress=progress)
        click.echo(f"run:        {result.paths.root}")
        click.echo(f"locations:  {result.fitted_now} fitted now ({'resumed' if resume else 'new run'})")
        click.echo(f"stats:      {result.paths.stats} (normalization {result.stats.stage})")
        click.echo(f"validation: {validation_summary(result.paths.stats)}")
        click.echo(f"time:       {result.seconds:.1f} s")
        if then_eval:
            _print_eval(evaluate(result.paths.root, progress=progress).metrics)


def _print_eval(report: dict[str, Any]) -> None:
    m = report["metrics"]
    if report.get("good_only"):
        parts = [f"false alarms {int(m['false_alarms'])}/{int(m['good_images'])} ({m['false_alarm_rate']:.1%})"]
        for name in ("test_good", "holdout"):
            if f"good_images_{name}" in m:
                parts.append(
                    f"{name} {int(m[f'false_alarms_{name}'])}/{int(m[f'good_images_{name}'])} "
                    f"({m[f'false_alarm_rate_{name}']:.1%})"
                )
        click.echo(f"eval:       good images only: {'  '.join(parts)}")
        click.echo(yaml.safe_dump({"timings": report["timings"]}, sort_keys=False).rstrip())
        return
    click.echo(
        f"eval:       image AUROC {m['image_auroc']:.4f}  pixel AUROC {m['pixel_auroc']:.4f}  "
        f"AUPRO {m['aupro']:.4f}  image F1 {m['image_f1']:.4f}  pixel F1 {m['pixel_f1']:.4f}"
    )
    click.echo(yaml.safe_dump({"timings": report["timings"]}, sort_keys=False).rstrip())
