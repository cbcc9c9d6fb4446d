"""The native TensorRT backend: the extension's DevicePipeline with one engine per location.

Per batch, on one CUDA stream owned by the extension (no torch, no second CUDA
wrapper): the uint8 images go to the device once (through pinned memory); the
CUDA tile kernel writes every location's tiles straight into the address its
engine reads; each location's engine is enqueued with ``execute_async_v3``;
untile, seam smoothing, crop and normalization run on the device; maps, masks
and scores come back in one copy each.

Every engine's execution context uses one shared block of device memory
(TensorRT's ``USER_MANAGED`` allocation, the largest ``device_memory_size_v2``
of the set): the locations run one after another on the one stream, so they
never need it at the same time.

**CUDA graphs** (``cuda_graphs=True``, the default): the first batch of each
size and channel order runs stage by stage (which also lets TensorRT settle
its shapes), then the device part of the batch (H2D copy, tile, every
engine, untile, seams, crop, normalize, D2H copies) is captured once into a
CUDA graph, and later batches of that size replay it with one launch; only
the host copies into and out of pinned memory stay outside. Where capture
fails (a driver, an engine or a plugin that cannot be captured) the error is
logged once and the backend keeps running without graphs.

With a :class:`~tilead.runtime.timing.StageTimes` a call without a graph
synchronizes after every stage so each gets its own wall time (``h2d``,
``tile``, ``location:<name>``, ``inference``, ``untile``, ``seam``, ``crop``,
``normalize``, ``d2h``); a replayed graph is one stage, ``graph`` (between
``h2d``, the host copy into pinned memory, and ``d2h``); without a timer it
synchronizes only at the end. Calls are serialized by a lock (one pipeline per
backend), which keeps the ONNX Runtime backend's promise: concurrent
``predict`` calls are safe.

Bundles that deploy the detector's own image score (``image_score:
detector``, PatchCore's reweighted score) have engines with a second output,
one score per tile; the pipeline gives each location an aligned block for it,
and the image score is the max over an image's tiles, normalized with the
bundle's image statistics, as on every other backend.

Shared models (``grid.assignment`` other than ``one_to_one``): the set holds
one engine per model, and every location gets its own execution context made
from its model's engine (contexts are cheap: they share the one block of
context memory), so each location's engine still reads that location's tile
block at batch ``n``; a model's locations are not batched into one call here.

A bundle with a thumbnail branch has one more engine, ``thumbnail``: after the
tile kernel the pipeline area-resizes the images to the thumbnail size on the
device and preprocesses them into that engine's input (``thumbnail_input``);
after the crop it upsamples the thumbnail maps and fuses them into the
image-size maps (``fuse``, the CUDA twin of ``ThumbnailBranch.fuse``), before
normalization, as :func:`tilead.runtime.thumbnail.fuser` does on the CPU.

Unlike the inference-only backends it takes the uint8 images, not tiles
(``capabilities.full_pipeline``): :meth:`TensorRTBackend.run_images` returns
the normalized maps, :meth:`TensorRTBackend.location_outputs` the raw
per-location maps. It only runs engines: building them is the exporter's
(``tilead-export BUNDLE --trt``, :mod:`tilead.exporter.engines`).

This module has never run on a GPU where it was written (there is none): the
tests run it against a CPU stand-in (tests/fake_tensorrt.py); ``tilead-doctor``
checks it on the first GPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilead import _kernels
from tilead.runtime.backends.base import BackendRequest, BranchOutputs, Capabilities, LocationOutputs
from tilead.runtime.backends.tensorrt_modules import (
    TensorRTUnavailableError,
    import_runtime,
    require_gpu,
    require_per_location,
)
from tilead.runtime.bundle import OUTPUT_NAME, SCORE_NAME, BundleError, Manifest, read_verified_file
from tilead.runtime.engines import EngineFile, EngineSet, describe_sets, select_engine_set
from tilead.runtime.postprocess import NormalizedMaps, NormParams, labels_of
from tilead.runtime.postprocessor import PostProcessor, image_scores_of_tiles, score_images
from tilead.runtime.preprocess import InputOrder
from tilead.runtime.timing import StageTimes, timed

log = logging.getLogger("tilead.runtime.backends.tensorrt")

TENSOR_ALIGN_BYTES = 256
"""TensorRT's alignment for every engine input and output address (the DevicePipeline pads its blocks to it)."""

