"""A CPU stand-in for the TensorRT runtime and the extension's DevicePipeline (tests only).

It lets the TensorRT backend's orchestration run end to end without a GPU:
"device addresses" are keys into numpy buffers, the fake pipeline runs the CPU
twins of the kernels on them, and a fake engine is an ONNX model run by ONNX
Runtime on the tile block its input address points at. What this cannot
check, the CUDA pipeline and real TensorRT engines, is left to tilead-doctor on
a GPU.

CUDA graphs are modelled as the real pipeline has them: between
``begin_capture`` and ``end_capture(key)`` every stage and every engine enqueued
on the pipeline's stream is recorded (with the shapes and addresses of that
moment) instead of run, and ``launch(key)`` replays the record; a host wait
(``stage_images``, ``synchronize``, a blocking download) during capture fails
as CUDA fails it, and :attr:`FakePipeline.fail_capture` makes capture itself
fail. The host copies into and out of pinned memory (``stage_images``,
``fetch``) stay outside the graph, as in the C++ pipeline, so a replay really
reads the newly staged images.
"""

from __future__ import annotations

import hashlib
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tilead import _kernels

GPU, CC, VERSION = "Fake GPU", "9.0", "11.4.0.106"
"""The GPU, compute capability and TensorRT version the stand-in's engine sets are built for."""


def add_engine_copies(root: Path, batch: tuple[int, int, int] = (1, 4, 4), *, compatible: bool = True) -> None:
    """List a "TensorRT" engine set in the bundle at ``root`` whose plans are copies of its ONNX models.

    One "engine" per model (per location for one_to_one, per shared model otherwise), and ``thumbnail.engine``
    for a bundle with a thumbnail branch, as the exporter's builder lists them.

    Args:
        root: A bundle directory (per-location layout).
        batch: The set's profile (min, opt, max batch).
        compatible: Whether the set is marked version-compatible.
    """
    from tilead.exporter.engines import add_engine_set
    from tilead.runtime.bundle import read_manifest, sha256_file
    from tilead.runtime.engines import EngineFile, EngineSet, engine_key, engine_sources

    manifest = read_manifest(root)
    branch = manifest.thumbnail
    sources = engine_sources(manifest.models, None if branch is None else branch.file)
    key = engine_key(GPU, CC, VERSION, "fp32", batch[2], [f.sha256 for f in sources])
    files = []
    for source in sources:
        target = root / "engines" / key / f"{source.name}.engine"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / source.file, target)
        files.append(
            EngineFile(source.name, target.relative_to(root).as_posix(), sha256_file(target), target.stat().st_size)
        )
    models, small = files[: len(manifest.models)], files[len(manifest.models) :]
    engine_set = EngineSet(
        key, GPU, CC, VERSION, "fp32", batch, 256, compatible, None, tuple(models), small[0] if small else None
    )
    add_engine_set(root, engine_set)


def assert_same_predictions(got: Any, want: Any) -> None:
    """Two lists of Predictions agree: maps to 1e-5, masks and labels exactly, scores to 1e-5."""
    assert isinstance(got, list)
    assert isinstance(want, list)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=1e-5)
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.label == w.label
        assert abs(g.score - w.score) <= 1e-5
        assert abs(g.raw_score - w.raw_score) <= 1e-5 + 1e-5 * abs(w.raw_score)


def install(monkeypatch: Any, **kwargs: Any) -> None:
    """Route the native TensorRT backend to the stand-in (``make_module(**kwargs)``, :class:`FakePipeline`)."""
    from tilead.runtime.backends import tensorrt as backend

    monkeypatch.setattr(backend, "import_runtime", lambda: make_module(**kwargs))
    monkeypatch.setattr(backend, "require_gpu", lambda: (GPU, CC))
    cuda = types.SimpleNamespace(DevicePipeline=FakePipeline)
    monkeypatch.setattr(backend, "_kernels", types.SimpleNamespace(cuda=cuda))


