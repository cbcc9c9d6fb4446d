"""A training run to a bundle directory, written atomically.

Everything is written into a temporary directory beside the target; only when
every location is exported, checked (``onnx.checker``, ONNX Runtime vs eager
PyTorch) and hashed, and the manifest is written, is the directory renamed
into place. An interrupted or failed export leaves no half bundle behind.

Stale temporaries. The temporary directory is ``.<name>.<random>.partial``
and holds an ``.owner`` file (``{"pid", "host"}``) written first. A process
killed outright (``kill -9``, power loss) cannot remove it, so the next export
to the same destination removes every ``.<name>.*.partial`` directory whose
owner is gone: same host and the pid no longer running, or no owner file and
untouched for :data:`STALE_SECONDS`. Directories of live exports, of other
hosts (shared disks) and anything not of that naming pattern are left alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import tilead
from tilead.exporter.bf16 import Bf16Backbone, bf16_facts, check_bf16_export, require_bf16_cpu
from tilead.exporter.onnx_export import (
    DEFAULT_OPSET,
    MapAndScore,
    check_onnx,
    compare_with_eager,
    export_like,
    export_location,
)
from tilead.exporter.quantize import (
    INT8_PARITY_TOLERANCE,
    check_precision,
    check_weight_bits,
    compare_int8,
    default_weight_bits,
    quantize_location,
    quantizes_backbone,
    refit_padim_head,
    weights_fact,
)
from tilead.exporter.shared_backbone import choose_layout, export_shared, refit_padim
from tilead.runtime.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    SCORE_NAME,
    location_files,
    model_files,
    refit_on_openvino,
    sha256_file,
    write_manifest,
)
from tilead.runtime.cpu_features import int8_arithmetic
from tilead.runtime.files import LocationFile
from tilead.runtime.preprocess import uint8_tiles_fit
from tilead.runtime.thumbnail import THUMBNAIL_FILE, THUMBNAIL_NAME
from tilead.trainer.checkpoints import load_models
from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample, discover
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.detectors.padim.config import PadimConfig
from tilead.trainer.model_table import run_assignment
from tilead.trainer.run import Run
from tilead.trainer.splits import holdout_split, make_splits
from tilead.trainer.thumbnail import load_thumbnail_model, validated_branch
from tilead.trainer.tiles import LocationTiles

log = logging.getLogger("tilead.exporter")
PARITY_TOLERANCE = 1e-5  # max abs ONNX-vs-eager difference, relative to the map's range
OWNER = ".owner"
STALE_SECONDS = 3600.0  # a .partial without an owner file older than this is stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(folder: Path, now: float) -> bool:
    try:
        owner = json.loads((folder / OWNER).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return now - folder.stat().st_mtime > STALE_SECONDS
        except OSError:
            return False
    return host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temporaries of killed exports to ``out`` (see the module docstring).

    Args:
        out: The bundle destination.

    Returns:
        The directories removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    now = time.time()
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.partial")):
        if folder.is_symlink() or not folder.is_dir() or not _is_stale(folder, now):
            continue
        log.warning("removing %s, left by an export that was killed", folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote."""

    bundle: Path
    manifest: dict[str, Any]
    seconds: float


