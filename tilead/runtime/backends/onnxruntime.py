"""The ONNX Runtime backend: one session per tile location, locations side by side on a CPU.

Every image's tile for a location goes through that location's session in one
call (batched tiles). On a CPU a small pool of worker threads runs different
locations' sessions at the same time, each session with a share of the thread
budget (``threads // location_workers`` intra-op threads). On this project's
2-core reference machine two workers with one thread each are about 1.2x
faster than one session at a time with two threads: the per-position
Mahalanobis products of one location are memory-bound and overlap with the
convolutions of another.

A ``shared_backbone`` bundle (:mod:`tilead.runtime.bundle`) has one more
session, the backbone's (one copy of its weights for all locations): every
tile of every location goes through it in a few batched calls (at most
:data:`~tilead.runtime.backends.base.BACKBONE_CHUNK_BYTES` of tiles each,
which bounds the activations, spread over the location workers like the
locations are), its features written through I/O binding straight into a
reused buffer; then each location's head session runs on its block of
features as above.

Thread safety: sessions are created once and only read afterwards; ONNX
Runtime's ``InferenceSession.run`` may be called from several threads at once,
and every buffer of a call is its own, so concurrent calls return exactly the
serial results (tested).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime._checks import describe
from tilead.runtime.backends.base import (
    BackendRequest,
    BufferPool,
    Capabilities,
    Job,
    LocationOutputs,
    TileStream,
    location_jobs,
    run_backbone,
    run_backbone_stream,
    run_locations,
    run_with_thumbnail,
    threads_and_workers,
)
from tilead.runtime.buffers import Allocate
from tilead.runtime.bundle import (
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SCORE_NAME,
    BundleError,
    Manifest,
    check_backbone_io,
    check_model_io,
    check_thumbnail_io,
    ort_specs,
)
from tilead.runtime.cpu_features import int8_verdict
from tilead.runtime.engines import onnx_digest
from tilead.runtime.timing import StageTimes

log = logging.getLogger("tilead.runtime.backends.onnxruntime")

CAPABILITIES = Capabilities(devices=("cpu", "cuda"), full_pipeline=False, detector_score=True, thumbnail=True)
BF16_REFUSED = (
    "backend='onnxruntime' does not run bf16 bundles (precision {precision}): their heads were refit on OpenVINO's "
    "bf16 backbone features, and ONNX Runtime would compute other ones (wrong statistics); use backend='hybrid' (or "
    "'auto') on a CPU with bf16 units, or export the run as fp32 or int8"
)


def ort_trt_cache(manifest: Manifest) -> Path:
    """Where ONNX Runtime's TensorRT provider caches engines for a bundle: outside the bundle.

    ``$TILEAD_CACHE`` (default ``$XDG_CACHE_HOME/tilead``, else ``~/.cache/tilead``)
    ``/onnxruntime-trt/<digest of the locations' ONNX sha256s>``. The provider
    loads cached engines without any hash check, so they are never read from
    the bundle, where anyone who can edit the bundle could plant one; the
    cache belongs to the user running the Predictor. Engines depend on the
    ONNX files only, so a recalibrated bundle keeps its cache and a
    re-exported one gets a new folder.
    """
    base = os.environ.get("TILEAD_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilead"
    )
    return Path(base) / "onnxruntime-trt" / onnx_digest([loc.sha256 for loc in manifest.files])


INSTALL_ORT = (
    "install one ONNX Runtime wheel: pip install 'tilead[cpu]' (onnxruntime) or, on a machine with an NVIDIA GPU, "
    "pip install 'tilead[gpu]' (onnxruntime-gpu); never both, they install the same module"
)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def import_ort() -> Any:
    """The ``onnxruntime`` module (from either wheel).

    Raises:
        ImportError: If neither ``onnxruntime`` nor ``onnxruntime-gpu`` is installed, saying how to install one.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(f"tilead's ONNX Runtime backend needs ONNX Runtime ({err}): {INSTALL_ORT}") from None
    return ort


