"""What the Predictor asks of a backend, and the shared per-location loop of the inference-only backends.

Two kinds of backend fit one protocol (:class:`Backend`):

* **Inference only** (``capabilities.full_pipeline`` False: ONNX Runtime,
  OpenVINO). The Predictor tiles on the host and calls
  :meth:`InferenceBackend.infer` with every location's tiles; the backend runs
  each location's model and returns the raw maps and, for bundles whose
  ``image_score`` is ``detector``, the per-tile scores. Untiling, seams and
  normalization stay in the Predictor (:func:`tilead.runtime.postprocessor.postprocess_maps`).
* **Full pipeline** (``capabilities.full_pipeline`` True: native TensorRT).
  The backend takes the uint8 images and runs tiling, inference, untiling,
  seams and normalization itself (:meth:`PipelineBackend.run_images`).

Every backend is built from one :class:`BackendRequest` by the factory the
registry (:mod:`tilead.runtime.backends`) names.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, overload, runtime_checkable

import numpy as np

from tilead.runtime import orientation
from tilead.runtime.buffers import Allocate
from tilead.runtime.bundle import BundleError, Manifest, read_verified_file
from tilead.runtime.files import LocationFile
from tilead.runtime.postprocess import NormalizedMaps
from tilead.runtime.preprocess import InputOrder
from tilead.runtime.timing import StageTimes, timed

LocationOutputs = tuple[np.ndarray, np.ndarray | None]
"""``(maps, scores)``: float32 ``(locations, n, h, w)`` and float32 ``(locations, n)`` or None."""
BranchOutputs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
"""``(maps, scores, thumbnail)``: :data:`LocationOutputs` and the thumbnail model's raw maps float32 ``(n, h, w)``
(None without a thumbnail branch)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    Attributes:
        devices: Devices it runs on (``"cpu"``, ``"cuda"``).
        full_pipeline: It runs tiling, inference and post-processing itself
            (:class:`PipelineBackend`); otherwise inference only (:class:`InferenceBackend`).
        detector_score: It returns the per-tile ``score`` output of bundles
            whose ``image_score`` is ``detector``.
        thumbnail: It runs a bundle's thumbnail model (:class:`ThumbnailInference`).
    """

    devices: tuple[str, ...]
    full_pipeline: bool
    detector_score: bool
    thumbnail: bool = False


class VerifiedModels(Sequence[bytes]):
    """Model files' bytes, each read and verified when it is indexed, so that at most one is held at a time.

    A backend that walks the sequence once (``for model in request.models``)
    and lets each bytes object go once its session exists never holds more
    than one model file's bytes: for a 16-location bundle of 51 MB heads that
    is 816 MB less at load (peak RSS) than reading them all first. Every file
    is checked (size, sha256) on the very bytes returned
    (:func:`~tilead.runtime.bundle.read_verified_file`), so what a backend
    loads is always what was hashed; a bad file raises :class:`BundleError`
    when it is reached.

    Args:
        bundle: Bundle directory.
        entries: The manifest's entries, in the order the backend loads them.
    """

    def __init__(self, bundle: Path, entries: Sequence[LocationFile]) -> None:
        self.bundle = Path(bundle)
        self.entries = tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return VerifiedModels(self.bundle, self.entries[index])
        return read_verified_file(self.bundle, self.entries[index])


@dataclass(frozen=True)
class BackendRequest:
    """Everything a backend factory gets from the Predictor.

    Attributes:
        bundle: Bundle directory.
        manifest: Its manifest (files verified).
        models: Every model's ONNX bytes in ``manifest.models`` order: one per location, row-major, or one
            per shared model (task assignment) (read by the Predictor; empty for a
            backend whose registry entry has ``reads_onnx`` False): for a ``shared_backbone``
            bundle the heads. A :class:`VerifiedModels` reads each file when indexed: walk it
            once and drop each item after loading it.
        backbone: The shared backbone's ONNX bytes (``shared_backbone`` bundles), else None.
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for inference in all (None: the machine's logical cores).
        location_workers: Locations run at the same time (None: the backend's default).
        max_batch: Most images per call.
        precision: Engine precision for backends that have several (TensorRT), or None.
        build_on_load: Asks the backend to build missing engines (refused: the exporter builds them).
        cuda_graphs: Capture and replay CUDA graphs per batch size (the TensorRT backend; others ignore it).
        thumbnail: The thumbnail model's ONNX bytes (bundles with a thumbnail branch), else None.
        bf16_backbone: Run the shared backbone in bfloat16 (heads in float32): only backends whose
            registry entry has ``bf16_backbone`` True accept it, on a CPU with bf16 units.
        allocate: Where a backend may take large per-call host arrays (the shared backbone's features) so
            that they share memory with the Predictor's image-size outputs (a
            :class:`tilead.runtime.buffers.LeasePool`'s ``take``); None: the backend's own buffers.
        native_heads: The ``hybrid`` backend: run a bf16 bundle's native PaDiM heads where it has them (False:
            the heads' ONNX graphs); other backends ignore it.
    """

    bundle: Path
    manifest: Manifest
    models: Sequence[bytes]
    device: str
    threads: int | None
    location_workers: int | None
    max_batch: int
    precision: str | None = None
    build_on_load: bool = False
    cuda_graphs: bool = True
    backbone: bytes | None = None
    thumbnail: bytes | None = None
    bf16_backbone: bool = False
    allocate: Allocate | None = None
    native_heads: bool = True


@runtime_checkable
class Backend(Protocol):
    """What every backend offers the Predictor."""

    capabilities: Capabilities
    threads: int
    """CPU threads for inference in all."""
    location_workers: int
    """Locations run at the same time."""

    @property
    def providers(self) -> list[str]:
        """What runs the models, in priority order (e.g. ONNX Runtime's execution providers).

        Raises:
            RuntimeError: After :meth:`close`.
        """
        ...

    @property
    def device_memory_bytes(self) -> int | None:
        """Device memory the backend holds, or None where it does not track it (host-memory backends)."""
        ...

    def close(self) -> None:
        """Release models, pools and device memory; idempotent."""
        ...


@runtime_checkable
class InferenceBackend(Backend, Protocol):
    """A backend that only runs the models: the Predictor tiles and post-processes."""

    def infer(self, tiles: np.ndarray, timer: StageTimes | None = None) -> LocationOutputs:
        """Run every location's model on its tiles.

        Args:
            tiles: float32 ``(locations, n, C, th, tw)``, preprocessed (the
                runtime's :func:`~tilead.runtime.preprocess.tile_images`).
            timer: Receives ``inference`` (wall time) and ``location:<name>`` stages.

        Returns:
            ``(maps, scores)``: float32 ``(locations, n, h, w)``, and float32
            ``(locations, n)`` when the bundle's image score is ``detector`` (else None).

        Raises:
            BundleError: If a model's output shape differs from the manifest's.
            RuntimeError: After :meth:`close`.
        """
        ...


@runtime_checkable
class ThumbnailInference(InferenceBackend, Protocol):
    """An inference backend that also runs a bundle's thumbnail model (``capabilities.thumbnail``)."""

    def infer_with_thumbnail(
        self, tiles: np.ndarray, thumbnail: np.ndarray, timer: StageTimes | None = None
    ) -> tuple[LocationOutputs, np.ndarray]:
        """Every location's model on its tiles and the thumbnail model on the resized images, in one call.

        Args:
            tiles: As for :meth:`InferenceBackend.infer`.
            thumbnail: float32 ``(1, n, C, size, size)``
                (:func:`tilead.runtime.thumbnail.thumbnail_tiles`).
            timer: Receives ``inference``, ``location:<name>`` and ``location:thumbnail``.

        Returns:
            ``(location outputs, thumbnail maps)``: as :meth:`InferenceBackend.infer`, and float32 ``(n, h, w)``.
        """
        ...


@runtime_checkable
class PipelineBackend(Backend, Protocol):
    """A backend that runs the whole pipeline (tile, infer, untile, seams, normalize) itself."""

    def run_images(self, batch: np.ndarray, input_order: InputOrder, timer: StageTimes | None = None) -> NormalizedMaps:
        """Score a uint8 ``(n, H, W, C)`` batch; ``input_order`` ``"GRAY"`` for one channel.

        Returns:
            Maps ``(n, H, W)``, masks, raw scores, scores and labels.
        """
        ...

    def location_outputs(self, batch: np.ndarray, input_order: InputOrder) -> LocationOutputs:
        """Raw per-location outputs of a uint8 ``(n, H, W, C)`` batch, as :meth:`InferenceBackend.infer` returns."""
        ...

    def branch_outputs(self, batch: np.ndarray, input_order: InputOrder) -> BranchOutputs:
        """:meth:`location_outputs` plus the thumbnail model's raw maps (bundles with a thumbnail branch)."""
        ...


class BufferPool:
    """Reusable numpy buffers, so a call does not allocate (and page-fault) its large arrays afresh.

    A call :meth:`take` s a buffer and :meth:`give` s it back when done with
    it; concurrent calls get different buffers (thread-safe). At most
    ``keep`` idle buffers are held, the least recently returned shape dropped first.

    Args:
        keep: Idle buffers held at most.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._idle: OrderedDict[tuple[tuple[int, ...], str], list[np.ndarray]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: str | np.dtype[np.generic] = "float32") -> np.ndarray:
        """An uninitialized C-contiguous buffer of this shape and dtype (an idle one when there is one)."""
        key = (tuple(int(d) for d in shape), np.dtype(dtype).str)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                self._count -= 1
                buffer = idle.pop()
                if not idle:
                    del self._idle[key]
                return buffer
        return np.empty(key[0], dtype=key[1])

    def give(self, array: np.ndarray) -> None:
        """Return a buffer from :meth:`take` for later calls."""
        key = (tuple(array.shape), array.dtype.str)
        with self._lock:
            self._idle.setdefault(key, []).append(array)
            self._idle.move_to_end(key)
            self._count += 1
            while self._count > self.keep:
                oldest = next(iter(self._idle))
                idle = self._idle[oldest]
                idle.pop(0)
                self._count -= 1
                if not idle:
                    del self._idle[oldest]

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self._lock:
            self._idle.clear()
            self._count = 0

    @property
    def idle_bytes(self) -> int:
        """Bytes of the idle buffers held now."""
        with self._lock:
            return sum(b.nbytes for idle in self._idle.values() for b in idle)


BACKBONE_CHUNK_BYTES = 1 << 20
"""Tile bytes per shared-backbone call at most (at least one tile per call).

Tile-at-a-time for tiles of 296x296 RGB and larger: one tile's activations
stay closer to the caches than a batch's, and a batch gains nothing per tile
(issue #21: ONNX Runtime and OpenVINO, INT8 and FP32, were faster in 16 calls
of one 512x512 tile than in one call of 16; ``benchmarks/bench_backbone_split.py``
measures calls against threads). Small tiles are still batched up to this size,
where a call's fixed cost would dominate."""


def backbone_chunks(
    total: int, tile_bytes: int, workers: int = 1, limit: int = BACKBONE_CHUNK_BYTES
) -> list[tuple[int, int]]:
    """Split ``total`` tiles into near-equal ``[lo, hi)`` runs for the shared backbone.

    At most ``limit`` bytes of tiles per run (at least one tile), and at least
    ``workers`` runs (a multiple of it where the limit splits further) so every
    worker gets a share; never more runs than tiles.
    """
    if total < 1:
        return []
    cap = max(1, limit // max(1, tile_bytes))  # tiles per run at most
    parts = -(-total // cap)
    parts = -(-max(parts, workers) // workers) * workers
    parts = min(parts, total)
    size, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (1 if i < extra else 0))
    return list(itertools.pairwise(bounds))


def float_bytes(tile: np.ndarray) -> int:
    """A tile's bytes as float32 tiles (uint8 tiles count 4 per value): the calls split as for float tiles.

    The split bounds the backbone's activations per call, which do not depend on the input's element type.
    """
    return int(tile.nbytes) if tile.dtype != np.uint8 else 4 * int(tile.size)


_Call = TypeVar("_Call")

RunBackbone = Callable[[np.ndarray, np.ndarray], None]
"""``(tiles (k, C, th, tw), out (k, d, fh, fw)) -> None``: the shared backbone's features written into ``out``."""


def run_backbone(
    manifest: Manifest,
    tiles: np.ndarray,
    run: RunBackbone,
    buffers: BufferPool,
    workers: ThreadPoolExecutor | None,
    timer: StageTimes | None,
    worker_count: int = 1,
) -> np.ndarray:
    """Every tile of every location through the shared backbone, in a few batched calls.

    The calls are spread over the location workers (each call on its own
    worker, with the session's share of the threads), like the per-location
    graphs are: on a small CPU, single-threaded calls side by side beat one
    multi-threaded call, whose threads wait for each other at every layer.

    Args:
        manifest: A ``shared_backbone`` manifest.
        tiles: float32 C-contiguous ``(locations, n, C, th, tw)``, or uint8 ``(locations, n, th, tw, C)`` for a
            backbone compiled to take them (:func:`tilead.runtime.backends.openvino.compile_backbone`).
        run: Runs the backbone on a run of tiles, writing the features into the given buffer.
        buffers: Where the feature buffer comes from (the caller gives it back when the heads are done).
        workers: The location workers, or None to run the calls one after another.
        timer: Receives ``inference`` and ``location:backbone``.
        worker_count: How many threads ``workers`` has.

    Returns:
        float32 ``(locations, n, d, fh, fw)``, taken from ``buffers``.

    Raises:
        BundleError: For a manifest without a shared backbone.
    """
    if manifest.features is None:
        raise BundleError(f"layout {manifest.layout!r} has no shared backbone")
    count, n = tiles.shape[0], tiles.shape[1]
    flat = tiles.reshape(count * n, *tiles.shape[2:])
    features = buffers.take((count, n, *manifest.features))
    out = features.reshape(count * n, *manifest.features)
    chunks = backbone_chunks(count * n, float_bytes(flat[0]), worker_count if workers is not None else 1)

    def one(bounds: tuple[int, int]) -> None:
        run(flat[bounds[0] : bounds[1]], out[bounds[0] : bounds[1]])

    return _fill_features(features, lambda: _run_calls(one, chunks, workers, timer), buffers, timer)


def _fill_features(
    features: np.ndarray, fill: Callable[[], float], buffers: BufferPool, timer: StageTimes | None
) -> np.ndarray:
    """``features`` once ``fill`` wrote them (given back to ``buffers`` if it raises), timed as the backbone's.

    Args:
        features: The feature buffer, taken from ``buffers``.
        fill: Runs the backbone calls into ``features``; returns the wall seconds they took.
        buffers: Where ``features`` came from.
        timer: Receives ``location:backbone``.
    """
    try:
        spent = fill()
    except BaseException:
        buffers.give(features)
        raise
    if timer is not None:
        timer.add("location:backbone", spent)
    return features


def _run_calls(
    one: Callable[[_Call], None],
    calls: Sequence[_Call],
    workers: ThreadPoolExecutor | None,
    timer: StageTimes | None,
) -> float:
    """``one`` on every call, on the workers where there are several calls (else in turn), timed as ``inference``.

    Returns:
        Wall seconds spent.
    """
    start = time.perf_counter()
    with timed(timer, "inference"):
        if workers is None or len(calls) == 1:
            for call in calls:
                one(call)
        else:
            list(workers.map(one, calls))
    return time.perf_counter() - start


STREAM_TILE_BYTES = 64 << 20
"""Tile bytes a streamed batch holds at a time (:class:`TileStream`; at least one image's tiles).

A batch of 8 images of 2048x2048 in 4x4 tiles of 512 is 402 MB of float32
tiles, and the uint8 stack it is cut from another 100 MB; the shared backbone
reads them one tile per call, so a backend that streams them needs only a few
images' tiles at once (issue #21: peak RSS)."""


@dataclass(frozen=True)
class TileStream:
    """A batch's tiles made a few images at a time, when a streaming backend asks for them.

    Attributes:
        images: Images in the batch (``n``).
        group: Images per :attr:`fill` call at most (the last call may get fewer).
        fill: ``fill(lo, hi)`` returns the tiles of images ``lo`` to ``hi - 1``, float32 C-contiguous
            ``(locations, hi - lo, C, th, tw)``; the array is reused by the next call.
    """

    images: int
    group: int
    fill: Callable[[int, int], np.ndarray]


@runtime_checkable
class StreamingInference(InferenceBackend, Protocol):
    """An inference-only backend that can take a batch's tiles a few images at a time (:class:`TileStream`)."""

    @property
    def streams_tiles(self) -> bool:
        """Whether :meth:`infer_stream` runs for this bundle (else the Predictor calls :meth:`infer`)."""
        ...

    def infer_stream(self, stream: TileStream, timer: StageTimes | None = None) -> LocationOutputs:
        """As :meth:`InferenceBackend.infer` on the tiles ``stream`` makes (``(locations, n, ...)`` in all)."""
        ...


def stream_group(image_tile_bytes: int, images: int, limit: int = STREAM_TILE_BYTES) -> int:
    """Images per :class:`TileStream` fill: as many as ``limit`` bytes of tiles hold, at least 1, at most ``images``."""
    return max(1, min(images, limit // max(1, image_tile_bytes)))


def stream_calls(stream: TileStream, count: int) -> Iterator[tuple[int, np.ndarray, list[tuple[int, int, int]]]]:
    """Each fill of ``stream`` with its backbone calls: ``(first image, tiles, [(location, lo, hi), ...])``.

    A call is a run ``[lo, hi)`` of one location's tiles of the fill (a call never crosses a location, so it
    writes a contiguous run of the features). The tiles array may be reused by the next fill.

    Raises:
        BundleError: If a fill is not C-contiguous ``(count, images in the fill, ...)``.
    """
    n = stream.images
    for lo in range(0, n, stream.group):
        hi = min(n, lo + stream.group)
        tiles = stream.fill(lo, hi)
        if tiles.shape[:2] != (count, hi - lo) or not tiles.flags.c_contiguous:
            want = f"C-contiguous ({count}, {hi - lo}, ...)"
            raise BundleError(f"tile stream: expected {want} tiles, got {tiles.shape}")
        chunks = backbone_chunks(hi - lo, float_bytes(tiles[0, 0]), 1)
        yield lo, tiles, [(loc, a, b) for loc in range(count) for a, b in chunks]


def run_backbone_stream(
    manifest: Manifest,
    stream: TileStream,
    run: RunBackbone,
    buffers: BufferPool,
    workers: ThreadPoolExecutor | None,
    timer: StageTimes | None,
    worker_count: int = 1,
) -> np.ndarray:
    """:func:`run_backbone` on tiles made a few images at a time: the features of the whole batch, in one buffer.

    Each group of images is tiled (``stream.fill``), then its tiles go through
    the backbone in calls that never cross a location (so every call writes a
    contiguous run of the features), spread over the workers.

    Returns:
        float32 ``(locations, n, d, fh, fw)``, taken from ``buffers``.

    Raises:
        BundleError: For a manifest without a shared backbone, or a fill of the wrong shape.
    """
    if manifest.features is None:
        raise BundleError(f"layout {manifest.layout!r} has no shared backbone")
    count, n = len(manifest.locations), stream.images
    features = buffers.take((count, n, *manifest.features))

    def fill() -> float:
        spent = 0.0
        for lo, tiles, calls in stream_calls(stream, count):

            def one(call: tuple[int, int, int], tiles: np.ndarray = tiles, lo: int = lo) -> None:
                loc, a, b = call
                run(tiles[loc, a:b], features[loc, lo + a : lo + b])

            spent += _run_calls(one, calls, workers, timer)
        return spent

    return _fill_features(features, fill, buffers, timer)


RunLocation = Callable[[int, np.ndarray], Sequence[np.ndarray]]
"""``(model index, its tiles (k * n, C, th, tw)) -> [map (k * n, 1, h, w), score (k * n,)?]``.

``k`` is the number of locations in the call (:func:`location_jobs`): all the locations the model
serves (:attr:`Manifest.groups`, one location after the other), or one location. A model may then be
called from several worker threads at once: ``run_one`` must allow that (ONNX Runtime sessions and the
native heads do; an OpenVINO model needs a stream per concurrent call)."""

Job = tuple[int, tuple[int, ...]]
"""One call of :func:`run_locations`: ``(model index, the locations whose tiles it gets)``."""


def default_location_workers(device: str, locations: int, threads: int) -> int:
    """Locations side by side when not given: on a CPU ``min(locations, threads)``, on a GPU 1."""
    return min(locations, threads) if device == "cpu" else 1


def threads_and_workers(request: BackendRequest) -> tuple[int, int]:
    """``(threads, location_workers)`` of a request: its own, or every core and :func:`default_location_workers`.

    The default counts locations, not models: a CPU backend makes one call per location
    (:func:`location_jobs`), so a bundle whose locations all share one model still runs them side by side.
    """
    budget = request.threads if request.threads is not None else (os.cpu_count() or 1)
    workers = request.location_workers
    if workers is None:
        workers = default_location_workers(request.device, len(request.manifest.locations), budget)
    return budget, workers


def lpt_makespan(sizes: Sequence[int], workers: int) -> int:
    """The busiest worker's load when ``sizes`` are queued largest first and each goes to the first free worker."""
    loads = [0] * max(1, workers)
    for size in sorted(sizes, reverse=True):
        loads[loads.index(min(loads))] += size
    return max(loads)


def location_jobs(manifest: Manifest, workers: int, per_location: bool | None = None) -> tuple[Job, ...]:
    """The calls of one inference, in the order they are queued on the location workers.

    One batched call per model (all the tiles of the locations it serves) is what a GPU wants and what
    a CPU runs fastest per tile (four 512 px tiles in one ONNX Runtime call are 2-5 % cheaper per tile
    than four calls, ``benchmarks/bench_assignment_calls.py``). But the calls run side by side on the
    location workers, and unevenly shared locations load them unevenly: k-means clusters of 7, 3, 3
    and 3 locations on two workers leave one with 10 locations' work and the other with 6, 1.26x the
    one-to-one latency at batch 8 where one call per location gives 1.02x. So the calls are per model
    when their sizes, queued largest first, load the workers evenly (no worker above
    ``ceil(locations / workers)``: one model per location, equal neighbourhood blocks), and one call
    per location otherwise (clusters, one model for all locations on two or more workers).

    Args:
        manifest: The bundle's manifest.
        workers: The backend's location workers (1: no pool, the calls one after another).
        per_location: Force one call per location (True) or per model (False); None: the rule above.

    Returns:
        ``(model index, locations)`` per call: per model largest first, or per location in row-major order.
    """
    groups = manifest.groups
    if per_location is None:
        even = -(-len(manifest.location_model) // max(1, workers))
        per_location = workers > 1 and lpt_makespan([len(g) for g in groups], workers) > even
    if per_location:
        return tuple((model, (loc,)) for loc, model in enumerate(manifest.location_model))
    order = sorted(range(len(groups)), key=lambda model: -len(groups[model]))
    return tuple((model, groups[model]) for model in order)


def run_locations(
    manifest: Manifest,
    tiles: np.ndarray,
    run_one: RunLocation,
    pool: ThreadPoolExecutor | None,
    timer: StageTimes | None,
    jobs: Sequence[Job] | None = None,
) -> LocationOutputs:
    """Run every model (side by side on ``pool`` when given) and gather checked per-location outputs.

    The calls are ``jobs`` (:func:`location_jobs`, which the CPU backends plan once for their location
    workers): a model that serves several locations (task assignment) gets all their tiles in one
    batched call, ``(k * n, ...)`` location after location, or one call per location; an oriented
    location's tiles are transformed first and its maps transformed back
    (:attr:`Manifest.location_transform`).

    Args:
        manifest: The bundle's manifest (map size, models and their locations, image score).
        tiles: float32 ``(locations, n, C, th, tw)`` (for a ``shared_backbone``
            bundle the backbone's features ``(locations, n, d, fh, fw)``).
        run_one: Runs one model; returns its outputs in the order
            ``map`` then (for ``image_score`` ``detector``) ``score``. Called from several threads at
            once with ``pool``, for the same model too when a job holds one of its several locations.
        pool: Worker threads, or None to run the calls one after another.
        timer: Receives ``inference`` and ``location:<model name>`` stages (a model's calls summed).
        jobs: The calls; None: one batched call per model.

    Returns:
        ``(maps, scores)`` as :meth:`InferenceBackend.infer` describes.

    Raises:
        BundleError: If a model's output shape differs from the manifest's, or ``jobs`` do not cover
            every location once with its model.
    """
    calls = LocationCalls(manifest, tiles, run_one, jobs)
    with timed(timer, "inference"):
        seconds = list(pool.map(calls.run, calls.jobs)) if pool is not None else [calls.run(j) for j in calls.jobs]
    return calls.outputs(seconds, timer)


class LocationCalls:
    """One inference's model calls (:func:`run_locations`): each job's outputs checked and written into the maps.

    Args:
        manifest: The bundle's manifest.
        tiles: float32 ``(locations, n, ...)``: tiles, or a shared backbone's features. A job reads only its
            own locations' blocks, so the rest may still be being written while it runs.
        run_one: Runs one model (:data:`RunLocation`).
        jobs: The calls; None: one batched call per model.

    Raises:
        BundleError: If ``jobs`` do not cover every location once with its model, or ``tiles`` has another
            number of locations than the manifest.
    """

    def __init__(
        self, manifest: Manifest, tiles: np.ndarray, run_one: RunLocation, jobs: Sequence[Job] | None = None
    ) -> None:
        m = manifest
        count, n = tiles.shape[0], tiles.shape[1]
        h, w = m.map_size
        if len(m.location_model) != count:
            raise BundleError(f"expected tiles of {len(m.location_model)} locations, got {count}")
        if jobs is None:
            jobs = location_jobs(m, 1, per_location=False)
        elif sorted(loc for _, locs in jobs for loc in locs) != list(range(count)) or any(
            m.location_model[loc] != model for model, locs in jobs for loc in locs
        ):
            raise BundleError("jobs: expected every location once, each with its own model")
        self.manifest = m
        self.jobs: tuple[Job, ...] = tuple(jobs)
        self._tiles = tiles
        self._run_one = run_one
        self.maps = np.empty((count, n, h, w), dtype=np.float32)
        self.scores = np.empty((count, n), dtype=np.float32) if m.image_score == "detector" else None

    def run(self, job: Job) -> float:
        """Run one job and write its maps (and scores); returns the seconds it took.

        Raises:
            BundleError: If the model's outputs do not have the manifest's shapes.
        """
        start = time.perf_counter()
        m, tiles = self.manifest, self._tiles
        n = tiles.shape[1]
        h, w = m.map_size
        index, group = job
        k = len(group)
        lo, hi = group[0], group[-1] + 1
        turns = [m.transform(loc) for loc in group]
        if any(turns):  # oriented locations (cluster with orient): each location's tiles turned for the model
            part = np.stack([orientation.apply(tiles[loc], t) for loc, t in zip(group, turns, strict=True)])
        else:  # a run of neighbouring locations is a view; scattered ones are gathered (one copy)
            part = tiles[lo:hi] if hi - lo == k else tiles[list(group)]
        outs = self._run_one(index, np.ascontiguousarray(part).reshape(k * n, *tiles.shape[2:]))
        what = f"location {m.locations[lo].name}" if not m.shared_models else f"model {m.models[index].name}"
        out = np.asarray(outs[0])
        if out.shape != (k * n, 1, h, w):
            raise BundleError(f"{what}: model output shape {out.shape}, the manifest promises ({k * n}, 1, {h}, {w})")
        out_maps = out.reshape(k, n, h, w)
        if any(turns):  # each map back in its location's orientation
            out_maps = np.stack([orientation.invert(o, t) for o, t in zip(out_maps, turns, strict=True)])
        if hi - lo == k:
            self.maps[lo:hi] = out_maps
        else:
            self.maps[list(group)] = out_maps
        if self.scores is not None:
            score = np.asarray(outs[1])
            if score.shape != (k * n,):
                raise BundleError(f"{what}: model output 'score' has shape {score.shape}, expected ({k * n},)")
            self.scores[list(group)] = score.reshape(k, n)
        return time.perf_counter() - start

    def outputs(self, seconds: Sequence[float], timer: StageTimes | None) -> LocationOutputs:
        """``(maps, scores)`` once every job ran; ``seconds`` (per job, in :attr:`jobs` order) go to ``timer``."""
        if timer is not None:
            per_model = [0.0] * len(self.manifest.models)
            for (index, _), sec in zip(self.jobs, seconds, strict=True):
                per_model[index] += sec
            for model, sec in zip(self.manifest.models, per_model, strict=True):
                timer.add(f"location:{model.name}", sec)
        return self.maps, self.scores


RunThumbnail = Callable[[np.ndarray], np.ndarray]
"""``(resized images' tiles (n, C, size, size)) -> map (n, 1, h, w)``: the thumbnail model."""


def run_with_thumbnail(
    manifest: Manifest,
    run_tiles: Callable[[], LocationOutputs],
    run_thumbnail: RunThumbnail,
    thumbnail: np.ndarray,
    pool: ThreadPoolExecutor | None,
    timer: StageTimes | None,
) -> tuple[LocationOutputs, np.ndarray]:
    """The locations' models and the thumbnail model in one call: the thumbnail as one more job of the workers.

    With worker threads the thumbnail runs on one of them while the locations
    run (it is queued first); without, it runs before them.

    Args:
        manifest: A manifest with a thumbnail branch.
        run_tiles: Runs every location (e.g. :func:`run_locations`), as :meth:`InferenceBackend.infer`.
        run_thumbnail: Runs the thumbnail model.
        thumbnail: float32 ``(1, n, C, size, size)``.
        pool: The location workers, or None.
        timer: Receives ``location:thumbnail`` (and, without workers, its time in ``inference``).

    Returns:
        ``(location outputs, thumbnail maps float32 (n, h, w))``.

    Raises:
        BundleError: For a manifest without a thumbnail branch, or a thumbnail output of another shape.
    """
    branch = manifest.thumbnail
    if branch is None:
        raise BundleError("the bundle has no thumbnail branch")
    n = thumbnail.shape[1]
    h, w = branch.map_size

    def one() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = np.asarray(run_thumbnail(np.ascontiguousarray(thumbnail[0])))
        if out.shape != (n, 1, h, w):
            raise BundleError(
                f"the thumbnail model: output shape {out.shape}, the manifest promises ({n}, 1, {h}, {w})"
            )
        return np.ascontiguousarray(out[:, 0], dtype=np.float32), time.perf_counter() - start

    if pool is None:
        maps, seconds = one()
        if timer is not None:
            timer.add("inference", seconds)
        outputs = run_tiles()
    else:
        future = pool.submit(one)
        try:
            outputs = run_tiles()
        except BaseException:
            if not future.cancel():
                concurrent.futures.wait([future])  # never leave the thumbnail running on the caller's buffers
            raise
        maps, seconds = future.result()
    if timer is not None:
        timer.add("location:thumbnail", seconds)
    return outputs, maps