def export_bundle(
    run_dir: Path | Run,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "fp32",
    calibration_images: int = 32,
    int8_tolerance: float = INT8_PARITY_TOLERANCE,
    layout: str | None = None,
    int8_weight_bits: int | None = None,
) -> ExportResult:
    """Export a trained run as a bundle.

    Args:
        run_dir: A finished training run (its folder, or the opened :class:`~tilead.trainer.run.Run`).
        out: Bundle directory to create.
        opset: ONNX opset (>= 17).
        overwrite: Replace an existing bundle at ``out``.
        progress: Show a progress bar.
        precision: ``fp32``, or ``int8``: each location's backbone statically
            quantized (QDQ, per-channel weights, calibrated on that location's
            training tiles), its head kept FP32 (:mod:`tilead.exporter.quantize`),
            or ``bf16`` (PaDiM, ``shared_backbone``): FP32 graphs whose heads are refit on
            OpenVINO's bf16 backbone features, for the ``hybrid`` backend (:mod:`tilead.exporter.bf16`),
            or ``int8_bf16``: the backbone quantized as for ``int8``, the heads refit on the features
            OpenVINO computes from that INT8 graph with the bf16 hint (``hybrid`` backend too).
        calibration_images: With ``int8`` and ``int8_bf16``: training images (evenly spaced over
            the run's fit images) whose tiles calibrate each location.
        int8_tolerance: With ``int8`` (and ``bf16``, ``int8_bf16``): the largest INT8-vs-eager map difference
            accepted (relative to the map's range on training tiles); recorded in the manifest.
        layout: ``per_location`` (each location's full graph), ``shared_backbone``
            (one backbone graph, a head per location: :mod:`tilead.exporter.shared_backbone`),
            or None for the family's default (:data:`tilead.exporter.shared_backbone.DEFAULT_LAYOUT`).
        int8_weight_bits: With ``int8`` and ``int8_bf16``: 8, or 7 (ONNX Runtime's ``reduce_range``: no CPU's
            INT8 sums saturate, so the bundle runs the same on CPUs with and without VNNI,
            :mod:`tilead.runtime.cpu_features`); None: :func:`~tilead.exporter.quantize.default_weight_bits`
            (7 for ``int8``). Recorded as ``model.int8_weight_bits``; ``int8`` bundles also record this CPU's
            INT8 arithmetic (``model.int8_arithmetic``), which the Predictor checks for 8-bit weights.

    Returns:
        The bundle path, its manifest and the time taken.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is off.
        FileNotFoundError: If the run is not finished.
        RuntimeError: If a location's ONNX output differs from the eager model.
        ValueError: For an unknown precision, a calibration_images below 1, int8, bf16 or int8_bf16 for a family
            other than padim, bf16 or int8_bf16 with a per_location layout, or a layout the run cannot have.
        RuntimeError: For bf16 or int8_bf16 without OpenVINO or on a CPU without bfloat16 units.
    """
    check_precision(precision)
    if int8_weight_bits is not None and not quantizes_backbone(precision):
        raise ValueError(f"int8_weight_bits {int8_weight_bits}: applies to int8 and int8_bf16, not {precision!r}")
    int8_weight_bits = check_weight_bits(
        default_weight_bits(precision) if int8_weight_bits is None else int8_weight_bits
    )
    arithmetic = int8_arithmetic() if precision == "int8" else None
    if calibration_images < 1:
        raise ValueError(f"calibration_images: expected 1 or more, got {calibration_images}")
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    cfg = run.config
    if precision == "int8" and cfg.model.family != "padim":
        raise ValueError(
            f"precision int8: implemented for padim runs (its Gaussians are refit on the INT8 backbone's features); "
            f"this run's model is {cfg.model.family!r}, whose FP32-fitted head would not match: export fp32"
        )
    if precision == "int8" and cfg.model.thumbnail is not None:
        raise ValueError(
            "precision int8: not implemented for runs with a thumbnail branch (model.thumbnail; its model would need "
            "its own calibration and PaDiM refit); export fp32"
        )
    # bf16, int8_bf16: heads refit on OpenVINO's bf16-hinted backbone; int8, int8_bf16: the backbone quantized.
    openvino_refit, quantized = refit_on_openvino(precision), quantizes_backbone(precision)
    if openvino_refit:  # before minutes of work: the family, layout, OpenVINO and the CPU's bf16 units
        layout = check_bf16_export(cfg.model.family, layout, cfg.model.thumbnail is not None, precision)
        require_bf16_cpu(precision)
    layout = choose_layout(layout, cfg.model.family, cfg.postprocess.image_score)
    stats = run.stats
    grid = run.grid
    run.backbone.to(memory_format=torch.contiguous_format)  # in place: the models below are traced on it
    prep = run.preprocessing
    # bf16, int8_bf16: the backbone takes uint8 tiles and normalizes them itself (runtime and refit alike), where the
    # grid cuts pixels as they are (not resize); the manifest says so (model.backbone_input), older bundles keep floats.
    uint8_tiles = uint8_tiles_fit(grid)
    with_score = cfg.postprocess.image_score == "detector"

    def graph(model: LocationModel) -> torch.nn.Module:
        # With the detector's image score deployed the graph gets a second output, checked like the map.
        return MapAndScore(model) if with_score else model

    # One graph per model: per location, or per group of locations sharing one (grid.assignment).
    table = run_assignment(cfg, run.paths, grid)
    if table.transforms and (layout == "shared_backbone" or precision != "fp32"):
        raise ValueError(
            f"{'layout shared_backbone' if layout == 'shared_backbone' else 'precision int8'}: not implemented for "
            "runs whose locations are oriented (grid.assignment cluster with orient: each location's tiles are "
            "transformed before its model, which the shared backbone graph and the INT8 calibration do not do "
            "yet); export per_location fp32"
        )
    groups = table.groups
    models = [graph(m) for m in load_models(cfg, run.paths, grid, run.backbone, table)]
    # The detector may export a faster variant (PaDiM: the Mahalanobis form on block rows, fewer bytes of
    # the memory-bound per-position matrices); its ONNX output is checked against the plain eager model below.
    variants = load_models(cfg, run.paths, grid, run.backbone, table, export=True, with_score=with_score)
    exported = [graph(m) for m in variants]
    detector = run.detector
    tile_shape = (prep.channels, *grid.tile_size)
    # bf16: the parity check's tiles come from one image (nothing calibrated); the heads are refit on every fit image.
    calibration = _calibration_samples(cfg, calibration_images if quantized else 1) if precision != "fp32" else ()
    fit_samples = (
        holdout_split(make_splits(cfg, discover(cfg.data)).fit, detector.holdout_fraction, cfg.seed)[0]
        if calibration
        else []
    )
    quant_info: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp creates 0700
        entries = []
        parity = {}
        backbone_entry: dict[str, Any] | None = None
        native_entries: list[dict[str, Any]] = []
        if layout == "shared_backbone":

            def location_batches(index: int, samples: Any = calibration) -> list[np.ndarray]:
                name = table.names[index]
                tiles = LocationTiles(cfg, samples, grid, prep, groups[index], name)
                return [np.ascontiguousarray(t.numpy()) for t in tiles]

            def refit_head(index: int, session: Any, head: torch.nn.Module) -> tuple[torch.nn.Module, int]:
                eps = cfg.model.covariance_eps if isinstance(cfg.model, PadimConfig) else 0.0
                return refit_padim(session, head, location_batches(index, fit_samples), float(eps))

            shared = export_shared(
                tmp, grid, tile_shape, models, exported, opset=opset, tolerance=PARITY_TOLERANCE,
                calibration=location_batches if calibration else None,
                refit=refit_head if calibration and cfg.model.family == "padim" else None,
                int8_tolerance=int8_tolerance, weight_bits=int8_weight_bits,
                progress=lambda it: tqdm(list(it), desc="export", unit="loc", disable=not progress),
                names=table.names, files=model_files(table.num_models, layout) if table.shared else None,
                bf16=partial(Bf16Backbone, preprocessing=prep, tile=grid.tile_size, uint8=uint8_tiles)
                if openvino_refit else None,
                quantize_bf16=openvino_refit and quantized,
            )  # fmt: skip
            entries, parity, backbone_entry = shared.entries, shared.parity, shared.backbone
            native_entries = shared.native
            if openvino_refit:
                int8_facts = {
                    "weights": weights_fact(int8_weight_bits), "activations": "uint8 (min/max calibration)",
                    "calibration_images": len(calibration),
                } if quantized else {}  # fmt: skip
                quant_info = {
                    **bf16_facts(precision), **int8_facts, **shared.quantization, "parity_tolerance": int8_tolerance,
                    "parity": "OpenVINO bf16 backbone + ONNX Runtime refit head vs the FP32 eager model",
                }  # fmt: skip
            elif calibration:
                quant_info = {
                    "format": "QDQ", "weights": weights_fact(int8_weight_bits),
                    "activations": "uint8 (min/max calibration)", **shared.quantization,
                    "calibration_images": len(calibration),
                    "parity_tolerance": int8_tolerance, "scope": "the shared backbone graph; heads FP32",
                    "normalization": "the FP32 run's statistics (not recomputed on INT8 maps)",
                }  # fmt: skip
        else:
            files = model_files(table.num_models) if table.shared else location_files(grid)
            bar = tqdm(list(zip(table.names, files, models, exported, strict=True)), desc="export",
                       unit="loc", disable=not progress)  # fmt: skip
            template: tuple[Path, torch.nn.Module] | None = None
            for index, (name, rel, model, export_model) in enumerate(bar):
                target = tmp / rel
                # The first location is traced; the others reuse its graph with their own weights when that is safe.
                reused = template is not None and export_like(template[0], template[1], export_model, target)
                if not reused:
                    export_location(export_model, tile_shape, target, opset=opset)
                    template = template or (target, export_model)
                check_onnx(target)
                diff = compare_with_eager(model, target, tile_shape)
                if reused and diff > PARITY_TOLERANCE:
                    log.warning("location %s: the reused graph differs by %.1e; exporting it afresh", name, diff)
                    export_location(export_model, tile_shape, target, opset=opset)
                    check_onnx(target)
                    diff = compare_with_eager(model, target, tile_shape)
                check_parity(diff, f"location {name}")
                if calibration:  # INT8: quantize the FP32 graph just written and checked, then check it on real tiles
                    batches = [
                        np.ascontiguousarray(t.numpy())
                        for t in LocationTiles(cfg, calibration, grid, prep, groups[index], name)
                    ]
                    info = quantize_location(target, target, batches, weight_bits=int8_weight_bits)
                    refit = 0
                    if isinstance(cfg.model, PadimConfig):  # the Gaussians fitted again on the INT8 backbone's features
                        head = getattr(export_model, "model", export_model).head
                        fit_tiles = LocationTiles(cfg, fit_samples, grid, prep, groups[index], name)
                        arrays = (np.ascontiguousarray(t.numpy()) for t in fit_tiles)
                        refit = refit_padim_head(target, head, arrays, float(cfg.model.covariance_eps))
                    check_onnx(target)
                    diff = compare_int8(model, target, batches[0])
                    log.info("location %s: INT8 differs from eager by %.1e of the map range", name, diff)
                    if diff > int8_tolerance:
                        raise RuntimeError(
                            f"location {name}: the INT8 graph differs from the eager model by {diff:.2e} of the map "
                            f"range on training tiles (INT8 tolerance {int8_tolerance})"
                        )
                    quant_info = {
                        "format": "QDQ", "weights": weights_fact(int8_weight_bits),
                        "activations": "uint8 (min/max calibration)", "quantized_nodes": info.backbone_nodes,
                        "fp32_nodes": info.fp32_nodes,
                        "calibration_images": len(calibration), "parity_tolerance": int8_tolerance,
                        "head_refit_tiles": refit,
                        "normalization": "the FP32 run's statistics (not recomputed on INT8 maps)",
                    }  # fmt: skip
                parity[name] = diff
                entries.append(
                    {"name": name, "file": rel, "sha256": sha256_file(target), "bytes": target.stat().st_size}
                )
                log.info("exported %s (%.1f MiB, parity %.1e)", name, target.stat().st_size / 2**20, diff)
        thumbnail_entry = None
        if cfg.model.thumbnail is not None:
            thumbnail_entry, parity[THUMBNAIL_NAME] = export_thumbnail(tmp, run, opset=opset)
        h, w = detector.map_size
        post = cfg.postprocess.processor(grid, stats)  # what the Predictor rebuilds from the manifest
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tilead_version": tilead.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "grid": grid.to_dict(),
            "preprocessing": prep.to_dict(),
            "model": {
                "family": cfg.model.family,
                "backbone": cfg.model.backbone.name,
                "output_stride": detector.output_stride,
                "map_size": [h, w],
                "input": INPUT_NAME,
                "output": OUTPUT_NAME,
                **({"score_output": SCORE_NAME} if with_score else {}),
                "opset": opset,
                "dtype": "float32",
                "precision": precision,
                **({"int8_weight_bits": int8_weight_bits} if quantized else {}),
                **({"int8_arithmetic": arithmetic} if arithmetic is not None else {}),
                **({"backbone_input": "uint8"} if openvino_refit and uint8_tiles else {}),
                **detector.manifest_info(),
            },
            **(
                {
                    "assignment": table.mode,
                    "models": entries,
                    "locations": [
                        {
                            "name": loc,
                            "model": table.names[m],
                            **({"transform": table.transform(i)} if table.transforms else {}),
                        }
                        for i, (loc, m) in enumerate(zip(grid.location_names(), table.location_model, strict=True))
                    ],
                }
                if table.shared
                else {"locations": entries}
            ),
            **({"layout": layout, "backbone": backbone_entry} if backbone_entry is not None else {}),
            **({"native_heads": native_entries} if native_entries else {}),
            **({"thumbnail": thumbnail_entry} if thumbnail_entry is not None else {}),
            "postprocess": post.manifest_section(),
            "normalization": stats.to_dict(),
            "source": {
                "run": str(run.root.resolve()),
                "config": cfg.name,
                "fit_key": run.fit_key,
                "validation": run.record.splits,
                "parity_onnxruntime_vs_torch": parity,
                **({"quantization": quant_info} if quant_info else {}),
            },
        }
        manifest = write_manifest(tmp, manifest)  # adds manifest_sha256, the digest read_manifest checks
        (tmp / OWNER).unlink()
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, manifest, time.perf_counter() - start)