def trt_profile_shapes(manifest: Manifest, max_batch: int) -> dict[str, str]:
    """The TensorRT provider's profile options: batch 1 to ``max_batch`` of the bundle's tiles.

    With explicit profile shapes the provider builds one engine per location for
    the whole range at the first run; without them it rebuilds whenever a call
    brings a batch size outside what it has seen.

    Raises:
        ValueError: If ``max_batch`` is below 1.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch: expected at least 1, got {max_batch}")
    c, (th, tw) = manifest.preprocessing.channels, manifest.grid.tile_size

    def shape(n: int) -> str:
        return f"{INPUT_NAME}:{n}x{c}x{th}x{tw}"

    return {
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(max_batch),
        "trt_profile_max_shapes": shape(max_batch),
    }


def session_providers(device: str, manifest: Manifest, max_batch: int = 1) -> list[Any]:
    """ONNX Runtime providers for ``device``.

    On CUDA: TensorRT's provider when present (engine cache outside the bundle: :func:`ort_trt_cache`; profile
    shapes for batch 1 to ``max_batch``: :func:`trt_profile_shapes`), then CUDA's.

    Raises:
        RuntimeError: For ``cuda`` without ONNX Runtime's CUDA provider.
        ValueError: For an unknown device.
    """
    ort = import_ort()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "device='cuda': this onnxruntime has no CUDAExecutionProvider (available: "
                f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU"
            )
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in available:
            cache = ort_trt_cache(manifest)
            options = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                **trt_profile_shapes(manifest, max_batch),
            }
            providers.append(("TensorrtExecutionProvider", options))
        return [*providers, "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {describe(device)}")


def provider_names(requested: Sequence[Any]) -> list[str]:
    """Names of providers given as names or ``(name, options)`` pairs."""
    return [p[0] if isinstance(p, tuple) else str(p) for p in requested]


def check_providers(requested: Sequence[Any], used: Sequence[str], location: str) -> None:
    """Fail when a GPU provider was requested but the session runs on the CPU only.

    ONNX Runtime silently drops a provider it cannot load (the CPU wheel has no
    CUDA; a CUDA or cuDNN library is missing) and runs on the CPU. When the
    TensorRT provider is dropped but CUDA's runs, the session is still on the
    GPU: that is logged, not raised (onnxruntime-gpu lists TensorRT's provider
    even where TensorRT's libraries are not installed).

    Args:
        requested: Providers passed to the session (names or ``(name, options)``).
        used: ``session.get_providers()``.
        location: The location, for the message.

    Raises:
        RuntimeError: If a GPU provider was requested and none is in ``used``.
    """
    wanted = [n for n in provider_names(requested) if n in GPU_PROVIDERS]
    if not wanted:
        return
    if not any(n in used for n in GPU_PROVIDERS):
        raise RuntimeError(
            f"location {location}: ONNX Runtime was asked for {', '.join(wanted)} but fell back to "
            f"{', '.join(used) or 'nothing'}; the GPU provider could not load (CPU-only onnxruntime wheel, or a "
            "missing CUDA/cuDNN library: see ONNX Runtime's warnings above). "
            f"On a GPU machine: {INSTALL_ORT}"
        )
    dropped = [n for n in wanted if n not in used]
    if dropped:
        log.warning("location %s: ONNX Runtime dropped %s; running on %s", location, ", ".join(dropped), used[0])


def release_model_bytes(session: Any, providers: list[Any]) -> None:
    """Let go of the model bytes an ONNX Runtime session was created from, on the CPU provider alone.

    ``onnxruntime.InferenceSession`` keeps the bytes it was given for as long as
    the session lives (``_model_bytes``, only read again to rebuild the session
    when a GPU provider fails and it falls back to another): the size of every
    model file, again, for the lifetime of the Predictor (816 MiB of heads at
    2048x2048 in 4x4 tiles). With only the CPU provider there is nothing to fall
    back to: fallback is switched off (public API) and the reference dropped.
    """
    if [p if isinstance(p, str) else p[0] for p in providers] != ["CPUExecutionProvider"]:
        return
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Creating a session parses the model's protobuf and copies (or folds) its
    initializers; glibc keeps the freed protobuf's pages in its heap instead
    of unmapping them, so each loaded location left its file size resident
    for nothing (816 MiB over 16 heads of 51 MB). Called after each session.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """The C library's ``malloc_trim`` (glibc), or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


CONSTANT_FOLDING_KEY = "tilead.constant_folding"
"""Model metadata key: ``off`` asks for the graph to be loaded without constant folding.

The exporter sets it on graphs whose fp16 constants are widened in small chunks on purpose
(:mod:`tilead.exporter.compact_heads`): folded, each would hold an fp32 copy of its state."""
CONSTANT_FOLDING_OFF = "off"


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: ``(value, next position)``; ValueError past the end or over 10 bytes."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes | memoryview | int]]:
    """The top-level ``(field number, wire type, value)`` s of a protobuf message (ValueError if malformed)."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("a length-delimited field runs past the end")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise ValueError("a fixed-size field runs past the end")
        else:
            raise ValueError(f"unsupported wire type {wire}")


def model_metadata(model: bytes) -> dict[str, str]:
    """An ONNX model's ``metadata_props`` read from its bytes, without parsing the graph (no ``onnx`` needed).

    Walks the top level of the ``ModelProto`` (field 14 holds the ``key``/``value``
    string pairs) and skips every other field by its length, so a 50 MB model
    costs microseconds. Bytes that are not a well-formed message give ``{}``
    (ONNX Runtime then reports what is wrong when it loads them).
    """
    view = memoryview(model)
    out: dict[str, str] = {}
    try:
        for number, wire, value in _fields(view):
            if number != 14 or wire != 2 or isinstance(value, int):
                continue
            entry: dict[int, str] = {}
            for sub, sub_wire, text in _fields(value):
                if sub in (1, 2) and sub_wire == 2 and not isinstance(text, int):
                    entry[sub] = bytes(text).decode("utf-8")
            out[entry.get(1, "")] = entry.get(2, "")
    except (ValueError, UnicodeDecodeError):
        return {}
    return out


def folds_constants(model: bytes) -> bool:
    """False when the model's metadata asks to be loaded without constant folding (:data:`CONSTANT_FOLDING_KEY`)."""
    return model_metadata(model).get(CONSTANT_FOLDING_KEY) != CONSTANT_FOLDING_OFF


def session_options(ort: Any, threads: int, *, cpu_only: bool, fold: bool, mem_pattern: bool = True) -> Any:
    """Options of one session: ``threads`` intra-op threads, no spinning, the shared arena on the CPU.

    With ``fold`` False (a model that asks for it, :func:`folds_constants`):
    constant folding off and the level ``ORT_ENABLE_EXTENDED``, since the layout
    pass of ``ORT_ENABLE_ALL`` folds constants on its own.

    With ``mem_pattern`` False on the CPU, ONNX Runtime's memory pattern is off:
    with it a session keeps one block per input shape for all of a run's
    activations at once (their planned peak, held for the session's life, next to
    the shared arena); without it each activation comes from the shared arena and
    goes back to it when freed. The locations' graphs (heads of a
    ``shared_backbone`` bundle, full per-location graphs), which run on a batch of
    tiles, take it off (issue #21: 97 MiB less peak RSS at 2048x2048 shared, about
    520 MiB less for the bottle per-location bundle, batch 1 then 8,
    ``benchmarks/bench_memory.py``; no speed change measurable on a shared CPU); the
    shared backbone (one tile per call) and the thumbnail model keep it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fold else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    # Sessions run side by side on the location workers: idle pools must not spin on the cores the others need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    # Inter-op parallelism comes from the location workers; graphs are sequential chains.
    options.inter_op_num_threads = 1
    if cpu_only:
        use_shared_cpu_arena(ort, options)
        options.enable_mem_pattern = mem_pattern
    return options


def load_session(ort: Any, model: bytes, providers: list[Any], threads: int, *, mem_pattern: bool = True) -> Any:
    """An ``InferenceSession`` of ``model`` with :func:`session_options` (constant folding as the model asks)."""
    cpu_only = [p if isinstance(p, str) else p[0] for p in providers] == ["CPUExecutionProvider"]
    fold = folds_constants(model)
    options = session_options(ort, threads, cpu_only=cpu_only, fold=fold, mem_pattern=mem_pattern)
    extra: dict[str, Any] = {} if fold else {"disabled_optimizers": ["ConstantFolding"]}
    return ort.InferenceSession(model, sess_options=options, providers=providers, **extra)


_ENV_ARENA_LOCK = threading.Lock()
_ENV_ARENA = False


def use_shared_cpu_arena(ort: Any, options: Any) -> None:
    """Let a CPU session allocate its activations from one arena shared by every session of the process.

    By default each ONNX Runtime session has its own arena, which keeps the
    session's peak activations (and grows in powers of two): with one session
    per location that is a peak per location, held for the Predictor's life
    (about 80 MiB per PaDiM head at 2048x2048, batch 8). With the arena
    registered once in ONNX Runtime's environment and ``session.use_env_allocators``,
    the memory held is the peak of the sessions that run *at the same time*
    (the location workers), and it grows by what is asked (``kSameAsRequested``).
    Registered on first use; if something else in the process registered a CPU
    allocator first, the sessions share that one.
    """
    global _ENV_ARENA
    with _ENV_ARENA_LOCK:
        if not _ENV_ARENA:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # (max_mem 0: no limit, extend strategy 1: kSameAsRequested, defaults for the chunk sizes)
            try:
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            except Exception as err:  # an allocator for the CPU is already registered: share it
                log.debug("ONNX Runtime's shared CPU arena: %s", err)
            _ENV_ARENA = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def open_checked_session(
    ort: Any,
    model: bytes,
    providers: list[Any],
    threads: int,
    what: str,
    file: str,
    name: str,
    *,
    mem_pattern: bool = True,
) -> Any:
    """A session of ``model`` (:func:`load_session`) checked for its providers, its bytes released.

    Args:
        ort: The ``onnxruntime`` module.
        model: The ONNX bytes.
        providers: Execution providers asked for.
        threads: Intra-op threads.
        what: Names the model in errors (``location r0c0``, ``the shared backbone``).
        file: The model's file in the bundle, for errors.
        name: Names the model in provider warnings.
        mem_pattern: ONNX Runtime's memory pattern (:func:`session_options`).

    Raises:
        BundleError: If ONNX Runtime cannot load the model.
    """
    try:
        session = load_session(ort, model, providers, threads, mem_pattern=mem_pattern)
    except Exception as err:  # onnxruntime raises its own exception types
        raise BundleError(f"{what}: ONNX Runtime cannot load {file}: {err}") from err
    check_providers(providers, session.get_providers(), name)
    release_model_bytes(session, providers)
    return_freed_heap()
    return session


def load_location_sessions(
    ort: Any, manifest: Manifest, models: Sequence[bytes], providers: list[Any], threads: int
) -> list[Any]:
    """One checked session per model of the manifest (full location graphs or heads), in its order.

    They run on a batch of tiles, so without ONNX Runtime's memory pattern (:func:`session_options`);
    their inputs and outputs are checked against the manifest at load rather than at the first predict.

    Raises:
        BundleError: If a model cannot be loaded or its inputs and outputs disagree with the manifest.
    """
    sessions: list[Any] = []
    for loc, model in zip(manifest.models, models, strict=True):
        session = open_checked_session(
            ort, model, providers, threads, f"location {loc.name}", loc.file, loc.name, mem_pattern=False
        )
        del model  # a VerifiedModels item: read for this session only
        check_model_io(loc.name, ort_specs(session.get_inputs()), ort_specs(session.get_outputs()), manifest)
        sessions.append(session)
    return sessions


def run_heads(
    manifest: Manifest,
    sessions: Sequence[Any] | None,
    names: list[str],
    features: np.ndarray,
    buffers: BufferPool,
    pool: ThreadPoolExecutor | None,
    timer: StageTimes | None,
    jobs: Sequence[Job] | None = None,
) -> LocationOutputs:
    """Every head session on its location's block of ``features``, then ``features`` back to ``buffers``.

    Args:
        manifest: A ``shared_backbone`` manifest.
        sessions: One head session per model (None: the Predictor is closed).
        names: The heads' outputs to fetch (``map``, and ``score`` where the bundle deploys it).
        features: float32 ``(locations, n, d, fh, fw)`` from :func:`.base.run_backbone` (taken from ``buffers``).
        buffers: Where ``features`` came from; it is given back here, also when a head fails.
        pool: The location workers, or None to run the heads one after another.
        timer: Receives ``inference`` and ``location:<name>``.
        jobs: The calls (:func:`.base.location_jobs`); None: one per model.
    """
    try:
        if sessions is None:
            raise RuntimeError("Predictor is closed")

        def run_head(index: int, block: np.ndarray) -> Sequence[np.ndarray]:
            outs: Sequence[np.ndarray] = sessions[index].run(names, {FEATURES_NAME: block})
            return outs

        return run_locations(manifest, features, run_head, pool, timer, jobs)
    finally:
        buffers.give(features)


class LeasedBuffers(BufferPool):
    """A :class:`.base.BufferPool` whose buffers come from an :data:`~tilead.runtime.buffers.Allocate` (a lease pool).

    ``give`` keeps nothing: a leased array goes back to its pool when the last view of it is gone, where the
    Predictor's image-size maps of the same call can take its memory (issue #21: peak RSS).
    """

    def __init__(self, allocate: Allocate) -> None:
        super().__init__(keep=0)
        self._allocate = allocate

    def take(self, shape: tuple[int, ...], dtype: str | np.dtype[np.generic] = "float32") -> np.ndarray:
        """A leased uninitialized C-contiguous array."""
        return self._allocate(tuple(int(d) for d in shape), np.dtype(dtype).str)

    def give(self, array: np.ndarray) -> None:
        """Nothing: the lease ends with the array's last view."""


class OnnxRuntimeBackend:
    """One ONNX Runtime session per location (see the module docstring).

    Args:
        manifest: The bundle's verified manifest.
        models: Every location's ONNX bytes, row-major (the heads of a ``shared_backbone`` bundle).
        providers: Execution providers (:func:`session_providers`).
        threads: CPU threads in all.
        location_workers: Locations run at the same time (at most the number of locations).
        backbone: The shared backbone's ONNX bytes (``shared_backbone`` bundles only).
        thumbnail: The thumbnail model's ONNX bytes (bundles with a thumbnail branch only).
        allocate: Where the shared backbone's features come from (:attr:`.base.BackendRequest.allocate`);
            None: a pool of this backend's own.

    Raises:
        BundleError: If ONNX Runtime cannot load a model, or a bundle's layout and ``backbone`` disagree.
        ValueError: For a bf16 bundle, or (on the CPU provider) an ``int8`` bundle with 8-bit weights whose heads
            were refit on a CPU whose INT8 sums differ from this one's
            (:func:`tilead.runtime.cpu_features.int8_verdict`; logged instead when the bundle does not say).
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        manifest: Manifest,
        models: Sequence[bytes],
        providers: list[Any],
        *,
        threads: int,
        location_workers: int,
        backbone: bytes | None = None,
        thumbnail: bytes | None = None,
        allocate: Allocate | None = None,
    ) -> None:
        if manifest.openvino_refit:
            raise ValueError(BF16_REFUSED.format(precision=manifest.precision))
        ort = import_ort()
        if not any(name in GPU_PROVIDERS for name in provider_names(providers)):
            verdict = int8_verdict(manifest.precision, manifest.int8_weight_bits, manifest.int8_arithmetic)
            if verdict is not None and verdict[0] == "refuse":
                raise ValueError(verdict[1])
            if verdict is not None:
                log.warning(verdict[1])
        self.manifest = manifest
        count = len(manifest.locations)  # workers counted by locations (location_jobs plans their calls)
        self.threads = threads
        self.location_workers = max(1, min(location_workers, count))
        threads_each = max(1, threads // self.location_workers)

        def open_session(model: bytes, what: str, file: str, name: str) -> Any:
            return open_checked_session(ort, model, providers, threads_each, what, file, name)

        sessions = load_location_sessions(ort, manifest, models, providers, threads_each)
        self._backbone: Any = None
        if (backbone is None) != (manifest.backbone is None):
            state = "missing" if backbone is None else "given, but the layout has no shared backbone"
            raise BundleError(f"layout {manifest.layout!r}: the backbone's model bytes are {state}")
        if backbone is not None:
            # Its calls are spread over the location workers (run_backbone): the heads' share of the threads.
            self._backbone = open_session(backbone, "the shared backbone", "backbone.onnx", "backbone")
            check_backbone_io(ort_specs(self._backbone.get_inputs()), ort_specs(self._backbone.get_outputs()), manifest)
        self._thumbnail: Any = None
        if (thumbnail is None) != (manifest.thumbnail is None):
            state = "missing" if thumbnail is None else "given, but the bundle has no thumbnail branch"
            raise BundleError(f"the thumbnail model's bytes are {state}")
        if thumbnail is not None:
            small = self._thumbnail = open_session(thumbnail, "the thumbnail model", "thumbnail.onnx", "thumbnail")
            check_thumbnail_io(ort_specs(small.get_inputs()), ort_specs(small.get_outputs()), manifest)
        self._buffers = BufferPool() if allocate is None else LeasedBuffers(allocate)
        self._sessions: list[Any] | None = sessions
        self._names = [OUTPUT_NAME, SCORE_NAME] if manifest.image_score == "detector" else [OUTPUT_NAME]
        self._jobs = location_jobs(manifest, self.location_workers)
        self._pool = (
            ThreadPoolExecutor(self.location_workers, thread_name_prefix="tilead-location")
            if self.location_workers > 1
            else None
        )

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's execution providers in priority order (as the sessions report them)."""
        sessions = self._sessions
        if not sessions:
            raise RuntimeError("Predictor is closed")
        return list(sessions[0].get_providers())

    @property
    def device_memory_bytes(self) -> int | None:
        """None: ONNX Runtime does not report what its providers hold."""
        return None

    def infer(self, tiles: np.ndarray, timer: StageTimes | None = None) -> LocationOutputs:
        """Every location's session on its tiles (see :meth:`tilead.runtime.backends.base.InferenceBackend.infer`)."""
        sessions, pool = self._sessions, self._pool
        if sessions is None:
            raise RuntimeError("Predictor is closed")
        names = self._names
        if self._backbone is None:

            def run_one(index: int, location_tiles: np.ndarray) -> Sequence[np.ndarray]:
                outs: Sequence[np.ndarray] = sessions[index].run(names, {INPUT_NAME: location_tiles})
                return outs

            return run_locations(self.manifest, tiles, run_one, pool, timer, self._jobs)
        features = run_backbone(
            self.manifest, np.ascontiguousarray(tiles), self._run_features, self._buffers, pool, timer,
            self.location_workers,
        )  # fmt: skip
        return self._run_heads(features, timer)

    @property
    def batch_per_model(self) -> bool:
        """Whether every model gets all its locations' tiles in one call (:func:`.base.location_jobs`).

        The backend plans its calls for its location workers: per model where that loads them evenly,
        else per location. Setting True forces one batched call per model, as before that plan (for
        comparisons, ``benchmarks/bench_assignment_calls.py``); False restores the plan.
        """
        return len(self._jobs) == len(self.manifest.models)

    @batch_per_model.setter
    def batch_per_model(self, value: bool) -> None:
        self._jobs = location_jobs(self.manifest, self.location_workers, per_location=False if value else None)

    @property
    def streams_tiles(self) -> bool:
        """True for a ``shared_backbone`` bundle: :meth:`infer_stream` takes the tiles a few images at a time."""
        return self._backbone is not None

    def infer_stream(self, stream: TileStream, timer: StageTimes | None = None) -> LocationOutputs:
        """:meth:`infer` on tiles made a few images at a time (:class:`.base.TileStream`; shared backbone only).

        Only the features of the whole batch are held at once, never all its tiles.

        Raises:
            BundleError: For a bundle without a shared backbone.
        """
        if self._sessions is None:
            raise RuntimeError("Predictor is closed")
        if self._backbone is None:
            raise BundleError(f"layout {self.manifest.layout!r}: streamed tiles need a shared backbone")
        features = run_backbone_stream(
            self.manifest, stream, self._run_features, self._buffers, self._pool, timer, self.location_workers
        )
        return self._run_heads(features, timer)

    def _run_features(self, part: np.ndarray, out: np.ndarray) -> None:
        """The shared backbone on ``part``, its features written straight into ``out`` (C-contiguous)."""
        backbone = self._backbone
        binding = backbone.io_binding()
        binding.bind_cpu_input(INPUT_NAME, part)
        binding.bind_output(FEATURES_NAME, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        backbone.run_with_iobinding(binding)

    def _run_heads(self, features: np.ndarray, timer: StageTimes | None) -> LocationOutputs:
        """Every head on its location's block of ``features`` (taken from the pool, given back here)."""
        return run_heads(
            self.manifest, self._sessions, self._names, features, self._buffers, self._pool, timer, self._jobs
        )

    def infer_with_thumbnail(
        self, tiles: np.ndarray, thumbnail: np.ndarray, timer: StageTimes | None = None
    ) -> tuple[LocationOutputs, np.ndarray]:
        """The locations and the thumbnail model in one call (:meth:`.base.ThumbnailInference.infer_with_thumbnail`)."""
        session = self._thumbnail
        if self._sessions is None:
            raise RuntimeError("Predictor is closed")
        if session is None:
            raise BundleError("the bundle has no thumbnail branch")

        def run_thumbnail(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            return out

        return run_with_thumbnail(
            self.manifest, lambda: self.infer(tiles, timer), run_thumbnail, thumbnail, self._pool, timer
        )

    def close(self) -> None:
        """Drop the sessions and stop the location workers."""
        self._sessions = None
        self._backbone = None
        self._thumbnail = None
        self._buffers.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def create(request: BackendRequest) -> OnnxRuntimeBackend:
    """The registry's factory: sessions for ``request.device`` with the thread budget split over locations."""
    providers = session_providers(request.device, request.manifest, request.max_batch)
    budget, workers = threads_and_workers(request)
    return OnnxRuntimeBackend(
        request.manifest,
        request.models,
        providers,
        threads=budget,
        location_workers=workers,
        backbone=request.backbone,
        thumbnail=request.thumbnail,
        allocate=request.allocate,
    )
