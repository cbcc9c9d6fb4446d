"""``tilead-export``: a training run to a verified ONNX bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tilead.cli._common import fail_on_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True, help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(run_dir: Path, output: Path, opset: int, overwrite: bool, quiet: bool) -> None:
    """Export one ONNX model per tile location, checked and hashed, with the manifest."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        from tilead.exporter.bundle import export_bundle

        result = export_bundle(run_dir, output, opset=opset, overwrite=overwrite, progress=not quiet)
        locs = result.manifest["locations"]
        size = sum(loc["bytes"] for loc in locs) / 2**20
        worst = max(result.manifest["source"]["parity_onnxruntime_vs_torch"].values())
        click.echo(f"bundle:     {result.bundle}")
        click.echo(f"locations:  {len(locs)} ONNX models, {size:.1f} MiB in all (opset {opset})")
        click.echo(f"parity:     ONNX Runtime vs PyTorch max difference {worst:.1e} of the map range")
        click.echo(f"time:       {result.seconds:.1f} s")
