"""Build one TensorRT engine per location from a bundle's ONNX (``tilead-export --trt``).

The exporter's side of TensorRT: the runtime (:mod:`tilead.runtime.backends.tensorrt`)
only loads and runs what this builds, and never imports this module.

Every location has the same architecture, so one timing cache serves them all:
the first build measures the tactics and the others reuse them. The cache is
saved next to the engines and reused by later builds of the same set.

Engines are built version-compatible with the lean runtime excluded from the
plan, so the small ``tensorrt_lean`` package can run them on the target. With
TensorRT 10, FP16 is a builder flag; TensorRT 11 builds strongly typed networks
only, so FP16 there means converting the ONNX to FP16 first
(:func:`fp16_onnx_bytes`, inputs and outputs kept float32).

Long builds resume: engines go to ``engines/<key>.partial/`` one atomic file at
a time, a rerun skips the locations already there, and the folder is renamed to
``engines/<key>/`` and listed in the manifest only when every location is built.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from tilead.atomic import atomic_write_bytes
from tilead.runtime.backends.tensorrt_modules import (
    TensorRTUnavailableError,
    major_version,
    missing_api,
    require_gpu,
)
from tilead.runtime.bundle import read_manifest, sha256_file, verify_files, write_manifest
from tilead.runtime.engines import PRECISIONS, EngineFile, EngineSet, engine_key

log = logging.getLogger("tilead.exporter.engines")

TIMING_CACHE = "timing.cache"

INSTALL_BUILDER = (
    "building engines needs the full TensorRT with its builder: pip install tensorrt-cu13 (or tensorrt-cu12) on "
    "the target machine, or JetPack's python3-libnvinfer on Jetson; the lean runtime cannot build"
)
# Enum members the builder sets, per TensorRT major version. TensorRT 11 builds
# strongly typed networks only: BuilderFlag has no FP16 (precision comes from the
# ONNX's types), so FP16 means an FP16 ONNX.
BUILDER_ENUMS: dict[int, tuple[tuple[str, str], ...]] = {
    10: (
        ("BuilderFlag", "FP16"),
        ("BuilderFlag", "TF32"),
        ("BuilderFlag", "VERSION_COMPATIBLE"),
        ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"),
        ("MemoryPoolType", "WORKSPACE"),
    ),
    11: (
        ("BuilderFlag", "TF32"),
        ("BuilderFlag", "VERSION_COMPATIBLE"),
        ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"),
        ("MemoryPoolType", "WORKSPACE"),
    ),
}
# Builder classes and their members (only in the full package).
BUILDER_API: tuple[tuple[str, str], ...] = (
    ("Builder", "create_network"),
    ("Builder", "create_builder_config"),
    ("Builder", "create_optimization_profile"),
    ("Builder", "build_serialized_network"),
    ("OnnxParser", "parse"),
    ("OnnxParser", "num_errors"),
    ("OnnxParser", "get_error"),
    ("IBuilderConfig", "set_flag"),
    ("IBuilderConfig", "clear_flag"),
    ("IBuilderConfig", "set_memory_pool_limit"),
    ("IBuilderConfig", "add_optimization_profile"),
    ("IBuilderConfig", "create_timing_cache"),
    ("IBuilderConfig", "set_timing_cache"),
    ("IBuilderConfig", "get_timing_cache"),
    ("IOptimizationProfile", "set_shape"),
)


def import_builder() -> ModuleType:
    """The full ``tensorrt`` module with its builder.

    Raises:
        TensorRTUnavailableError: If it is not installed or is not TensorRT 10 or 11.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(f"--trt needs the TensorRT builder ({err}): {INSTALL_BUILDER}") from None
    major = major_version(trt)
    if major not in BUILDER_ENUMS:
        raise TensorRTUnavailableError(
            f"tensorrt {trt.__version__}: tilead builds engines with TensorRT 10 or 11, got major version {major}"
        )
    missing = missing_api(trt, BUILDER_API + BUILDER_ENUMS[major])
    if missing:
        raise TensorRTUnavailableError(f"tensorrt {trt.__version__} lacks {', '.join(missing)}, which the builder uses")
    module: ModuleType = trt
    return module


