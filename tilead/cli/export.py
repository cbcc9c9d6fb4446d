"""``tilead-export``: a training run to a verified ONNX bundle, and TensorRT engines for this GPU (``--trt``)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tilead.cli._common import CONTEXT, fail_on_errors, output_option, progress_option


@click.command(context_settings=CONTEXT)
@click.argument("source", metavar="RUN_OR_BUNDLE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_option("Bundle directory to write (for a run).")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True, help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines for this machine's GPU into the bundle.")
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8", "bf16", "int8_bf16"]), default="fp32",
    show_default=True,
    help="int8: the bundle's backbones quantized for the CPU (head FP32); fp16: TensorRT engines (--trt); bf16: "
         "PaDiM heads refit on OpenVINO's bf16 backbone features (shared_backbone; a CPU with bf16 units and "
         "openvino; run by the hybrid backend, docs/cpu_speed.md); int8_bf16: the backbone quantized as for int8, "
         "PaDiM heads refit on OpenVINO's features of that INT8 graph with the bf16 hint (as bf16 otherwise).",
)  # fmt: skip
@click.option(
    "--layout", type=click.Choice(["auto", "per_location", "shared_backbone"]), default="auto", show_default=True,
    help="shared_backbone: one backbone graph for every tile, a head per location (PaDiM, PatchCore; one copy "
         "of the backbone's weights, docs/cpu_speed.md); auto: the family's default, per_location with --trt.",
)  # fmt: skip
@click.option(
    "--parity-tolerance", type=click.FloatRange(0.0, 1e6, min_open=True), default=None,
    help="int8/bf16: largest difference from the FP32 eager map accepted on training tiles, relative to its range "
         "[1.0]. Runs fitted on a handful of tiles (nearly singular Gaussians) may need more; quality is judged by "
         "evaluation.",
)  # fmt: skip
@click.option(
    "--int8-weight-bits", type=click.IntRange(7, 8), default=None,
    help="int8/int8_bf16: INT8 weights in 7 bits (ONNX Runtime's reduce_range; no CPU's INT8 sums saturate, so the "
         "bundle runs alike with and without VNNI) or 8 (the full range: the bundle then runs only on CPUs that sum "
         "INT8 as this one does; the Predictor refuses it elsewhere) [7 for int8, 8 for int8_bf16; docs/cpu_speed.md].",
)  # fmt: skip
@click.option("--opt-batch", type=click.IntRange(1, 1024), default=1, show_default=True, help="Batch tuned for.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Largest batch.")
@click.option("--workspace-mib", type=click.IntRange(16, 1 << 20), default=2048, show_default=True)
@click.option("--rebuild", is_flag=True, help="Build the engines again even if the manifest lists them.")
@click.option(
    "--tf32", is_flag=True,
    help="Let TensorRT run FP32 layers in TF32 (faster on Ampere+, ~1e-3 relative error); off: FP32 is FP32.",
)  # fmt: skip
@progress_option
def main(
    source: Path,
    output: Path | None,
    opset: int,
    overwrite: bool,
    trt: bool,
    precision: str,
    layout: str,
    parity_tolerance: float | None,
    int8_weight_bits: int | None,
    opt_batch: int,
    max_batch: int,
    workspace_mib: int,
    rebuild: bool,
    tf32: bool,
    progress: bool,
) -> None:
    """Export RUN_OR_BUNDLE: a run to a bundle (-o), and with --trt engines into the bundle.

    Given a bundle (a folder with manifest.json), --trt builds its engines in place.
    """
    from tilead.runtime.bundle import refit_on_openvino

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    is_bundle = (source / "manifest.json").is_file()
    if is_bundle and not trt:
        raise click.UsageError(f"{source} is already a bundle; pass --trt to build its TensorRT engines")
    if not is_bundle and output is None:
        raise click.UsageError(f"{source} is a run folder: pass -o/--output BUNDLE_DIR for the bundle to write")
    if precision == "int8" and (is_bundle or trt):
        raise click.BadParameter("int8 quantizes a run's ONNX export (CPU); TensorRT engines take fp32 or fp16",
                                 param_hint="--precision")  # fmt: skip
    if refit_on_openvino(precision) and (is_bundle or trt):
        raise click.BadParameter(f"{precision} refits a run's heads for OpenVINO's bf16 backbone (CPU, "
                                 "shared_backbone); TensorRT engines take fp32 or fp16",
                                 param_hint="--precision")  # fmt: skip
    if parity_tolerance is not None and precision in ("fp32", "fp16"):
        raise click.BadParameter("applies to --precision int8, bf16 or int8_bf16 (FP32 graphs are checked to 1e-5)",
                                 param_hint="--parity-tolerance")  # fmt: skip
    if int8_weight_bits is not None and precision not in ("int8", "int8_bf16"):
        raise click.BadParameter("applies to --precision int8 or int8_bf16", param_hint="--int8-weight-bits")
    if tf32 and not trt:
        raise click.UsageError("--tf32 sets how TensorRT engines compute: add --trt")
    if layout == "shared_backbone" and trt:
        raise click.BadParameter("TensorRT engines need the per_location layout", param_hint="--layout")
    if opt_batch > max_batch:
        raise click.BadParameter(f"--opt-batch {opt_batch} exceeds --max-batch {max_batch}", param_hint="--opt-batch")
    with fail_on_errors():
        try:
            if trt:  # fail fast, before minutes of export, when TensorRT or the GPU is missing
                from tilead.exporter.engines import import_builder
                from tilead.runtime.backends.tensorrt_modules import require_gpu

                import_builder()
                require_gpu()
            bundle = source
            if not is_bundle:
                assert output is not None
                chosen = None if layout == "auto" else layout
                if trt and chosen is None:
                    chosen = "per_location"  # the TensorRT engines are built per model (whole graphs)
                bundle = _export(
                    source, output, opset, overwrite, progress, precision, chosen, parity_tolerance, int8_weight_bits
                )
            if trt:
                from tilead.exporter.engines import build_engines

                engine_set = build_engines(
                    bundle, precision=precision, opt_batch=opt_batch, max_batch=max_batch,
                    workspace_mib=workspace_mib, rebuild=rebuild, progress=progress, tf32=tf32,
                )  # fmt: skip
                count = len(engine_set.files) + (engine_set.thumbnail is not None)
                extra = " including the thumbnail's" if engine_set.thumbnail is not None else ""
                click.echo(f"engines:    {bundle / 'engines' / engine_set.key} ({count} engines{extra})")
        except RuntimeError as err:  # TensorRT, its builder or the GPU is missing; a build failed
            raise click.ClickException(str(err)) from err


def _export(
    run_dir: Path,
    output: Path,
    opset: int,
    overwrite: bool,
    progress: bool,
    precision: str = "fp32",
    layout: str | None = None,
    parity_tolerance: float | None = None,
    int8_weight_bits: int | None = None,
) -> Path:
    from tilead.exporter.bundle import export_bundle
    from tilead.exporter.quantize import INT8_PARITY_TOLERANCE
    from tilead.runtime.bundle import PRECISIONS
    from tilead.runtime.cpu_features import ARITHMETIC_NAMES

    onnx_precision = precision if precision in PRECISIONS else "fp32"  # fp16: the TensorRT engines only
    result = export_bundle(
        run_dir, output, opset=opset, overwrite=overwrite, progress=progress, precision=onnx_precision, layout=layout,
        int8_tolerance=INT8_PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance,
        int8_weight_bits=int8_weight_bits,
    )  # fmt: skip
    locs = result.manifest["locations"]
    files = result.manifest.get("models", locs)  # models shared by locations (grid.assignment): one file per model
    backbone = result.manifest.get("backbone")
    size = (sum(f["bytes"] for f in files) + (backbone["bytes"] if backbone else 0)) / 2**20
    worst = max(result.manifest["source"]["parity_onnxruntime_vs_torch"].values())
    click.echo(f"bundle:     {result.bundle}")
    shared = " + a shared backbone" if backbone else ""
    per = f" shared by {len(locs)} locations ({result.manifest['assignment']})" if "models" in result.manifest else ""
    click.echo(f"locations:  {len(files)} ONNX models{per}{shared}, {size:.1f} MiB in all (opset {opset})")
    click.echo(f"parity:     ONNX Runtime vs PyTorch max difference {worst:.1e} of the map range"
               + {"int8": " (INT8, on training tiles)",
                  "bf16": " (OpenVINO bf16 backbone vs FP32 eager, refit heads, on training tiles)",
                  "int8_bf16": " (OpenVINO INT8 backbone with the bf16 hint vs FP32 eager, refit heads, on training "
                               "tiles)"}.get(onnx_precision, ""))  # fmt: skip
    model = result.manifest["model"]
    if "int8_weight_bits" in model:
        bits = model["int8_weight_bits"]
        arithmetic = ARITHMETIC_NAMES.get(model.get("int8_arithmetic", ""))
        where = f"CPUs with {arithmetic}, as this one" if arithmetic else "CPUs that sum INT8 as this one does"
        click.echo(
            f"weights:    {bits}-bit INT8; " + ("runs alike on any x86 CPU" if bits == 7 else f"runs on {where}")
        )
    click.echo(f"time:       {result.seconds:.1f} s")
    return result.bundle
