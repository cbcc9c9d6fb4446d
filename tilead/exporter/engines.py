"""Build one TensorRT engine per model from a bundle's ONNX (``tilead-export --trt``).

The exporter's side of TensorRT: the runtime (:mod:`tilead.runtime.backends.tensorrt`)
only loads and runs what this builds, and never imports this module.

One engine per model: per location for ``one_to_one``, one per shared model
otherwise (``grid.assignment``), plus ``thumbnail.engine`` for a bundle with a
thumbnail branch (its input is the resized image, ``(C, size, size)``).
Every model has the same architecture, so one timing cache serves them all:
the first build measures the tactics and the others reuse them. The cache is
saved next to the engines and reused by later builds of the same set.

Engines are built version-compatible with the lean runtime excluded from the
plan, so the small ``tensorrt_lean`` package can run them on the target. With
TensorRT 10, FP16 is a builder flag; TensorRT 11 builds strongly typed networks
only, so FP16 there means converting the ONNX to FP16 first
(:func:`fp16_onnx_bytes`, inputs and outputs kept float32). Either way the
distance head (:func:`distance_nodes`) stays FP32: TensorRT 10 pins its layers'
precision, TensorRT 11 gets a graph converted around it.

Long builds resume: engines go to ``engines/<key>.partial/`` one atomic file at
a time, a rerun skips the models already there, and the folder is renamed to
``engines/<key>/`` and listed in the manifest only when every model is built.
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
    require_per_location,
)
from tilead.runtime.bundle import read_manifest, sha256_file, verify_files, write_manifest
from tilead.runtime.engines import PRECISIONS, THUMBNAIL_ENGINE, EngineFile, EngineSet, engine_key, engine_sources

log = logging.getLogger("tilead.exporter.engines")

TIMING_CACHE = "timing.cache"
HEAD_PREFIX = "head."
"""Parameters of a location model's distance head carry this prefix in the exported ONNX (module ``head``)."""
EMBEDDING_PREFIX = "embedding."
"""Parameters of a location model's feature extractor (module ``embedding``) carry this prefix."""

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
        ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"),
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
    ("INetworkDefinition", "get_layer"),
    ("ILayer", "set_output_type"),
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


def distance_nodes(model: Any) -> list[str]:
    """Names of the nodes that compute the distances of a location graph, which FP16 engines keep in FP32.

    A tilead location graph is the ``embedding`` module (a backbone whose
    parameters the export names ``embedding.*``) followed by the ``head``
    (PaDiM: difference to the mean, the inverse covariance product, the sum,
    the square root; PatchCore: nearest-neighbour distances; then the blur).
    Squared distances reach 1e4-1e6 on ordinary tiles, near or above FP16's
    largest finite value (65504), so an FP16 head returns inf. Listed: every
    node downstream of the last node that reads an ``embedding.*`` parameter
    (the feature resize, concatenation and selection, then the whole head),
    and every node that reads a ``head.*`` parameter or is downstream of one.
    The head's parameters cannot be relied on alone: the exporter's constant
    folding renames some of them. A graph with neither (STFPM) gives an empty
    list. Nodes without a name get a unique one first (in place), since the
    converter and TensorRT's layers go by node name.

    Args:
        model: An ``onnx.ModelProto`` (its unnamed nodes are named in place).

    Returns:
        Node names in graph order.
    """
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"tilead_node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    params = {t.name for t in model.graph.initializer}
    head = {p for p in params if p.startswith(HEAD_PREFIX)}
    backbone = {p for p in params if p.startswith(EMBEDDING_PREFIX)}
    readers = [i for i, n in enumerate(model.graph.node) if any(x in backbone for x in n.input)]
    last = readers[-1] if readers else None
    tainted: set[str] = set(model.graph.node[last].output) if last is not None else set()
    tainted.discard("")
    names: list[str] = []
    for i, node in enumerate(model.graph.node):  # ONNX graphs are topologically sorted
        if i != last and any(x in head or x in tainted for x in node.input):
            names.append(node.name)
            tainted.update(o for o in node.output if o)
    return names


def _own_initializers(model: Any, keep: set[str]) -> None:
    """Give the kept (FP32) nodes their own copy of every initializer they share with converted nodes, in place.

    The converter turns a shared initializer into FP16 for its converted readers
    and leaves the kept reader with an FP16 input beside FP32 ones (an invalid
    graph: e.g. the Clip after the distance sum shares its lower bound with the
    backbone's activations).
    """
    readers: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name in keep)
    shared = {t.name: t for t in model.graph.initializer if readers.get(t.name) == {True, False}}
    for name, tensor in shared.items():
        copy = model.graph.initializer.add()
        copy.CopyFrom(tensor)
        copy.name = f"{name}__fp32"
    for node in model.graph.node:
        if node.name in keep:
            for i, name in enumerate(node.input):
                if name in shared:
                    node.input[i] = f"{name}__fp32"


def fp16_onnx_bytes(path: Path) -> bytes:
    """The ONNX model at ``path`` converted to FP16 except its distance head; inputs and outputs kept float32.

    The backbone (the convolutions, where FP16 pays) becomes FP16; the nodes of
    :func:`distance_nodes` stay FP32, with Casts at the border, so TensorRT 11's
    strongly typed engine computes the distances in FP32 and cannot overflow.
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
    keep = distance_nodes(model)
    _own_initializers(model, set(keep))
    io_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _restore_output_types(converted, io_types)
    return bytes(converted.SerializeToString())


def _restore_output_types(model: Any, types: dict[str, int]) -> None:
    """Give every graph output its original element type again, in place.

    With ``keep_io_types`` the converter still casts an output that a kept (FP32)
    node computes down to FP16 and types the output FP16 (onnxconverter-common
    1.16); the final Cast is pointed back at the original type.

    Raises:
        RuntimeError: If an output changed type and no Cast produces it.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        want = types.get(out.name)
        if want is None or out.type.tensor_type.elem_type == want:
            continue
        node = producers.get(out.name)
        if node is None or node.op_type != "Cast":
            raise RuntimeError(f"FP16 conversion changed output {out.name!r} to another type and no Cast makes it")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = want
        out.type.tensor_type.elem_type = want


