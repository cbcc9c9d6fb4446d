"""The OpenVINO backend (CPU): each location's ONNX model compiled by OpenVINO's CPU plugin.

``pip install 'tilead[openvino]'`` (the ``openvino`` package from PyPI). The
models are read from the bytes the Predictor hands over (no second read of the
files) and compiled once, with a dynamic batch dimension, for:

* ``PERFORMANCE_HINT`` ``LATENCY`` (one stream per compiled model: one call at a time is fastest),
  except the shared backbone, whose calls the location workers share: one stream per worker
  (:func:`stream_config`), else OpenVINO would run their calls one at a time,
* ``INFERENCE_NUM_THREADS`` ``threads // location_workers``, like ONNX Runtime's
  intra-op threads, with locations side by side on worker threads,
* ``INFERENCE_PRECISION_HINT`` ``f32``: on CPUs with bfloat16 units OpenVINO
  would otherwise compute in bf16, far from the exported graph's results,
* ``ENABLE_CPU_PINNING`` off: several compiled models share the cores.

A bf16 bundle (``tilead-export --precision bf16``: heads refit on bf16 features) always
has its backbone compiled in bf16 here (refused on a CPU without bf16 units); the
``hybrid`` backend (:mod:`tilead.runtime.backends.hybrid`: OpenVINO backbone, ONNX
Runtime heads) is faster and lighter for it and is what ``backend="auto"`` picks.

With ``bf16_backbone`` (``Predictor(bf16_backbone=True)``) a ``shared_backbone``
bundle's backbone alone is compiled with ``INFERENCE_PRECISION_HINT`` ``bf16``
(the heads and the thumbnail model stay f32), on CPUs whose OpenVINO plugin
lists ``BF16`` among its ``OPTIMIZATION_CAPABILITIES`` (AVX-512 BF16 or AMX);
elsewhere it is refused rather than emulated. It is an experiment, not a
recommendation: bf16 features depart from FP32 ones by 6.5 % on bottle tiles,
and PaDiM heads fit on FP32 features then lose most of their pixel quality
(bottle AUPRO 0.466 instead of 0.967); heads refit on the bf16 features keep
FP32's quality (0.9675, ``benchmarks/probe_bf16_refit.py``, ``docs/cpu_speed.md``).

INT8 bundles (``model.precision`` ``int8``) are refused: OpenVINO runs their QDQ
backbone with int8 kernels whose features depart from the graph's QDQ
arithmetic (ONNX Runtime without graph optimizations) by 3.8 % on bottle
tiles, five times ONNX Runtime's 0.75 %, and the INT8 bundle's PaDiM heads are
refit on ONNX Runtime's INT8 features; measured on bottle the AUPRO fell from
0.968 (ONNX Runtime) to 0.901 (bound: 0.01). See ``docs/cpu_speed.md``.

PaDiM heads keep their inverse-covariance rows fp16 in memory, widened chunk
by chunk at each call (``MatMul(x, Convert(rows))``, :mod:`tilead.exporter.compact_heads`).
OpenVINO's CPU plugin wants such weights transposed and, since the conversion
runs at each call, would transpose them at each call too (one more pass over
the rows, the heads being memory-bound): :func:`pretranspose_fp16_products`
stores them transposed once at load (``MatMul(x, Convert(rowsᵀ), transpose_b)``),
which removes the per-call ``Transpose`` layers (measured: OpenVINO about 1.4x
slower than ONNX Runtime per head before, 1.25x after; ``docs/cpu_speed.md``).

A ``shared_backbone`` bundle's backbone is compiled once (one copy of its
weights); every tile goes through it in a few batched calls spread over the
location workers, then each location's compiled head runs on its block of features.

Thread safety: an OpenVINO infer request serves one call at a time, so each
location keeps a stack of idle requests; a call takes one (creating it when
all are busy) and returns it afterwards. Concurrent ``predict`` calls therefore
each run on their own request (tested: 8 threads give the serial results).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from tilead.runtime.backends.base import (
    BackendRequest,
    BufferPool,
    Capabilities,
    LocationOutputs,
    location_jobs,
    run_backbone,
    run_locations,
    run_with_thumbnail,
    threads_and_workers,
)
from tilead.runtime.bundle import FEATURES_NAME, OUTPUT_NAME, SCORE_NAME, BundleError, Manifest
from tilead.runtime.preprocess import Preprocessing
from tilead.runtime.timing import StageTimes

CAPABILITIES = Capabilities(devices=("cpu",), full_pipeline=False, detector_score=True, thumbnail=True)
INSTALL = "pip install 'tilead[openvino]' (or pip install openvino)"
INT8_REFUSED = (
    "backend='openvino' does not run INT8 bundles: OpenVINO's int8 kernels depart from the QDQ graph about 5x more "
    "than ONNX Runtime's, on which the bundle's INT8 heads were refit (bottle: AUPRO 0.901 instead of 0.968); use "
    "backend='onnxruntime' for an INT8 bundle, or an FP32 bundle with OpenVINO"
)


class OpenVinoUnavailableError(RuntimeError):
    """OpenVINO is not installed; the message says how to get it."""


def has_bf16_units(capabilities: Sequence[str]) -> bool:
    """Whether OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` list native bfloat16 (``BF16``)."""
    return "BF16" in capabilities


BF16_ADVICE = {
    "bf16_backbone=True": "use bf16_backbone=False",
    "precision bf16": "export fp32 or int8 instead",
    "precision int8_bf16": "export fp32 or int8 instead",
    "a bf16 bundle": "it runs only where bf16 units are; export the run as fp32 or int8 for this CPU",
}


def require_bf16(core: Any, what: str = "bf16_backbone=True") -> None:
    """Refuse a bf16 backbone on a CPU whose OpenVINO plugin has no native bfloat16.

    Args:
        core: An ``openvino.Core``.
        what: What asked for bf16, for the message (a key of :data:`BF16_ADVICE`).

    Raises:
        RuntimeError: Naming the CPU and what it offers.
    """
    capabilities = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if not has_bf16_units(capabilities):
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise RuntimeError(
            f"{what} needs a CPU with bfloat16 units (AVX-512 BF16 or AMX); OpenVINO reports "
            f"{name!r} with {', '.join(capabilities)}; {BF16_ADVICE.get(what, 'run FP32 instead')}"
        )


def import_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        OpenVinoUnavailableError: If it does not import.
    """
    try:
        import openvino
    except ImportError as err:
        raise OpenVinoUnavailableError(f"backend='openvino' needs OpenVINO ({err}): {INSTALL}") from None
    return openvino


def pretranspose_fp16_products(model: Any) -> int:
    """Rewrite ``MatMul(x, Convert(fp16 constant))`` as ``MatMul(x, Convert(transposed constant), transpose_b=True)``.

    The same products (the constant's last two axes swapped once, here, instead
    of the plugin's per-call ``Transpose`` of the widened weights).

    Args:
        model: An ``openvino.Model`` (changed in place).

    Returns:
        How many products were rewritten.
    """
    from openvino import opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes().get("transpose_b"):
            continue
        convert = op.input_value(1).get_node()
        if convert.get_type_name() != "Convert":
            continue
        const = convert.input_value(0).get_node()
        if const.get_type_name() != "Constant" or const.get_element_type().get_type_name() != "f16":
            continue
        rows = const.get_data()
        if rows.ndim < 2:
            continue
        wide = ops.convert(ops.constant(np.ascontiguousarray(np.swapaxes(rows, -1, -2))), "f32")
        product = ops.matmul(op.input_value(0), wide, bool(op.get_attributes().get("transpose_a")), True)
        product.set_friendly_name(op.get_friendly_name())
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(product.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def uint8_input(model: Any, preprocessing: Preprocessing) -> Any:
    """The backbone taking uint8 channels-last tiles, its input conversion and normalization inside the model.

    OpenVINO's ``PrePostProcessor``: the input tensor becomes uint8 ``(n, th, tw, C)``
    (:func:`tilead.runtime.preprocess.tile_images_u8`'s tiles); in the model it is converted to
    float32, ``255 * mean[c]`` is subtracted and the result divided by ``255 * std[c]``: the
    float tiles' ``(pixel / 255 - mean[c]) / std[c]`` (:class:`~tilead.runtime.preprocess.Preprocessing`),
    in channels first. The plugin fuses these steps into the first layers; the host only copies
    pixels (a quarter of the float tiles' bytes).

    Args:
        model: An ``openvino.Model`` whose one input takes float32 ``(n, C, th, tw)``.
        preprocessing: The bundle's preprocessing (mean and std on the 0..1 scale).

    Returns:
        The new ``openvino.Model``.
    """
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    tiles = ppp.input()
    tiles.tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    tiles.model().set_layout(Layout("NCHW"))
    tiles.preprocess().convert_element_type(Type.f32).mean([255.0 * m for m in preprocessing.mean]).scale(
        [255.0 * s for s in preprocessing.std]
    )
    return ppp.build()


def compile_backbone(
    core: Any, onnx: bytes | str, config: dict[str, Any], preprocessing: Preprocessing, tile: Sequence[int], uint8: bool
) -> _Location:
    """The shared backbone compiled for the CPU, taking uint8 or float32 tiles.

    The one compile of every OpenVINO backbone (the ``openvino`` and ``hybrid`` backends, and the bf16
    export's refit, :class:`tilead.exporter.bf16.Bf16Backbone`), so that the heads are fitted on the very
    features the runtime computes. The backends pass ``uint8`` from the manifest's ``backbone_input``
    (:attr:`tilead.runtime.bundle.Manifest.backbone_input`: ``"uint8"`` for bf16 bundles exported since
    issue #21 item 3, ``"float32"`` for older ones).

    Args:
        core: An ``openvino.Core``.
        onnx: ``backbone.onnx``'s bytes, or its path.
        config: The CPU plugin's configuration.
        preprocessing: The bundle's preprocessing (channels, mean, std).
        tile: ``(tile_h, tile_w)``.
        uint8: Take uint8 ``(n, th, tw, C)`` tiles (:func:`uint8_input`); else the graph as it is (float32
            ``(n, C, th, tw)``).

    Raises:
        BundleError: If OpenVINO cannot read or compile it.
    """
    th, tw = (int(v) for v in tile)
    c = preprocessing.channels
    try:
        model = core.read_model(model=onnx)
        if uint8:
            model = uint8_input(model, preprocessing)
        compiled = core.compile_model(model, "CPU", config)
        return _Location(
            compiled, [FEATURES_NAME], (th, tw, c) if uint8 else (c, th, tw), np.uint8 if uint8 else np.float32
        )
    except Exception as err:  # OpenVINO raises RuntimeError and its own types
        raise BundleError(f"the shared backbone: OpenVINO cannot load backbone.onnx: {err}") from err


def _bindable(tiles: np.ndarray, out: np.ndarray) -> bool:
    """Whether a request can read ``tiles`` and write ``out`` in place (:func:`bind_and_infer`)."""
    return bool(tiles.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable and out.dtype == np.float32)


def bind_and_infer(request: Any, tiles: np.ndarray, out: np.ndarray, output: Any) -> None:
    """Run ``request`` on ``tiles`` with its output written straight into ``out``; its own tensors back afterwards.

    Args:
        request: An idle ``openvino.InferRequest`` (held by this caller alone).
        tiles: C-contiguous input ``(n, ...)`` of the model's element type.
        out: C-contiguous writable float32, the output's shape for ``n`` tiles.
        output: The model's output port ``out`` is for.

    Raises:
        BundleError: If the model's output for these tiles does not have ``out``'s shape.
    """
    ov = import_openvino()
    dims = output.get_partial_shape()
    if len(dims) == out.ndim and all(d.is_static for d in list(dims)[1:]):
        expected = (len(tiles), *(int(d.get_length()) for d in list(dims)[1:]))
        if expected != out.shape:
            raise BundleError(f"output shape {expected}, the manifest promises {out.shape}")
    own_input, own_output = request.get_input_tensor(), request.get_tensor(output)
    try:
        request.set_input_tensor(ov.Tensor(tiles, shared_memory=True))
        try:
            request.set_tensor(output, ov.Tensor(out, shared_memory=True))
        except RuntimeError as err:  # an output of another rank or with dynamic sizes that do not fit
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BundleError(
                f"output: OpenVINO refuses shape {out.shape} ({first}); the manifest promises it"
            ) from None
        request.infer()
    finally:
        request.set_input_tensor(own_input)
        request.set_tensor(output, own_output)


class _Location:
    """One location's compiled model and its idle infer requests (inputs of ``shape`` after the batch, ``dtype``)."""

    def __init__(
        self, compiled: Any, names: Sequence[str], shape: tuple[int, ...], dtype: type[np.generic] = np.float32
    ) -> None:
        self.compiled = compiled
        self.outputs = [compiled.output(name) for name in names]
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        request = compiled.create_infer_request()
        # One call now, while no other location runs: the plugin's first call initializes lazily, and first
        # calls of several models at once hang in OpenVINO when Python's faulthandler is enabled (as under pytest).
        request.infer([np.zeros((1, *shape), dtype=dtype)])
        self._idle: list[Any] = [request]
        self._lock = threading.Lock()

    @contextmanager
    def _request(self) -> Iterator[Any]:
        """An idle infer request (a new one when all are busy), back to the idle stack afterwards."""
        with self._lock:
            request = self._idle.pop() if self._idle else None
        if request is None:
            request = self.compiled.create_infer_request()
        try:
            yield request
        finally:
            with self._lock:
                self._idle.append(request)

    def check_input(self, tiles: np.ndarray) -> None:
        """Refuse uint8 tiles for a float model and float tiles for a uint8 one, or tiles of another shape.

        Raises:
            ValueError: Naming what was expected and what came.
        """
        uint8 = tiles.dtype == np.uint8
        if uint8 != (self.dtype == np.uint8) or tuple(tiles.shape[1:]) != self.shape:
            raise ValueError(
                f"tiles: expected {self.dtype} (n, {', '.join(map(str, self.shape))}), got {tiles.dtype} "
                f"{tuple(tiles.shape)}"
            )

    def run_into(self, tiles: np.ndarray, out: np.ndarray) -> None:
        """The first output on ``tiles`` written into ``out`` (shape checked).

        Where ``tiles`` and ``out`` are C-contiguous (``out`` writable float32, as the backbone's feature buffer
        always is), the request reads and writes them in place: both are bound to it as tensors sharing their
        memory, so there is no copy of the input into the request, no copy of the output out of it, and no pass
        through OpenVINO's Python input dispatch: 2.4-3.7 % of a bf16 backbone call on an Intel Xeon with
        AMX (one process, alternating, ``benchmarks/bench_openvino_io.py``; docs/cpu_speed.md). The request
        gets its own tensors back afterwards, so it never keeps the caller's memory. Otherwise the output is
        copied from the request's tensor.

        Raises:
            ValueError: For tiles of another element type or shape (:meth:`check_input`).
            BundleError: If the output's shape is not ``out``'s.
        """
        self.check_input(tiles)
        with self._request() as request:
            if _bindable(tiles, out):
                bind_and_infer(request, tiles, out, self.outputs[0])
                return
            result = request.infer([tiles])[self.outputs[0]]
            if result.shape != out.shape:
                raise BundleError(f"output shape {result.shape}, the manifest promises {out.shape}")
            out[...] = result

    def run(self, tiles: np.ndarray) -> list[np.ndarray]:
        with self._request() as request:
            result = request.infer([tiles])
            # The request owns the result tensors and reuses them on its next call: copy before handing it back.
            return [np.array(result[port], dtype=np.float32, copy=True) for port in self.outputs]


def stream_config(config: dict[str, Any], threads: int, streams: int) -> dict[str, Any]:
    """``config`` for a model whose calls may run ``streams`` at a time, on ``threads`` CPU threads in all.

    OpenVINO's CPU plugin runs a compiled model's calls on its streams (``NUM_STREAMS``); with one stream,
    the ``LATENCY`` hint's, calls from several threads run one at a time, however many infer requests
    there are. Each stream gets ``threads // streams`` threads (``INFERENCE_NUM_THREADS`` is their sum).

    Args:
        config: Other properties (``INFERENCE_PRECISION_HINT``, ...); they win over this function's.
        threads: CPU threads in all (at least 1).
        streams: Calls at the same time (at least 1, at most ``threads``).

    Returns:
        A new configuration dictionary.
    """
    threads = max(1, threads)
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": max(1, min(streams, threads)),
        "INFERENCE_NUM_THREADS": threads,
        "ENABLE_CPU_PINNING": False,
        **config,
    }


def backbone_into(backbone: _Location, tiles: np.ndarray, out: np.ndarray) -> None:
    """The shared backbone on ``tiles`` (``(k, C, th, tw)``), its features written into ``out`` (``(k, d, fh, fw)``).

    Raises:
        BundleError: If the features' shape is not ``out``'s.
    """
    try:
        backbone.run_into(tiles, out)
    except BundleError as err:
        raise BundleError(f"the shared backbone: {err}") from None


class OpenVinoBackend:
    """One compiled OpenVINO model per location (see the module docstring).

    Args:
        manifest: The bundle's verified manifest.
        models: Every location's ONNX bytes, row-major (the heads of a ``shared_backbone`` bundle).
        threads: CPU threads in all.
        location_workers: Locations run at the same time (at most the number of locations).
        backbone: The shared backbone's ONNX bytes (``shared_backbone`` bundles only).
        thumbnail: The thumbnail model's ONNX bytes (bundles with a thumbnail branch only).
        bf16_backbone: Compile the backbone with ``INFERENCE_PRECISION_HINT`` ``bf16`` (heads f32).

    Raises:
        OpenVinoUnavailableError: If OpenVINO is not installed.
        RuntimeError: For ``bf16_backbone`` on a CPU without bfloat16 units.
        ValueError: For ``bf16_backbone`` without a shared backbone, or an INT8 bundle (:data:`INT8_REFUSED`).
        BundleError: If OpenVINO cannot read or compile a location's model, or it lacks an output.
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        manifest: Manifest,
        models: Sequence[bytes],
        *,
        threads: int,
        location_workers: int,
        backbone: bytes | None = None,
        thumbnail: bytes | None = None,
        bf16_backbone: bool = False,
    ) -> None:
        if manifest.model.get("precision", "fp32") == "int8":
            raise ValueError(INT8_REFUSED)
        # A bf16 (or int8_bf16) bundle's heads were refit on bf16 backbone features: its backbone always runs in bf16.
        bf16_bundle = manifest.openvino_refit
        bf16_backbone = bf16_backbone or bf16_bundle
        ov = import_openvino()
        self.manifest = manifest
        count = len(manifest.locations)  # workers counted by locations (location_jobs plans their calls)
        self.threads = threads
        self.location_workers = max(1, min(location_workers, count))
        self.version = str(ov.__version__)
        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, threads // self.location_workers),
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,
        }
        names = [OUTPUT_NAME, SCORE_NAME] if manifest.image_score == "detector" else [OUTPUT_NAME]
        tile = (manifest.preprocessing.channels, *manifest.grid.tile_size)
        shape = tile if manifest.features is None else manifest.features
        if (backbone is None) != (manifest.backbone is None):
            state = "missing" if backbone is None else "given, but the layout has no shared backbone"
            raise BundleError(f"layout {manifest.layout!r}: the backbone's model bytes are {state}")
        self._backbone: _Location | None = None
        self.bf16_backbone = bf16_backbone
        if bf16_backbone:
            if backbone is None:
                raise ValueError(f"bf16_backbone=True: layout {manifest.layout!r} has no shared backbone")
            require_bf16(core, "a bf16 bundle" if bf16_bundle else "bf16_backbone=True")
        if backbone is not None:
            # One stream per location worker: the backbone's calls, spread over the workers, run side by side.
            hint = "bf16" if bf16_backbone else "f32"
            backbone_config = stream_config({"INFERENCE_PRECISION_HINT": hint}, threads, self.location_workers)
            self._backbone = compile_backbone(
                core,
                backbone,
                backbone_config,
                manifest.preprocessing,
                manifest.grid.tile_size,
                manifest.uint8_backbone,
            )
        if (thumbnail is None) != (manifest.thumbnail is None):
            state = "missing" if thumbnail is None else "given, but the bundle has no thumbnail branch"
            raise BundleError(f"the thumbnail model's bytes are {state}")
        self._thumbnail: _Location | None = None
        if thumbnail is not None and manifest.thumbnail is not None:
            side = manifest.thumbnail.size
            try:
                small = core.compile_model(core.read_model(model=thumbnail), "CPU", config)
                self._thumbnail = _Location(small, [OUTPUT_NAME], (manifest.preprocessing.channels, side, side))
            except Exception as err:
                raise BundleError(f"the thumbnail model: OpenVINO cannot load thumbnail.onnx: {err}") from err
        self._buffers = BufferPool()
        locations: list[_Location] = []
        threads_each = max(1, threads // self.location_workers)
        self._jobs = location_jobs(manifest, self.location_workers)
        calls = [sum(1 for model, _ in self._jobs if model == index) for index in range(len(manifest.models))]
        for loc, model, model_calls in zip(manifest.models, models, calls, strict=True):
            try:
                graph = core.read_model(model=model)
                pretranspose_fp16_products(graph)
                # A model the workers call per location (location_jobs) gets one stream per call it may run
                # at once, else OpenVINO would run them one at a time.
                streams = min(model_calls, self.location_workers)
                precision = {"INFERENCE_PRECISION_HINT": config["INFERENCE_PRECISION_HINT"]}
                own = config if streams == 1 else stream_config(precision, streams * threads_each, streams)
                compiled = core.compile_model(graph, "CPU", own)
                locations.append(_Location(compiled, names, shape))
            except Exception as err:  # OpenVINO raises RuntimeError and its own types
                raise BundleError(f"location {loc.name}: OpenVINO cannot load {loc.file}: {err}") from err
        self._locations: list[_Location] | None = locations
        self._pool = (
            ThreadPoolExecutor(self.location_workers, thread_name_prefix="tilead-openvino")
            if self.location_workers > 1
            else None
        )

    @property
    def providers(self) -> list[str]:
        """``OpenVINO <version> CPU`` (``... CPU, backbone bf16`` with a bf16 backbone)."""
        if self._locations is None:
            raise RuntimeError("Predictor is closed")
        return [f"OpenVINO {self.version} CPU" + (", backbone bf16" if self.bf16_backbone else "")]

    @property
    def device_memory_bytes(self) -> int | None:
        """None: the models run in host memory."""
        return None

    @property
    def uint8_tiles(self) -> bool:
        """Whether :meth:`infer` takes uint8 ``(locations, n, th, tw, C)`` tiles (:func:`compile_backbone`)."""
        return self.manifest.uint8_backbone

    def infer(self, tiles: np.ndarray, timer: StageTimes | None = None) -> LocationOutputs:
        """Every location's compiled model on its tiles (see :meth:`.base.InferenceBackend.infer`).

        Args:
            tiles: float32 ``(locations, n, C, th, tw)``, or uint8 ``(locations, n, th, tw, C)`` where
                :attr:`uint8_tiles`.
            timer: Receives the stages.
        """
        locations, pool = self._locations, self._pool
        if locations is None:
            raise RuntimeError("Predictor is closed")

        def run_one(index: int, location_tiles: np.ndarray) -> Sequence[np.ndarray]:
            return locations[index].run(np.ascontiguousarray(location_tiles))

        backbone = self._backbone
        if backbone is None:
            return run_locations(self.manifest, tiles, run_one, pool, timer, self._jobs)

        def run_features(part: np.ndarray, out: np.ndarray) -> None:
            backbone_into(backbone, part, out)

        features = run_backbone(
            self.manifest, np.ascontiguousarray(tiles), run_features, self._buffers, pool, timer, self.location_workers
        )
        try:
            return run_locations(self.manifest, features, run_one, pool, timer, self._jobs)
        finally:
            self._buffers.give(features)

    def infer_with_thumbnail(
        self, tiles: np.ndarray, thumbnail: np.ndarray, timer: StageTimes | None = None
    ) -> tuple[LocationOutputs, np.ndarray]:
        """The locations and the thumbnail model in one call (:meth:`.base.ThumbnailInference.infer_with_thumbnail`)."""
        small = self._thumbnail
        if self._locations is None:
            raise RuntimeError("Predictor is closed")
        if small is None:
            raise BundleError("the bundle has no thumbnail branch")

        def run_thumbnail(x: np.ndarray) -> np.ndarray:
            return small.run(x)[0]

        return run_with_thumbnail(
            self.manifest, lambda: self.infer(tiles, timer), run_thumbnail, thumbnail, self._pool, timer
        )

    def close(self) -> None:
        """Drop the compiled models and stop the location workers."""
        self._locations = None
        self._backbone = None
        self._thumbnail = None
        self._buffers.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def create(request: BackendRequest) -> OpenVinoBackend:
    """The registry's factory (CPU only; the Predictor checks the device against the capabilities)."""
    budget, workers = threads_and_workers(request)
    return OpenVinoBackend(
        request.manifest,
        request.models,
        threads=budget,
        location_workers=workers,
        backbone=request.backbone,
        thumbnail=request.thumbnail,
        bf16_backbone=request.bf16_backbone,
    )