CAPABILITIES = Capabilities(devices=("cuda",), full_pipeline=True, detector_score=True, thumbnail=True)
THUMBNAIL_STAGE = "location:thumbnail"
"""The thumbnail engine's stage in timings (as the CPU backends name it)."""
BUILD_ELSEWHERE = (
    "the runtime does not build TensorRT engines: build them on this machine with `tilead-export {bundle} --trt` "
    "(tilead.exporter.engines.build_engines), then load the bundle again"
)


@dataclass(frozen=True)
class _EngineCall:
    """One engine launch of a batch: a location's model on its tile block, or the thumbnail model.

    Attributes:
        label: For messages (``location r0c1``, ``the thumbnail model``).
        stage: Its timing stage (``location:r0c1``, ``location:thumbnail``).
        context: Its execution context (USER_MANAGED, the shared block of context memory).
        input: The engine's input tensor.
        shape: ``(C, h, w)`` of one input item.
        location: Location index (row-major), or None for the thumbnail.
        score: The per-tile score output (detector bundles), else None.
    """

    label: str
    stage: str
    context: Any
    input: str
    shape: tuple[int, int, int]
    location: int | None = None
    score: str | None = None


class TensorRTBackend:
    """Engines of one engine set plus the device pipeline.

    Args:
        bundle: Bundle directory.
        manifest: Its verified manifest.
        precision: ``fp32``, ``fp16`` or None (any listed set).
        max_batch: Largest batch per call (the engine set's profile must allow it).
        cuda_graphs: Capture each batch size's pipeline once into a CUDA graph and replay it.

    Raises:
        TensorRTUnavailableError: Without TensorRT, a GPU, or engines for this GPU (the
            message says how to build them: ``tilead-export BUNDLE --trt``).
        BundleError: For a modified engine file or one TensorRT cannot load.
    """

    capabilities = CAPABILITIES

    def __init__(
        self, bundle: Path, manifest: Manifest, *, precision: str | None, max_batch: int, cuda_graphs: bool = True
    ) -> None:
        trt = import_runtime()
        gpu, cc = require_gpu()
        self.version = str(trt.__version__)
        self.manifest = manifest
        engine_set = select_engine_set(
            manifest.engine_sets, gpu=gpu, compute_capability=cc, runtime_version=self.version,
            precision=precision, batch=max_batch,
        )  # fmt: skip
        if engine_set is None:
            raise TensorRTUnavailableError(
                f"{bundle}: no TensorRT engines for {gpu} (sm {cc}) with TensorRT {self.version}, "
                f"precision {precision or 'any'}, batch {max_batch} "
                f"(listed: {describe_sets(manifest.engine_sets)}); {BUILD_ELSEWHERE.format(bundle=bundle)}"
            )
        self.engine_set: EngineSet = engine_set
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if engine_set.version_compatible:
            # A version-compatible plan may carry host code (the lean runtime, when not excluded), which TensorRT
            # refuses to deserialize unless allowed. These plans are trusted: each file's sha256 is checked against
            # the digest-verified manifest before TensorRT sees it.
            self._runtime.engine_host_code_allowed = True
        self._detector = manifest.image_score == "detector"
        prep = manifest.preprocessing
        score = SCORE_NAME if self._detector else None
        tile = (prep.channels, *manifest.grid.tile_size)
        # One engine per model (per location for one_to_one), checked against what the pipeline gives it.
        loaded = [self._load(trt, bundle, f, tile, manifest.map_size, max_batch, score) for f in engine_set.files]
        self._engines: list[Any] = [e for e, _ in loaded]  # the thumbnail's, if any, is appended below
        branch = manifest.thumbnail  # the manifest's engine sets have its engine exactly when it has the branch
        small: tuple[Any, str, tuple[int, int, int]] | None = None
        if branch is not None and engine_set.thumbnail is not None:
            shape = (prep.channels, branch.size, branch.size)
            small = (*self._load(trt, bundle, engine_set.thumbnail, shape, branch.map_size, max_batch, None), shape)
        # The bundle's post-processing as one spec: the pipeline's kernels and the labels use the same one.
        self.post = PostProcessor.from_manifest(manifest)
        spec = self.post.native()
        self._norm: NormParams = spec.norm
        self.pipeline = _make_pipeline(manifest, max_batch, spec, location_scores=self._detector)
        # One block of context memory for every engine: they run one after another on the pipeline's stream.
        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if small is not None:
            self._engines.append(small[0])
        self._context_bytes = max(int(e.device_memory_size_v2) for e in self._engines)
        address = int(self.pipeline.context_memory(self._context_bytes))

        def context(engine: Any) -> Any:
            ctx = engine.create_execution_context(user_managed)
            if ctx is None:
                raise RuntimeError(f"TensorRT {self.version} could not create an execution context (see its log)")
            ctx.set_device_memory(address, self._context_bytes)
            return ctx

        # One context per location, from its model's engine (a shared model's engine serves several), then the
        # thumbnail's: the order they are enqueued in.
        self._calls: list[_EngineCall] = []
        for index, loc in enumerate(manifest.locations):
            engine, inp = loaded[manifest.location_model[index]]
            self._calls.append(_EngineCall(f"location {loc.name}", f"location:{loc.name}", context(engine), inp,
                                           tile, index, score))  # fmt: skip
        if small is not None:
            self._calls.append(
                _EngineCall("the thumbnail model", THUMBNAIL_STAGE, context(small[0]), small[1], small[2])
            )
        self.has_thumbnail = small is not None
        self._bound: int | None = None  # batch size every context's shapes and addresses are set for
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_error: str | None = None
        """Why capture failed (graphs are then off for this backend); None while it works or is off."""
        self.max_batch = max_batch
        self.threads = 1
        self.location_workers = 1
        self._lock = threading.Lock()

    @property
    def _contexts(self) -> list[Any]:
        """Every execution context, in launch order (the locations', then the thumbnail's)."""
        return [c.context for c in self._calls]

    @property
    def device_memory_bytes(self) -> int:
        """Device memory this backend holds: the pipeline's buffers and the engines' shared context memory.

        Engine weights are TensorRT's own allocations and not counted; ``tilead-bench`` reports the
        device-wide change (``cudaMemGetInfo`` before and after loading) beside this figure.
        """
        return 0 if self.pipeline is None else int(self.pipeline.device_bytes)

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far (one per batch size and channel order used)."""
        return 0 if self.pipeline is None else int(self.pipeline.graph_count)

    @property
    def providers(self) -> list[str]:
        """What runs the models, for reports."""
        if self.pipeline is None:
            raise RuntimeError("Predictor is closed")
        return [f"TensorRT {self.version} (native, engines {self.engine_set.key})"]

    def _load(
        self,
        trt: Any,
        bundle: Path,
        f: EngineFile,
        shape: tuple[int, int, int],
        map_size: tuple[int, int],
        max_batch: int,
        score: str | None,
    ) -> tuple[Any, str]:
        """Deserialize one engine file (read once, size and sha256 checked) and check its I/O; ``(engine, input)``."""
        path = Path(bundle) / f.file
        # Read once inside the bundle (no symlinks, regular file), size and sha256 checked on these bytes.
        engine = self._runtime.deserialize_cuda_engine(read_verified_file(bundle, f, "engine"))
        if engine is None:
            raise BundleError(f"engine {path}: TensorRT {self.version} cannot deserialize it (see its log)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want = [OUTPUT_NAME] if score is None else [OUTPUT_NAME, score]
        if len(inputs) != 1 or sorted(outputs) != sorted(want):
            raise BundleError(
                f"engine {path}: expected one input and the output(s) {want} (postprocess.image_score "
                f"{self.manifest.image_score!r}), got inputs {inputs} and outputs {outputs}"
            )
        _check_engine(trt, engine, path, inputs[0], shape, map_size, max_batch, score=score)
        return engine, inputs[0]

    def _bind(self, call: _EngineCall, n: int) -> None:
        """Give one context the shape and the pipeline's addresses of a batch of ``n``."""
        ctx, inp = call.context, call.input
        # A False here would leave the previous batch's shape or address in place: never ignore it.
        if not ctx.set_input_shape(inp, (n, *call.shape)):
            raise RuntimeError(f"{call.label}: TensorRT refused input shape {(n, *call.shape)} for tensor {inp!r}")
        p = self.pipeline
        if call.location is None:
            bindings = [(inp, p.thumbnail_input_address(n)), (OUTPUT_NAME, p.thumbnail_map_address(n))]
        else:
            bindings = [(inp, p.tiles_address(call.location, n)), (OUTPUT_NAME, p.maps_address(call.location, n))]
            if call.score is not None:
                bindings.append((call.score, p.scores_address(call.location, n)))
        for tensor, address in bindings:
            if address % TENSOR_ALIGN_BYTES:
                raise RuntimeError(
                    f"{call.label}: device address {address:#x} of tensor {tensor!r} is not "
                    f"{TENSOR_ALIGN_BYTES}-byte aligned (batch {n})"
                )
            if not ctx.set_tensor_address(tensor, address):
                raise RuntimeError(f"{call.label}: TensorRT refused device address {address:#x} for tensor {tensor!r}")

    def _enqueue(self, n: int, timer: StageTimes | None) -> None:
        stream = self.pipeline.stream
        self._bound = None  # until every context holds batch n
        with timed(timer, "inference"):
            for call in self._calls:
                with timed(timer, call.stage):
                    self._bind(call, n)
                    if not call.context.execute_async_v3(stream):
                        raise RuntimeError(f"{call.label}: TensorRT failed to enqueue")
                    if timer is not None:
                        self.pipeline.synchronize()
        self._bound = n

    def _launch(self, p: Any, n: int, key: int) -> None:
        """Replay graph ``key``; the contexts first get batch ``n``'s shapes and addresses back if another size ran.

        A graph holds what TensorRT enqueued for its batch size, and TensorRT keeps shape-dependent state in the
        execution context, so the contexts are put back in the state the graph was captured in (host calls only).
        """
        if self._bound != n:
            for call in self._calls:
                self._bind(call, n)
            self._bound = n
        p.launch(key)

    def _stage(self, timer: StageTimes | None, name: str, fn: Any, *args: Any) -> None:
        with timed(timer, name):
            fn(*args)
            if timer is not None:
                self.pipeline.synchronize()

    def run_images(self, batch: np.ndarray, input_order: InputOrder, timer: StageTimes | None = None) -> NormalizedMaps:
        """Score a uint8 ``(n, H, W, C)`` batch (``n <= max_batch``).

        Returns:
            Maps ``(n, H, W)``, masks, raw scores, scores and labels (for ``image_score`` ``detector``
            bundles the scores are the detector's: max over each image's per-tile scores).
        """
        n = batch.shape[0]
        swap = self._swap(batch, input_order)
        key = 2 * n + int(swap)  # the batch size and the channel flag are both baked into a graph
        with self._lock:
            p = self._open_pipeline()
            p.use_device()  # this thread's current device: TensorRT enqueues on it
            with timed(timer, "h2d"):
                p.stage_images(np.ascontiguousarray(batch))
            if self._graphs_on() and p.has_graph(key):
                self._stage(timer, "graph", self._launch, p, n, key)
            else:
                self._stage(timer, "h2d", p.upload_staged, n)
                self._enqueue_stages(p, n, swap, timer)
                p.enqueue_download(n)
            with timed(timer, "d2h"):
                maps, masks, raw, scores = p.fetch(n)
                tile_scores = np.asarray(p.fetch_location_scores(n)) if self._detector else None
            if self._graphs_on() and not p.has_graph(key):
                self._capture(p, n, swap, key)  # after a run at this shape, as TensorRT asks; replayed from next call
        labels = labels_of(scores, self._norm)
        result = NormalizedMaps(maps, masks.view(np.bool_), raw, scores, labels)
        if tile_scores is not None:
            result = score_images(result, image_scores_of_tiles(tile_scores), self.manifest.stats)
        return result

    def _enqueue_stages(self, p: Any, n: int, swap: bool, timer: StageTimes | None) -> None:
        """Tile, every engine, untile, seams, crop, fuse (thumbnail branch) and normalize, on the pipeline's stream."""
        self._stage(timer, "tile", p.tile, n, swap)
        if self.has_thumbnail:
            self._stage(timer, "thumbnail", p.thumbnail_input, n, swap)
        self._enqueue(n, timer)
        self._stage(timer, "untile", p.untile, n)
        self._stage(timer, "seam", p.smooth_seams, n)
        self._stage(timer, "crop", p.crop, n)
        if self.has_thumbnail:
            self._stage(timer, "fuse", p.fuse, n)
        self._stage(timer, "normalize", p.normalize, n)

    def _graphs_on(self) -> bool:
        return self.cuda_graphs and self.graph_error is None

    def _capture(self, p: Any, n: int, swap: bool, key: int) -> None:
        """Capture the device part of a batch into a graph kept under ``key``; on failure, graphs go off (logged once).

        Nothing runs during capture: the stages and engines are recorded, with this batch's shapes and addresses.
        """
        try:
            p.begin_capture()
            try:
                p.upload_staged(n)
                self._enqueue_stages(p, n, swap, None)
                p.enqueue_download(n)
            except BaseException:
                p.abort_capture()
                raise
            p.end_capture(key)
        except Exception as err:  # capture is an optimization: any failure means "run without graphs"
            self.graph_error = f"batch {n}: {type(err).__name__}: {err}"
            log.warning(
                "CUDA graph capture failed (%s); this TensorRT backend runs without CUDA graphs", self.graph_error
            )

    def location_outputs(self, batch: np.ndarray, input_order: InputOrder) -> LocationOutputs:
        """Raw per-location maps and per-tile scores of a uint8 batch (run stage by stage, never captured).

        Returns:
            Maps float32 ``(locations, n, h, w)``, and the scores float32 ``(locations, n)`` for
            ``image_score`` ``detector`` bundles (else None).
        """
        maps, scores, _ = self.branch_outputs(batch, input_order)
        return maps, scores

    def branch_outputs(self, batch: np.ndarray, input_order: InputOrder) -> BranchOutputs:
        """:meth:`location_outputs` plus the thumbnail engine's raw maps float32 ``(n, h, w)`` (else None)."""
        n = batch.shape[0]
        swap = self._swap(batch, input_order)
        with self._lock:
            p = self._open_pipeline()
            p.use_device()
            p.upload(np.ascontiguousarray(batch))
            p.tile(n, swap)
            if self.has_thumbnail:
                p.thumbnail_input(n, swap)
            self._enqueue(n, None)
            out = np.asarray(p.download_location_maps(n))
            scores = np.asarray(p.download_location_scores(n)) if self._detector else None
            small = np.asarray(p.download_thumbnail_maps(n)) if self.has_thumbnail else None
        return out, scores, small

    def _open_pipeline(self) -> Any:
        """The pipeline, or RuntimeError after :meth:`close` (call under the lock)."""
        if self.pipeline is None:
            raise RuntimeError("Predictor is closed")
        return self.pipeline

    def _swap(self, batch: np.ndarray, input_order: InputOrder) -> bool:
        """Whether the tile kernel must swap R and B: the images' order differs from the model's."""
        return batch.shape[3] == 3 and input_order not in ("GRAY", self.manifest.preprocessing.color_order)

    def close(self) -> None:
        """Wait for the stream, then release contexts, engines and device memory (in that order)."""
        with self._lock:
            if self.pipeline is not None:
                self.pipeline.synchronize()
            self._calls.clear()  # the contexts first, then the engines they were made from
            self._engines.clear()
            self.pipeline = None