def fp32_layer_names(path: Path) -> frozenset[str]:
    """What a TensorRT 10 FP16 build keeps in FP32: the distance head's node, tensor and parameter names.

    The head is :func:`distance_nodes`; its parameters are the initializers those nodes read.

    TensorRT's ONNX parser names a node's layers after the node (a node made of
    several layers gives ``<node>_<suffix>`` names) and its last layer's output
    after the node's output; the head's parameters become constant layers named
    after their tensors. :func:`keep_layers_fp32` matches layers against these.
    """
    import onnx

    model = onnx.load(str(path))
    kept = set(distance_nodes(model))
    names = set(kept)
    names.update(o for n in model.graph.node if n.name in kept for o in n.output if o)
    params = {t.name for t in model.graph.initializer}
    names.update(x for n in model.graph.node if n.name in kept for x in n.input if x in params)
    return frozenset(names)


def _is_kept(layer: Any, names: frozenset[str]) -> bool:
    name = str(layer.name)
    if name in names or any(name.startswith(f"{n}_") for n in names):
        return True
    return any(str(layer.get_output(j).name) in names for j in range(layer.num_outputs))


def keep_layers_fp32(trt: Any, network: Any, config: Any, names: frozenset[str]) -> list[str]:
    """TensorRT 10 with the FP16 flag: pin the distance head's layers to FP32 (issue #18, item 3).

    Sets each matching layer's precision and output types to float32 and the
    builder flag ``OBEY_PRECISION_CONSTRAINTS``, so the builder cannot choose
    FP16 kernels for the squared distances (which exceed FP16's 65504).

    Args:
        trt: The ``tensorrt`` module.
        network: The parsed network.
        config: The builder config.
        names: :func:`fp32_layer_names` of the location's ONNX.

    Returns:
        Names of the layers pinned to FP32.

    Raises:
        RuntimeError: If ``names`` is not empty and no layer matches (the parser named layers differently).
    """
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _is_kept(layer, names):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(str(layer.name))
    if names and not pinned:
        raise RuntimeError(
            "no TensorRT layer matches the distance head's ONNX nodes, so it cannot be kept in FP32 "
            f"(looked for {', '.join(sorted(names)[:5])}, ...)"
        )
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


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
    fp32_names: frozenset[str] = frozenset(),
) -> tuple[bytes, bytes]:
    """Build one engine; returns ``(plan, timing cache)``.

    With TensorRT 10 and ``fp16`` the layers named by ``fp32_names`` stay FP32 (:func:`keep_layers_fp32`).

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
        keep_layers_fp32(trt, network, config, fp32_names)
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
    require_per_location(root, manifest)
    trt = import_builder()
    gpu, cc = require_gpu()
    verify_files(root, manifest)
    branch = manifest.thumbnail
    small = None if branch is None else branch.file
    sources = engine_sources(manifest.models, small)
    channels = manifest.preprocessing.channels
    shapes = [(channels, *manifest.grid.tile_size)] * len(manifest.models)
    if branch is not None and small is not None:  # the thumbnail model, last, takes the resized image
        shapes.append((channels, branch.size, branch.size))
    key = engine_key(gpu, cc, str(trt.__version__), precision, max_batch, [f.sha256 for f in sources])
    listed = {s.key: s for s in manifest.engine_sets}
    if key in listed and not rebuild and all((root / f.file).is_file() for f in listed[key].all_files):
        log.info("engines %s already built", key)
        return listed[key]
    engines = root / "engines"
    partial = engines / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    cache_path = partial / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    files = []
    start = time.perf_counter()
    bar = tqdm(
        list(zip(sources, shapes, strict=True)), desc=f"TensorRT {precision}", unit="engine", disable=not progress
    )
    for model, shape in bar:
        target = partial / f"{model.name}.engine"
        if not target.is_file() or rebuild:
            onnx_path = root / model.file
            major = major_version(trt)
            data = fp16_onnx_bytes(onnx_path) if precision == "fp16" and major >= 11 else onnx_path.read_bytes()
            fp32_names = fp32_layer_names(onnx_path) if precision == "fp16" and major == 10 else frozenset()
            try:
                plan, cache_bytes = _build_one(
                    trt, data, shape, precision=precision, opt_batch=opt_batch, max_batch=max_batch,
                    workspace_mib=workspace_mib, cache_bytes=cache_bytes, logger=logger, tf32=tf32,
                    fp32_names=fp32_names,
                )  # fmt: skip
            except RuntimeError as err:
                kind = "model" if manifest.shared_models else "location"
                what = "the thumbnail model" if model.name == THUMBNAIL_ENGINE else f"{kind} {model.name}"
                raise RuntimeError(f"{what} ({onnx_path}): {err}") from None
            atomic_write_bytes(target, plan)
            atomic_write_bytes(cache_path, cache_bytes)
        rel = f"engines/{key}/{model.name}.engine"
        files.append(EngineFile(model.name, rel, sha256_file(target), target.stat().st_size))
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
        files=tuple(files[: len(manifest.models)]),
        thumbnail=files[-1] if small is not None else None,
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