_BUFFERS: dict[int, tuple[FakePipeline, str]] = {}  # base address -> (pipeline, "tiles" | "maps" | "scores" | ...)
_STREAMS: dict[int, FakePipeline] = {}  # stream handle -> its pipeline (engines enqueue on it)
_SPACING = 1 << 40  # one fake allocation per 2**40 bytes: base addresses are 256-byte aligned like cudaMalloc's


class FakePipeline:
    """Same constructor and methods as ``tilead._kernels.cuda.DevicePipeline``, on the CPU twins.

    Like the real one, each location's tile and map block starts at a 256-byte
    aligned offset (``_kernels.aligned_block_floats``, the rule the C++ pipeline
    uses), and the "device addresses" are a 256-byte aligned base plus the byte
    offset, so a test can check TensorRT's alignment rule on them.
    """

    fail_capture: str | None = None
    """``"begin"`` or ``"end"``: that capture call raises as CUDA's error would (a test sets it)."""

    def __init__(self, grid: Any, max_batch: int, in_channels: int, out_channels: int, scale: list[float],
                 bias: list[float], map_h: int, map_w: int, post: Any, device: int = 0,
                 location_scores: bool = False, thumbnail: Any = None) -> None:  # fmt: skip
        if not isinstance(post, _kernels.PostSpec):  # the real constructor's type check
            raise TypeError(f"post: expected tilead._kernels.PostSpec, got {type(post).__name__}")
        if thumbnail is not None and not isinstance(thumbnail, _kernels.ThumbnailSpec):
            raise TypeError(f"thumbnail: expected tilead._kernels.ThumbnailSpec, got {type(thumbnail).__name__}")
        if thumbnail is not None and (thumbnail.grid.image_h > grid.image_h or thumbnail.grid.image_w > grid.image_w):
            raise ValueError("DevicePipeline: the thumbnail must not be larger than the image (area resize only)")
        self.thumbnail = thumbnail
        self.grid, self.max_batch = grid, max_batch
        self.in_channels, self.channels, self.scale, self.bias = in_channels, out_channels, scale, bias
        self.map_h, self.map_w, self.weights = map_h, map_w, post.weights
        self.post = post
        loc_threshold, loc_scale = post.loc_threshold, post.loc_scale
        self.loc = (np.asarray(loc_threshold, np.float32), np.asarray(loc_scale, np.float32)) if loc_threshold else None
        self.seam = post.seam
        self.norm = post.norm
        self.locations = grid.rows * grid.cols
        th, tw = grid.tile_h, grid.tile_w
        self.tile_floats = out_channels * th * tw
        self.map_floats = map_h * map_w
        self.tiles = np.zeros(self.locations * _kernels.aligned_block_floats(max_batch * self.tile_floats), np.float32)
        self.maps = np.zeros(self.locations * _kernels.aligned_block_floats(max_batch * self.map_floats), np.float32)
        self.location_scores = location_scores
        self.scores = np.zeros(self.locations * _kernels.aligned_block_floats(max_batch) if location_scores else 0,
                               np.float32)  # fmt: skip
        self.context = np.zeros(0, np.float32)
        t = thumbnail
        self.thumb_in = np.zeros(max_batch * out_channels * t.grid.image_h * t.grid.image_w if t else 0, np.float32)
        self.thumb_map = np.zeros(max_batch * t.map_h * t.map_w if t else 0, np.float32)
        self.bases: dict[str, int] = {}
        for kind in ("tiles", "maps", "scores", "context", "thumb_in", "thumb_map"):
            self._register(kind)
        self.calls: list[str] = []
        self.stream = 1000 + len(_STREAMS)
        _STREAMS[self.stream] = self
        self.device = device
        self.capturing: list[Callable[[], None]] | None = None
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.captures = 0
        self.launches = 0
        self.context_requests: list[int] = []

    def _register(self, kind: str) -> None:
        self.bases[kind] = (len(_BUFFERS) + 1) * _SPACING
        _BUFFERS[self.bases[kind]] = (self, kind)

    def _enqueue(self, name: str, fn: Callable[[], None]) -> None:
        """Run a stage now, or record it while capturing (as a stream capture records, without running)."""
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            self.calls.append(name)
            fn()

    def _host_wait(self, what: str) -> None:
        if self.capturing is not None:
            self.capturing = None  # CUDA invalidates the capture
            raise RuntimeError(f"CUDA error in {what}: cudaErrorStreamCaptureUnsupported (operation not permitted "
                               "when stream is capturing)")  # fmt: skip

    def _check(self, location: int, n: int) -> None:
        if not (0 <= location < self.locations and 1 <= n <= self.max_batch):
            raise IndexError(f"location {location} or batch {n} out of range")

    def tiles_stride(self, n: int) -> int:
        self._check(0, n)
        return 4 * int(_kernels.aligned_block_floats(n * self.tile_floats))

    def maps_stride(self, n: int) -> int:
        self._check(0, n)
        return 4 * int(_kernels.aligned_block_floats(n * self.map_floats))

    def tiles_address(self, location: int, n: int) -> int:
        self._check(location, n)
        return self.bases["tiles"] + location * self.tiles_stride(n)

    def maps_address(self, location: int, n: int) -> int:
        self._check(location, n)
        return self.bases["maps"] + location * self.maps_stride(n)

    def scores_address(self, location: int, n: int) -> int:
        self._check(location, n)
        if not self.location_scores:
            raise RuntimeError("DevicePipeline::scores_address: built without location_scores")
        return self.bases["scores"] + location * 4 * int(_kernels.aligned_block_floats(n))

    @property
    def device_bytes(self) -> int:
        buffers = (self.tiles, self.maps, self.scores, self.context, self.thumb_in, self.thumb_map)
        return int(sum(b.nbytes for b in buffers))

    # -- the thumbnail branch -----------------------------------------------------------------------

    def _thumbnail(self, n: int, what: str) -> Any:
        if self.thumbnail is None:
            raise RuntimeError(f"DevicePipeline::{what}: built without a thumbnail branch")
        self._check(0, n)
        return self.thumbnail

    def thumbnail_input_address(self, n: int) -> int:
        self._thumbnail(n, "thumbnail_input_address")
        return self.bases["thumb_in"]

    def thumbnail_map_address(self, n: int) -> int:
        self._thumbnail(n, "thumbnail_map_address")
        return self.bases["thumb_map"]

    def thumbnail_input(self, n: int, swap_rb: bool) -> None:
        """The CPU twins of the device stage: area resize, then the tile kernel on the one-tile grid."""
        t = self._thumbnail(n, "thumbnail_input")
        size_h, size_w = t.grid.image_h, t.grid.image_w

        def run() -> None:
            small = np.empty((n, size_h, size_w, self.in_channels), np.uint8)
            _kernels.resize_area(self.images, small)
            out = np.empty((1, n, self.channels, size_h, size_w), np.float32)
            _kernels.tile_images(small, t.grid, out, self.scale, self.bias, swap_rb)
            self.thumb_in[: out.size] = out.ravel()

        self._enqueue("thumbnail", run)

    def fuse(self, n: int) -> None:
        """The CPU twin of the device fusion, in place on the image-size maps."""
        t = self._thumbnail(n, "fuse")

        def run() -> None:
            small = self.thumb_map[: n * t.map_h * t.map_w].reshape(n, t.map_h, t.map_w)
            _kernels.fuse_thumbnail(small, self.image, t.fuse)

        self._enqueue("fuse", run)

    def upload_thumbnail_maps(self, maps: np.ndarray) -> None:
        t = self._thumbnail(maps.shape[0], "upload_thumbnail_maps")
        self.thumb_map[: maps.size] = maps.reshape(-1)
        assert maps.shape[1:] == (t.map_h, t.map_w)

    def download_thumbnail_maps(self, n: int) -> np.ndarray:
        t = self._thumbnail(n, "download_thumbnail_maps")
        self._host_wait("cudaStreamSynchronize")
        out: np.ndarray = self.thumb_map[: n * t.map_h * t.map_w].reshape(n, t.map_h, t.map_w).copy()
        return out

    def context_memory(self, nbytes: int) -> int:
        self.context_requests.append(nbytes)
        if nbytes > self.context.nbytes:
            self.graphs.clear()  # as the C++ pipeline: graphs hold the old address
            self.context = np.zeros((nbytes + 3) // 4, np.float32)
            self._register("context")
        return self.bases["context"]

    def use_device(self) -> None:
        self.calls.append("use_device")

    def upload(self, images: np.ndarray) -> None:
        self.stage_images(images)
        self.upload_staged(images.shape[0])

    def stage_images(self, images: np.ndarray) -> None:
        # The C++ boundary check of the real upload: dtype, contiguity, batch range, H, W and C against the grid.
        _kernels.check_pipeline_images(self.grid, self.in_channels, self.max_batch, images)
        self._host_wait("cudaStreamSynchronize")
        self.calls.append("stage")
        self.staged = images.copy()  # pinned memory

    def upload_staged(self, n: int) -> None:
        def run() -> None:
            self.images = self.staged[:n].copy()

        self._enqueue("upload", run)

    def _blocks(self, buffer: np.ndarray, n: int, floats: int) -> np.ndarray:
        """(L, n * floats) view of the padded per-location blocks of a batch of n."""
        stride = int(_kernels.aligned_block_floats(n * floats))
        return buffer[: self.locations * stride].reshape(self.locations, stride)[:, : n * floats]

    def tile(self, n: int, swap_rb: bool) -> None:
        def run() -> None:
            out = np.empty((self.locations, n, self.channels, self.grid.tile_h, self.grid.tile_w), np.float32)
            _kernels.tile_images(self.images, self.grid, out, self.scale, self.bias, swap_rb)
            self._blocks(self.tiles, n, self.tile_floats)[:] = out.reshape(self.locations, -1)

        self._enqueue("tile", run)

    def upload_location_maps(self, maps: np.ndarray) -> None:
        n = maps.shape[1]
        self._blocks(self.maps, n, self.map_floats)[:] = maps.reshape(self.locations, -1)

    def _location_maps(self, n: int) -> np.ndarray:
        return self._blocks(self.maps, n, self.map_floats).reshape(self.locations, n, self.map_h, self.map_w)

    def untile(self, n: int) -> None:
        def run() -> None:
            self.canvas = np.empty((n, self.grid.canvas_h, self.grid.canvas_w), np.float32)
            thr, sc = self.loc if self.loc is not None else (None, None)
            maps = np.ascontiguousarray(self._location_maps(n))
            _kernels.untile_maps(maps, self.grid, self.canvas, self.weights, thr, sc)

        self._enqueue("untile", run)

    def smooth_seams(self, n: int) -> None:
        def run() -> None:
            _kernels.smooth_seams(self.canvas, self.grid, self.seam)  # nothing when the spec is off

        self._enqueue("seam", run)

    def crop(self, n: int) -> None:
        """Canvas to image size as the real pipeline does: nothing (shift), crop (pad) or bilinear resize (resize)."""

        def run() -> None:
            h, w = self.grid.image_h, self.grid.image_w
            if self.grid.canvas_map == _kernels.CANVAS_IS_IMAGE:
                self.image = self.canvas
            elif self.grid.canvas_map == _kernels.CANVAS_RESIZED:
                self.calls.append("resize")
                self.image = np.empty((n, h, w), np.float32)
                _kernels.resize_maps(self.canvas, self.image)
            else:
                self.image = np.ascontiguousarray(self.canvas[:, :h, :w])

        self._enqueue("crop", run)

    def normalize(self, n: int) -> None:
        def run() -> None:
            self.mask = np.empty(self.image.shape, np.uint8)
            self.raw, self.image_scores = np.empty(n, np.float32), np.empty(n, np.float32)
            _kernels.normalize_maps(self.image, self.image, self.mask, self.raw, self.image_scores, self.norm)

        self._enqueue("normalize", run)

    def download(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.enqueue_download(n)
        return self.fetch(n)

    def enqueue_download(self, n: int) -> None:
        def run() -> None:  # into pinned memory
            loc = self._score_blocks(n).copy() if self.location_scores else None
            self.out = (self.image.copy(), self.mask.copy(), self.raw.copy(), self.image_scores.copy(), loc)

        self._enqueue("download", run)

    def fetch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._host_wait("cudaStreamSynchronize")
        self.calls.append("fetch")
        maps, mask, raw, scores, _ = self.out
        assert maps.shape[0] == n
        return maps.copy(), mask.copy(), raw.copy(), scores.copy()

    def _score_blocks(self, n: int) -> np.ndarray:
        return self._blocks(self.scores, n, 1)

    def fetch_location_scores(self, n: int) -> np.ndarray:
        if not self.location_scores:
            raise RuntimeError("DevicePipeline: built without location_scores")
        loc = self.out[4]
        assert loc is not None
        assert loc.shape == (self.locations, n)
        out: np.ndarray = np.asarray(loc).copy()
        return out

    def download_location_maps(self, n: int) -> np.ndarray:
        self._host_wait("cudaStreamSynchronize")
        out: np.ndarray = self._location_maps(n).copy()
        return out

    def download_location_scores(self, n: int) -> np.ndarray:
        self._host_wait("cudaStreamSynchronize")
        if not self.location_scores:
            raise RuntimeError("DevicePipeline: built without location_scores")
        out: np.ndarray = self._score_blocks(n).copy()
        return out

    def synchronize(self) -> None:
        self._host_wait("cudaStreamSynchronize")
        self.calls.append("sync")

    # -- CUDA graphs --------------------------------------------------------------------------------

    def begin_capture(self) -> None:
        if self.fail_capture == "begin":
            raise RuntimeError("CUDA error in cudaStreamBeginCapture: cudaErrorNotSupported (operation not supported)")
        if self.capturing is not None:
            raise RuntimeError("CUDA error in cudaStreamBeginCapture: cudaErrorIllegalState (already capturing)")
        self.capturing = []

    def end_capture(self, key: int) -> None:
        recorded, self.capturing = self.capturing, None
        if recorded is None:
            raise RuntimeError("CUDA error in cudaStreamEndCapture: cudaErrorStreamCaptureInvalidated")
        if self.fail_capture == "end":
            raise RuntimeError("CUDA error in cudaStreamEndCapture: cudaErrorStreamCaptureInvalidated "
                               "(capture was invalidated by an unsupported operation)")  # fmt: skip
        self.graphs[key] = recorded
        self.captures += 1

    def abort_capture(self) -> None:
        self.capturing = None

    def has_graph(self, key: int) -> bool:
        return key in self.graphs

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    def launch(self, key: int) -> None:
        self.calls.append("launch")
        self.launches += 1
        for step in self.graphs[key]:
            step()


def _view(address: int, count: int) -> np.ndarray:
    """``count`` floats at a fake device address; KeyError or ValueError like a bad pointer would fault."""
    base = address // _SPACING * _SPACING
    pipeline, kind = _BUFFERS[base]
    offset = address - base
    if offset % 256:
        raise ValueError(f"address {address:#x} is not 256-byte aligned (TensorRT rejects it)")
    buffer: np.ndarray = getattr(pipeline, kind)
    if offset // 4 + count > buffer.size:
        raise ValueError(f"address {address:#x}: {count} floats run past the {kind} buffer")
    return buffer[offset // 4 : offset // 4 + count]


def _shape(dims: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in dims)


class FakeEngine:
    """An "engine" whose plan is the ONNX model itself.

    Its I/O shapes are the ONNX model's (a symbolic batch is -1, as TensorRT
    reports a dynamic dimension), every output too (``map``, and ``score`` for
    detector bundles); its optimization profile takes batches
    ``profile`` = (min, opt, max). ``refuse`` names context calls that return
    False (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``);
    ``capture`` in it makes ``execute_async_v3`` fail while its stream is being
    captured (an engine that cannot be captured).
    """

    def __init__(self, plan: bytes, profile: tuple[int, int, int] = (1, 4, 4), refuse: frozenset[str] = frozenset(),
                 dtype: str = "FLOAT") -> None:  # fmt: skip
        self.session = ort.InferenceSession(plan, providers=["CPUExecutionProvider"])
        io = [self.session.get_inputs()[0], *self.session.get_outputs()]
        self.names = [t.name for t in io]
        self.shapes = {t.name: _shape(t.shape) for t in io}
        self.profile, self.refuse, self.dtype = profile, refuse, dtype
        self.num_io_tensors = len(io)
        self.num_optimization_profiles = 1
        self.device_memory_size_v2 = (1 << 20) + 256 * (hashlib.sha256(plan).digest()[0] % 7)  # differs by engine

    def get_tensor_name(self, i: int) -> str:
        return str(self.names[i])

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == self.names[0] else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if name != self.names[0] or profile_index != 0:
            raise ValueError(f"no profile {profile_index} for {name}")
        rest = self.shapes[name][1:]
        return [(b, *rest) for b in self.profile]

    def create_execution_context(self, strategy: str = "STATIC") -> FakeContext:
        return FakeContext(self, strategy)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: str = "STATIC") -> None:
        self.engine = engine
        self.strategy = strategy
        self.memory: tuple[int, int] | None = None
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []

    def set_device_memory(self, memory: int, size: int) -> None:
        if self.strategy != "USER_MANAGED":
            raise RuntimeError("set_device_memory needs a context created with USER_MANAGED allocation")
        if memory % 256 or size < self.engine.device_memory_size_v2:
            raise ValueError(f"device memory {memory:#x} ({size} bytes): needs 256-byte alignment and at least "
                             f"{self.engine.device_memory_size_v2} bytes")  # fmt: skip
        _view(memory, size // 4)  # a real (fake) device allocation of that size
        self.memory = (memory, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if "set_input_shape" in self.engine.refuse:
            return False
        lo, _, hi = self.engine.profile
        if name != self.engine.names[0] or not lo <= shape[0] <= hi or shape[1:] != self.engine.shapes[name][1:]:
            return False  # TensorRT refuses a shape outside the profile
        self.shape = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if "set_tensor_address" in self.engine.refuse or address % 256 or name not in self.engine.names:
            return False  # TensorRT refuses a misaligned address
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if "execute_async_v3" in self.engine.refuse:
            return False
        if self.strategy == "USER_MANAGED" and self.memory is None:
            return False  # TensorRT: no device memory set for a USER_MANAGED context
        self.streams.append(stream)
        pipeline = _STREAMS[stream]
        if pipeline.capturing is not None and "capture" in self.engine.refuse:
            pipeline.capturing = None  # the capture is invalidated
            return False
        assert self.shape is not None
        shape, addresses = self.shape, dict(self.addresses)  # what a capture bakes in

        def run() -> None:
            inp, *outs = self.engine.names
            tiles = _view(addresses[inp], int(np.prod(shape))).reshape(shape)
            results = self.engine.session.run(None, {inp: tiles})
            for name, result in zip(outs, results, strict=True):
                _view(addresses[name], result.size)[:] = result.ravel()

        pipeline._enqueue("engine", run)
        return True


def make_module(
    version: str = "11.4.0.106",
    *,
    profile: tuple[int, int, int] = (1, 4, 4),
    refuse: tuple[str, ...] = (),
    dtype: str = "FLOAT",
    edit: Callable[[FakeEngine], None] | None = None,
) -> types.ModuleType:
    """A module with the runtime API the backend touches (see tilead.runtime.backends.tensorrt_modules.RUNTIME_API).

    Args:
        version: ``__version__`` of the module.
        profile: (min, opt, max) batch of every engine's optimization profile.
        refuse: Context calls that return False (see :class:`FakeEngine`; ``capture``: execute_async_v3 during
            a capture); with ``deserialize_cuda_engine`` the runtime returns None for every plan.
        dtype: What ``get_tensor_dtype`` reports for every tensor ("FLOAT" or "HALF").
        edit: Called on every deserialized engine (a test changes its reported shapes there).
    """
    trt = types.ModuleType("tensorrt_lean")
    trt.__version__ = version  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
            if "deserialize_cuda_engine" in refuse:
                return None  # how TensorRT reports a plan it cannot load
            engine = FakeEngine(plan, profile, frozenset(refuse), dtype)
            if edit is not None:
                edit(engine)
            return engine

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.ICudaEngine = FakeEngine  # type: ignore[attr-defined]
    trt.IExecutionContext = FakeContext  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(  # type: ignore[attr-defined]
        STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"
    )
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF")  # type: ignore[attr-defined]
    return trt


LAYERS: list[tuple[str, list[str]]] = [
    ("node_conv", ["feat"]),
    ("head.mean", ["head.mean"]),  # a constant layer: named after its initializer
    ("node_sub_9", ["diff"]),
    ("node_sub_97", ["diff2"]),
    ("node_sum_1_reduce", ["sum_part"]),  # one of the layers of a node made of several
    ("node_sum_1", ["sum_1"]),
    ("node_sqrt", ["sqrt"]),
]
"""The stand-in network's layers as (name, output names), as TensorRT 10's ONNX parser would name them."""


def make_builder_module(
    major: int, log: list[str], *, reject_parse: bytes | None = None, reject_build: bytes | None = None
) -> types.ModuleType:
    """A full-TensorRT stand-in whose builder records what it was asked to do.

    A plan is ``PLAN|<flags>|<profile>|<cache it started from>|<model bytes>``; the
    timing cache grows by one ``+`` per build, so a test can see it being shared.
    A model containing ``reject_parse`` does not parse (``parse`` returns False
    with two parser errors); one containing ``reject_build`` does not build
    (``build_serialized_network`` returns None), as TensorRT reports failures.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.4.0.1"  # type: ignore[attr-defined]
    flags = ["TF32", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"] + (
        ["FP16", "OBEY_PRECISION_CONSTRAINTS"] if major == 10 else []
    )
    trt.float32 = "float32"  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            pass

    class Layer:
        """A parsed layer: ``name``, outputs by name; records the precision it is pinned to."""

        def __init__(self, name: str, outputs: list[str]) -> None:
            self.name, self.precision = name, "default"
            self.outputs = [types.SimpleNamespace(name=o) for o in outputs]
            self.output_types: dict[int, str] = {}

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_output(self, index: int) -> Any:
            return self.outputs[index]

        def set_output_type(self, index: int, dtype: str) -> None:
            self.output_types[index] = dtype

    class Network:
        """Every parsed model has the same layers: a backbone, then a head as TensorRT's parser names them."""

        def __init__(self, flags: int) -> None:
            self.flags, self.model = flags, b""
            self.layers = [Layer(n, o) for n, o in LAYERS]

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name="tiles")

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, index: int) -> Layer:
            return self.layers[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return self.errors[index]

        def parse(self, data: bytes) -> bool:
            if reject_parse is not None and reject_parse in data:
                self.errors = ["node 3 (Einsum): unsupported equation", "network has no output"]
                return False
            self.network.model = data
            return True

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = ["TF32"]  # TensorRT's default: TF32 on
            self.cache = Cache(b"")

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            log.append(f"workspace {size >> 20}")

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def clear_flag(self, flag: str) -> None:
            if flag in self.flags:
                self.flags.remove(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            self.profile = profile.shapes

        def create_timing_cache(self, data: bytes) -> Cache:
            return Cache(data)

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
            self.shapes = (lo, opt, hi)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            if reject_build is not None and reject_build in network.model:
                log.append("build failed")
                return None
            started = config.cache.data
            config.cache = Cache(started + b"+")
            log.append(f"build flags={','.join(config.flags)} network={network.flags} cache={started.decode()}")
            pinned = [f"{x.name}:{x.precision}/{','.join(x.output_types.values())}" for x in network.layers
                      if x.precision != "default"]  # fmt: skip
            if pinned:
                log.append(f"fp32 layers {' '.join(pinned)}")
            return b"|".join([b"PLAN", ",".join(config.flags).encode(), repr(config.profile).encode(), started,
                              network.model])  # fmt: skip

    for name, cls in {"Logger": Logger, "OnnxParser": OnnxParser, "Builder": Builder, "IBuilderConfig": Config,
                      "IOptimizationProfile": Profile, "INetworkDefinition": Network,
                      "ILayer": Layer}.items():  # fmt: skip
        setattr(trt, name, cls)
    return trt
