"""``tilead-bench``: latency and throughput of a bundle on this machine, optionally beside PyTorch.

Example:
    tilead-bench bundles/padim_bottle --batch 1,4 --iterations 50 --compare torch --json out/bench.json
    tilead-bench bundles/padim_bottle --backend tensorrt --device cuda --batch 1,4 --cuda-graphs compare
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from tilead.cli._common import fail_on_errors
from tilead.runtime.backends import REGISTRY, names

DEFAULT_ITERATIONS = 30


def parse_batches(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[int, ...]:
    """``--batch 1 --batch 4,8`` to ``(1, 4, 8)`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for value in values or ("1",):
        for item in value.split(","):
            item = item.strip()
            try:
                n = int(item)
            except ValueError:
                raise click.BadParameter(f"expected positive integers such as 1 or 1,4,8, got {item!r}") from None
            if not 1 <= n <= 1024:
                raise click.BadParameter(f"batch sizes must be between 1 and 1024, got {n}")
            if n not in out:
                out.append(n)
    return tuple(out)


def _read_images(paths: tuple[Path, ...], size: tuple[int, int], channels: int, resize: bool) -> list[np.ndarray]:
    """Decode ``--image`` files once (decoding is not timed), checking their size."""
    from tilead.imagefile import ImageFileError, read_image
    from tilead.runtime.image_resize import resize_uint8

    images = []
    for path in paths:
        try:
            image = read_image(path, gray=channels == 1)
        except ImageFileError as err:
            raise click.BadParameter(str(err), param_hint="--image") from None
        if image.shape[:2] != size:
            if not resize:
                raise click.BadParameter(
                    f"{path} is {image.shape[0]}x{image.shape[1]} (height x width); the bundle expects "
                    f"{size[0]}x{size[1]}; pass --resize to resize it once before timing",
                    param_hint="--image",
                )
            # the Predictor's own resize (what resize=True does inside the timed call)
            image = resize_uint8(image.reshape(*image.shape[:2], channels), size)
        images.append(image.reshape(size[0], size[1], channels))
    return images


def _bundle_facts(bundle: Path, manifest: Any) -> dict[str, Any]:
    grid = manifest.grid
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {
        "path": str(bundle),
        "family": manifest.model.get("family"),
        "grid": {
            "rows": grid.rows,
            "cols": grid.cols,
            "tile_size": list(grid.tile_size),
            "image_size": list(grid.image_size),
        },
        "map_size": list(manifest.map_size),
        "size_bytes": size,
        "size_mib": size / 2**20,
        "source_run": manifest.raw.get("source", {}).get("run"),
    }


def _notes(device: str, backend: str, location_workers: int, locations: int, cuda_graphs: str = "on") -> list[str]:
    notes = []
    if device == "cpu":
        notes.append("no host->device or device->host copies: the CPU route runs in host memory")
    elif backend == "tensorrt" and cuda_graphs == "compare":
        notes.append(
            "TensorRT backend, CUDA graphs on and off: whole-call latency of untimed calls (no per-stage "
            "breakdown: timing each stage would synchronize after every stage and hide what graphs save)"
        )
    elif backend == "tensorrt":
        notes.append(
            "TensorRT backend: a call without a CUDA graph is synchronized after every stage so each gets its "
            "own time (a little slower than an untimed call, which synchronizes once)"
            + (
                "; with CUDA graphs on, every query after the first of a batch size replays one graph "
                "(stage 'graph': tile, engines, untile, seams, normalize and the copies in one launch)"
                if cuda_graphs == "on"
                else ""
            )
        )
    else:
        notes.append(
            "ONNX Runtime's CUDA provider copies inside each session run: host->device and device->host "
            "time is part of 'inference'"
        )
    if location_workers > 1 and locations > 1:
        notes.append(
            f"{location_workers} locations run side by side: the per-location rows are each session's own run "
            "time and overlap, so they add up to more than 'inference, all locations'"
        )
    return notes


@dataclass(frozen=True)
class BenchSettings:
    """The command line, validated (field names are the click parameter names)."""

    bundle: Path
    backend: str
    device: str
    batches: tuple[int, ...]
    warmup: int
    iterations: int | None
    duration: float | None
    image_paths: tuple[Path, ...]
    resize: bool
    seed: int
    threads: int | None
    location_workers: int | None
    compare: str | None
    cuda_graphs: str
    run_dir: Path | None
    json_path: Path | None
    progress: bool | None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(list(names())),
    default="auto",
    show_default=True,
    help="Predictor backend.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--batch",
    "batches",
    multiple=True,
    callback=parse_batches,
    help="Images per query; a list (1,4,8) or the option repeated sweeps them.  [default: 1]",
)
@click.option("--warmup", type=click.IntRange(0, 10_000), default=3, show_default=True, help="Untimed queries first.")
@click.option(
    "--iterations",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help=f"Timed queries per batch size and route.  [default: {DEFAULT_ITERATIONS}]",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, 86_400, min_open=True),
    default=None,
    help="Seconds of timed queries per batch size instead of --iterations.",
)
@click.option(
    "--image",
    "image_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A real image to time (repeat for several, cycled through a batch); default: synthetic noise.",
)
@click.option("--resize", is_flag=True, help="Resize --image files of another size to the bundle's (not timed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic input.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads (default: all usable cores).")
@click.option(
    "--location-workers",
    type=click.IntRange(1, 1024),
    default=None,
    help="Locations run side by side (default: the Predictor's choice).",
)
@click.option(
    "--compare",
    type=click.Choice(["torch", "onnxruntime"]),
    default=None,
    help="Also time the same ensemble through PyTorch eager (needs the run folder and the trainer extra), "
    "or, with --backend openvino or tensorrt, through ONNX Runtime; alternating with tilead's route "
    "query by query.",
)
@click.option(
    "--cuda-graphs",
    "cuda_graphs",
    type=click.Choice(["on", "off", "compare"]),
    default="on",
    show_default=True,
    help="TensorRT backend: replay one CUDA graph per batch size (on), run stage by stage (off), or time both "
    "routes alternating query by query (compare; whole-call latency only).",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder for --compare torch (default: the bundle's source run).",
)
@click.option(
    "-o",
    "--output",
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every figure, the settings and the environment to this JSON file.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr (default: when stderr is a terminal).",
)
def main(**options: Any) -> None:
    """Time BUNDLE's Predictor: latency statistics, throughput, per-stage breakdown and memory."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    s = BenchSettings(**options)
    if s.iterations is not None and s.duration is not None:
        raise click.UsageError("--iterations and --duration are exclusive; give one")
    if s.iterations is None and s.duration is None:
        s = replace(s, iterations=DEFAULT_ITERATIONS)
    devices = REGISTRY["onnxruntime" if s.backend == "auto" else s.backend].devices
    if s.device not in devices:
        where = "the GPU: add --device cuda" if devices == ("cuda",) else f"--device {' or '.join(devices)}"
        raise click.UsageError(f"--backend {s.backend} runs on {where}")
    if s.compare == "onnxruntime" and s.backend in ("auto", "onnxruntime"):
        raise click.UsageError(
            "--compare onnxruntime compares another backend with ONNX Runtime; "
            "add --backend tensorrt (GPU) or --backend openvino (CPU)"
        )
    if s.cuda_graphs == "compare" and (s.backend != "tensorrt" or s.compare is not None):
        raise click.UsageError(
            "--cuda-graphs compare times the TensorRT backend with and without CUDA graphs: use it with "
            "--backend tensorrt --device cuda and without --compare"
        )
    if s.run_dir is not None and s.compare != "torch":
        raise click.UsageError("--run is only used by --compare torch")
    if s.resize and not s.image_paths:
        raise click.UsageError("--resize applies to --image files; none given")
    s = replace(s, progress=sys.stderr.isatty() if s.progress is None else s.progress)
    with fail_on_errors():
        try:
            report = _run(s)
        except RuntimeError as err:  # missing device / backend / trainer extra
            raise click.ClickException(str(err)) from err
    from tilead.benchmarking.report import render

    click.echo(render(report))
    if s.json_path is not None:
        from tilead.atomic import atomic_write_json

        atomic_write_json(s.json_path, report)
        click.echo(f"json          {s.json_path}")


def _run(s: BenchSettings) -> dict[str, Any]:
    from tilead.benchmarking.environment import cuda_free_memory_mib, environment, gpu_memory_used_mib, peak_rss_mib
    from tilead.benchmarking.report import batch_result, warnings_for
    from tilead.benchmarking.runner import make_batch, measure, warm_up
    from tilead.benchmarking.targets import PredictorTarget, Target, load_predictor, load_torch

    def predictor(backend: str, *, cuda_graphs: bool = True, stages: bool = True, label: str = "") -> PredictorTarget:
        return load_predictor(
            s.bundle, backend=backend, device=s.device, threads=s.threads, location_workers=s.location_workers,
            max_batch=max(s.batches), cuda_graphs=cuda_graphs, stages=stages, label=label,
        )  # fmt: skip

    graph_compare = s.cuda_graphs == "compare"
    free_before = cuda_free_memory_mib() if s.device == "cuda" else None
    main_target = predictor(
        s.backend, cuda_graphs=s.cuda_graphs != "off", stages=not graph_compare,
        label="CUDA graphs" if graph_compare else "",
    )  # fmt: skip
    targets: list[Target] = [main_target]
    assert main_target.predictor is not None
    manifest = main_target.predictor.manifest
    try:
        h, w = manifest.grid.image_size
        channels = main_target.predictor.channels
        if s.image_paths:
            images = _read_images(s.image_paths, (h, w), channels, s.resize)
            names = ", ".join(p.name for p in s.image_paths)
            described = f"{len(images)} image(s) decoded once before timing ({names}), {h}x{w}x{channels} uint8"
        else:
            rng = np.random.default_rng(s.seed)
            images = [rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)]
            described = f"synthetic uint8 noise {h}x{w}x{channels} (the bundle's image size), seed {s.seed}"
        prepared = {b: make_batch(images, b) for b in s.batches}
        for b in s.batches:
            # TensorRT with graphs: the first query of a batch size runs stage by stage and captures, so at least
            # two warm-up queries put replays, not the capture, into the timed ones.
            graphs_on = s.backend == "tensorrt" and s.cuda_graphs != "off"
            warm_up(main_target, prepared[b], max(s.warmup, 2) if graphs_on else s.warmup)
        free_after = cuda_free_memory_mib() if s.device == "cuda" else None
        rss_alone = peak_rss_mib()
        torch_before = "torch" in sys.modules  # tilead's route never imports it; proven in the report
        if s.compare == "torch":
            source = manifest.raw.get("source", {})
            run = s.run_dir if s.run_dir is not None else Path(str(source.get("run", "")))
            if not str(run) or not run.is_dir():
                raise click.UsageError(
                    f"--compare torch needs the run the bundle was exported from; the manifest names {run!s} "
                    "which does not exist here: pass --run RUN_DIR"
                )
            targets.append(load_torch(run, threads=s.threads, manifest=manifest))
        elif s.compare == "onnxruntime":
            targets.append(predictor("onnxruntime"))
        elif graph_compare:
            targets.append(predictor("tensorrt", cuda_graphs=False, stages=False, label="no CUDA graphs"))
        results = []
        for b in s.batches:
            for extra in targets[1:]:
                warm_up(extra, prepared[b], s.warmup)
            measured = measure(
                targets,
                prepared[b],
                iterations=s.iterations,
                duration=s.duration,
                progress=bool(s.progress),
                label=f"batch {b}",
            )
            results.append(batch_result(b, [t.name for t in targets], measured))
        gpu = gpu_memory_used_mib() if s.device == "cuda" else None
    finally:
        for t in targets:
            t.close()
    free_closed = cuda_free_memory_mib() if s.device == "cuda" else None
    device_memory = _device_memory(free_before, free_after, free_closed, main_target.info.get("device_memory_mib"))
    return {
        "tool": "tilead-bench",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "bundle": _bundle_facts(s.bundle, manifest),
        "input": {
            "kind": "images" if s.image_paths else "synthetic",
            "files": [str(p) for p in s.image_paths],
            "seed": None if s.image_paths else s.seed,
            "description": described,
        },
        "settings": {
            "backend": s.backend,
            "device": s.device,
            "batches": list(s.batches),
            "warmup": s.warmup,
            "iterations": s.iterations,
            "duration_s": s.duration,
            "threads": s.threads,
            "location_workers": s.location_workers,
            "compare": s.compare,
            "cuda_graphs": s.cuda_graphs if s.backend == "tensorrt" else None,
        },
        "targets": [
            {
                "name": t.name,
                "role": "tilead" if i == 0 else "compare",
                "load_s": t.load_s,
                "info": t.info,
            }
            for i, t in enumerate(targets)
        ],
        "results": results,
        "memory": {
            "peak_rss_mib_tilead": rss_alone,
            "peak_rss_mib_process": peak_rss_mib(),
            "torch_imported_for_tilead_route": torch_before,
            "gpu_memory_used_mib": gpu,
            "gpu_note": "device-wide use at the end of the run (NVML)"
            if gpu is not None
            else ("no GPU route" if s.device == "cpu" else "NVML (nvidia-ml-py) not available"),
            "device": device_memory,
        },
        "notes": _notes(
            s.device, s.backend, main_target.info["location_workers"], manifest.grid.num_locations, s.cuda_graphs
        ),
        "warnings": warnings_for(results),
        "environment": environment(),
    }


def _device_memory(
    before: float | None, after: float | None, closed: float | None, backend_mib: float | None
) -> dict[str, Any] | None:
    """Device memory around tilead's route (``cudaMemGetInfo`` on device 0), or None off the GPU."""
    if before is None and backend_mib is None:
        return None
    return {
        "free_before_load_mib": before,
        "free_after_warmup_mib": after,
        "free_after_close_mib": closed,
        "used_by_route_mib": None if before is None or after is None else before - after,
        "backend_reports_mib": backend_mib,
        "note": "free device memory before tilead's route was loaded, after its warm-up (graphs captured) and "
        "after every route was closed; the backend's own figure counts its buffers and the engines' shared "
        "context memory, not TensorRT's weights",
    }


if __name__ == "__main__":  # pragma: no cover
    main()