def create(request: BackendRequest) -> TensorRTBackend:
    """The registry's factory.

    Raises:
        BundleError: For a bundle layout the native pipeline cannot run (checked before any GPU check).
        ValueError: For ``build_on_load`` (the exporter builds engines, not the runtime).
        TensorRTUnavailableError: Without TensorRT, a GPU or engines for this GPU.
    """
    require_per_location(request.bundle, request.manifest)  # before any GPU check: the bundle itself is the problem
    if request.build_on_load:
        raise ValueError(f"build_on_load: {BUILD_ELSEWHERE.format(bundle=request.bundle)}")
    return TensorRTBackend(
        request.bundle, request.manifest, precision=request.precision, max_batch=request.max_batch,
        cuda_graphs=request.cuda_graphs,
    )  # fmt: skip


def _dims(value: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a tuple."""
    return tuple(int(d) for d in value)


def _check_engine(
    trt: Any,
    engine: Any,
    path: Path,
    inp: str,
    shape: tuple[int, int, int],
    map_size: tuple[int, int],
    max_batch: int,
    *,
    score: str | None = None,
) -> None:
    """Check one engine against what the pipeline will give it, before any launch.

    Input ``(batch, *shape)`` float32 (a location's ``(channels, tile_h,
    tile_w)``, or the thumbnail's ``(channels, size, size)``) with an
    optimization profile 0 whose min batch is 1 and max batch at least
    ``max_batch`` (and the same ``shape`` at min, opt and max); output ``map``
    ``(batch, 1, *map_size)`` float32; the score output (detector bundles)
    ``(batch,)`` float32. A batch dimension may be dynamic (-1).

    Raises:
        BundleError: Naming the engine, the tensor, what it has and what the pipeline expects.
    """
    out = OUTPUT_NAME
    for name in (inp, out) if score is None else (inp, out, score):
        dtype = engine.get_tensor_dtype(name)
        if dtype != trt.DataType.FLOAT:
            raise BundleError(f"engine {path}: tensor {name!r} is {dtype}, expected float32 (DataType.FLOAT)")
    for name, want in ((inp, tuple(shape)), (out, (1, *map_size))):
        got = _dims(engine.get_tensor_shape(name))
        if len(got) != 4 or got[1:] != want or got[0] not in (-1, max_batch):
            raise BundleError(
                f"engine {path}: tensor {name!r} has shape {got}, expected (batch, {', '.join(map(str, want))}) "
                f"for this bundle's pipeline"
            )
    if score is not None:
        got = _dims(engine.get_tensor_shape(score))
        if len(got) != 1 or got[0] not in (-1, max_batch):
            raise BundleError(f"engine {path}: tensor {score!r} has shape {got}, expected (batch,): one score per tile")
    if int(engine.num_optimization_profiles) < 1:
        raise BundleError(f"engine {path}: no optimization profile, expected one taking batches 1 to {max_batch}")
    lo, opt, hi = (_dims(d) for d in engine.get_tensor_profile_shape(inp, 0))
    c, th, tw = shape
    for label, dims in (("min", lo), ("opt", opt), ("max", hi)):
        if len(dims) != 4 or dims[1:] != tuple(shape):
            raise BundleError(
                f"engine {path}: profile {label} shape of {inp!r} is {dims}, expected (batch, {c}, {th}, {tw})"
            )
    if lo[0] != 1 or hi[0] < max_batch:
        raise BundleError(
            f"engine {path}: profile takes batches {lo[0]} to {hi[0]} (opt {opt[0]}), the pipeline needs 1 to "
            f"{max_batch} (max_batch); rebuild with `tilead-export BUNDLE --trt --max-batch {max_batch}` or lower it"
        )


def _make_pipeline(
    manifest: Manifest, max_batch: int, post: _kernels.PostSpec, *, location_scores: bool = False
) -> Any:
    """The extension's DevicePipeline for this bundle's grid, preprocessing, post-processing and thumbnail branch."""
    prep = manifest.preprocessing
    h, w = manifest.map_size
    thumbnail = None if manifest.thumbnail is None else manifest.thumbnail.native()
    return _kernels.cuda.DevicePipeline(
        manifest.grid.native, max_batch, prep.channels, prep.channels, prep.scale, prep.bias, h, w, post,
        location_scores=location_scores, thumbnail=thumbnail,
    )  # fmt: skip