def check_parity(diff: float, what: str) -> None:
    """Refuse an ONNX graph whose output differs from its eager model by more than :data:`PARITY_TOLERANCE`.

    Args:
        diff: The largest ONNX-vs-eager difference, relative to the map's range.
        what: The graph, for the message (``location r0c0``).

    Raises:
        RuntimeError: Beyond the tolerance.
    """
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(
            f"{what}: ONNX Runtime differs from the eager model by {diff:.2e} of the map range "
            f"(tolerance {PARITY_TOLERANCE:.0e})"
        )


def export_thumbnail(tmp: Path, run: Run, *, opset: int) -> tuple[dict[str, Any], float]:
    """Write ``thumbnail.onnx`` (checked against the eager thumbnail model) and its manifest entry.

    Args:
        tmp: The bundle being written.
        run: The run, with ``model.thumbnail`` in its config.
        opset: ONNX opset.

    Returns:
        The manifest's ``thumbnail`` entry and the ONNX-vs-eager difference (relative to the map's range).

    Raises:
        ValueError: If the run's validation chose no thumbnail branch of the configured size.
        RuntimeError: If the ONNX output differs from the eager model beyond :data:`PARITY_TOLERANCE`.
    """
    cfg, paths, extractor, prep = run.config, run.paths, run.backbone, run.preprocessing
    assert cfg.model.thumbnail is not None
    branch = validated_branch(paths, cfg.model.thumbnail.size)
    eager = load_thumbnail_model(cfg, paths, extractor)
    variant = load_thumbnail_model(cfg, paths, extractor, export=True)
    target = tmp / THUMBNAIL_FILE
    shape = (prep.channels, branch.size, branch.size)
    export_location(variant, shape, target, opset=opset)
    check_onnx(target)
    diff = compare_with_eager(eager, target, shape)
    check_parity(diff, "the thumbnail model")
    file = LocationFile(THUMBNAIL_NAME, THUMBNAIL_FILE, sha256_file(target), target.stat().st_size)
    log.info("exported the thumbnail model (%d px, %.1f MiB, parity %.1e)", branch.size, file.bytes / 2**20, diff)
    return dataclasses.replace(branch, file=file).to_dict(), diff


def _calibration_samples(cfg: RunConfig, limit: int) -> tuple[Sample, ...]:
    """At most ``limit`` of the run's fit images, evenly spaced (the first included)."""
    fit = make_splits(cfg, discover(cfg.data)).fit
    if not fit:
        raise ValueError(f"INT8 calibration: the run's data ({cfg.data.root}) has no training images")
    picks = np.unique(np.linspace(0, len(fit) - 1, num=min(limit, len(fit))).round().astype(int))
    return tuple(fit[i] for i in picks)