def _float32_weights(model: Any) -> None:
    """Make a graph all-float32 in place: fp16 initializers that are cast to float32 become float32.

    tilead's exports store the large PaDiM weights in fp16 followed by a Cast;
    the FP16 converter expects a float32 graph, so those pairs become a float32
    initializer and an Identity first.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    halves = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to == TensorProto.FLOAT and node.input[0] in halves:
            tensor = halves[node.input[0]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
            node.op_type = "Identity"
            del node.attribute[:]
    del model.graph.value_info[:]  # recorded intermediate types may name fp16; shape inference redoes them


def fp16_onnx_bytes(path: Path) -> bytes:
    """The ONNX model at ``path`` with float tensors converted to FP16, inputs and outputs kept float32.

    Uses onnxconverter-common's converter (``pip install onnxconverter-common``).

    Raises:
        TensorRTUnavailableError: If onnxconverter-common is not installed.
    """
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"FP16 engines with TensorRT 11 need an FP16 ONNX, converted with onnxconverter-common ({err}): "
            "pip install onnxconverter-common"
        ) from None
    model = onnx.load(str(path))
    _float32_weights(model)
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    return bytes(converted.SerializeToString())


def _check_args(precision: str, opt_batch: int, max_batch: int, workspace_mib: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"batch profile: expected 1 <= opt ({opt_batch}) <= max ({max_batch})")
    if workspace_mib < 16:
        raise ValueError(f"workspace_mib: expected at least 16, got {workspace_mib}")


def _build_one(
    trt: Any,
    onnx_bytes: bytes,
    shape: tuple[int, int, int],
    *,
    precision: str,
    opt_batch: int,
    max_batch: int,
    workspace_mib: int,
    cache_bytes: bytes,
    logger: Any,
    tf32: bool = False,
) -> tuple[bytes, bytes]:
    """Build one engine; returns ``(plan, timing cache)``.

    Raises:
        RuntimeError: If the ONNX does not parse or the build fails (with the parser's errors).
    """
    major = major_version(trt)
    builder = trt.Builder(logger)
    flags = 0
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if major >= 11 else None
    if typed is not None:
        flags |= 1 << int(typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16" and major == 10:
        config.set_flag(trt.BuilderFlag.FP16)
    if not tf32:
        # TensorRT sets TF32 by default: FP32 convolutions and matmuls would round their inputs to 10 mantissa
        # bits, so an "fp32" engine would not match the FP32 ONNX the bundle was validated with.
        config.clear_flag(trt.BuilderFlag.TF32)
    config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (1, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT's builder returned no engine (see the TensorRT log above for why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(
    bundle: str | Path,
    *,
    precision: str = "fp32",
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mib: int = 2048,
    rebuild: bool = False,
    progress: bool = True,
    tf32: bool = False,
) -> EngineSet:
    """Build (or find) this GPU's engine set for a bundle and list it in the manifest.

    Args:
        bundle: Bundle directory (``tilead-export`` output).
        precision: ``fp32`` or ``fp16``.
        opt_batch: Batch size the optimization profile is tuned for.
        max_batch: Largest batch the engines take (profile minimum is 1).
        workspace_mib: Builder workspace limit in MiB.
        rebuild: Build again even when the manifest lists this set.
        progress: Show a progress bar.
        tf32: Let TensorRT run FP32 layers in TF32 (faster on Ampere and newer, about 1e-3 relative error);
            off by default, so FP32 engines compute in FP32. The engine key does not record it: pass
            ``rebuild`` when switching.

    Returns:
        The engine set (already listed in ``manifest.json``).

    Raises:
        TensorRTUnavailableError: Without the TensorRT builder or a usable GPU.
        BundleError: For a missing or modified bundle.
        RuntimeError: If TensorRT cannot parse or build a location's model.
    """
    _check_args(precision, opt_batch, max_batch, workspace_mib)
    root = Path(bundle)
    from tilead import __version__

    manifest = read_manifest(root, current_version=__version__)
    trt = import_builder()
    gpu, cc = require_gpu()
    verify_files(root, manifest)
    key = engine_key(gpu, cc, str(trt.__version__), precision, max_batch, [loc.sha256 for loc in manifest.locations])
    listed = {s.key: s for s in manifest.engine_sets}
    if key in listed and not rebuild and all((root / f.file).is_file() for f in listed[key].files):
        log.info("engines %s already built", key)
        return listed[key]
    engines = root / "engines"
    partial = engines / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    cache_path = partial / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    shape = (manifest.preprocessing.channels, *manifest.grid.tile_size)
    files = []
    start = time.perf_counter()
    bar = tqdm(manifest.locations, desc=f"TensorRT {precision}", unit="engine", disable=not progress)
    for loc in bar:
        target = partial / f"{loc.name}.engine"
        if not target.is_file() or rebuild:
            onnx_path = root / loc.file
            data = (
                fp16_onnx_bytes(onnx_path)
                if precision == "fp16" and major_version(trt) >= 11
                else onnx_path.read_bytes()
            )
            try:
                plan, cache_bytes = _build_one(
                    trt, data, shape, precision=precision, opt_batch=opt_batch, max_batch=max_batch,
                    workspace_mib=workspace_mib, cache_bytes=cache_bytes, logger=logger, tf32=tf32,
                )  # fmt: skip
            except RuntimeError as err:
                raise RuntimeError(f"location {loc.name} ({onnx_path}): {err}") from None
            atomic_write_bytes(target, plan)
            atomic_write_bytes(cache_path, cache_bytes)
        rel = f"engines/{key}/{loc.name}.engine"
        files.append(EngineFile(loc.name, rel, sha256_file(target), target.stat().st_size))
    final = engines / key
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    engine_set = EngineSet(
        key=key,
        gpu=gpu,
        compute_capability=cc,
        tensorrt=str(trt.__version__),
        precision=precision,
        batch=(1, opt_batch, max_batch),
        workspace_mib=workspace_mib,
        version_compatible=True,
        timing_cache=f"engines/{key}/{TIMING_CACHE}",
        files=tuple(files),
    )
    add_engine_set(root, engine_set)
    log.info("built %d engines in %.1f s under %s", len(files), time.perf_counter() - start, final)
    return engine_set


def add_engine_set(bundle: Path, engine_set: EngineSet) -> None:
    """List ``engine_set`` in the bundle's manifest (replacing a set with the same key), atomically."""
    data = dict(read_manifest(Path(bundle)).raw)  # digest checked: a hand edit is not laundered into a new digest
    sets = [s for s in data.get("engines", []) if s.get("key") != engine_set.key]
    sets.append(engine_set.to_dict())
    data["engines"] = sets
    write_manifest(Path(bundle), data)  # with a fresh manifest digest
