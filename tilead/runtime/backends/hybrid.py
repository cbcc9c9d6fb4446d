"""The hybrid backend (CPU): a bf16 bundle's backbone on OpenVINO in bfloat16, its heads on ONNX Runtime (#21).

For bundles exported with ``tilead-export RUN --precision bf16`` (PaDiM,
``shared_backbone``; :mod:`tilead.exporter.bf16`): ``backbone.onnx`` (FP32
graph) is compiled by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT``
``bf16`` (:func:`bf16_config`), whose features the heads' Gaussians were refit
on (``--precision int8_bf16``: the same with the INT8 QDQ backbone graph, its
int8 layers run by OpenVINO's int8 kernels, the rest in bf16;
:attr:`~tilead.runtime.bundle.Manifest.openvino_refit` says which bundles
these are); each location's head runs in an ONNX Runtime session, as with the
``onnxruntime`` backend. Measured on an AVX-512 BF16 CPU (docs/cpu_speed.md):
the backbone of 16 tiles of 512 takes OpenVINO bf16 95 ms where ONNX Runtime
INT8 takes 164 ms, while OpenVINO's own heads are slower than ONNX Runtime's and
hold far more memory; hence the split.

``Predictor(bundle)`` (``backend="auto"``) picks this backend for a bf16 bundle.
It refuses other bundles (their heads were fitted on FP32 or INT8 features:
a bf16 backbone would move their maps; use ``onnxruntime`` or ``openvino``) and
CPUs whose OpenVINO plugin does not list ``BF16`` (AVX-512 BF16 or AMX): bf16
is never emulated there.

Batching and threads: every tile of a batch goes through the backbone one tile
per call (:func:`~tilead.runtime.backends.base.run_backbone`), the calls spread
over the location workers, the features written into a buffer from the
Predictor's output pool; then one head call per location, spread over the same
workers (``threads // location_workers`` threads each). The backbone is compiled
with one OpenVINO stream per worker (``NUM_STREAMS``, :func:`bf16_config`), each
stream on ``threads // location_workers`` threads, so the workers' calls run side
by side. With one stream (OpenVINO's ``LATENCY`` default) the calls of several
threads on one compiled model run one at a time: measured earlier as 208 ms for
16 tiles of 512 in two 1-thread "side by side" calls against 138 ms one call at a
time on 2 threads, which had kept the calls in turn here. With two streams on 2
cores the calls really overlap (docs/cpu_speed.md, "OpenVINO streams").

Native heads: a bf16 bundle exported with them (the manifest's ``native_heads``)
has each head run by the C++ Mahalanobis kernel (:mod:`tilead.runtime.native_heads`:
packed fp16 triangles read once for the whole batch, one thread per head, the
heads side by side on the location workers) instead of its ONNX graph; no ONNX
Runtime session is then created. ``native_heads=False`` (Predictor option) runs the
graphs; older bf16 bundles without the files always do. :attr:`HybridBackend.providers`
says which heads run.

uint8 tiles: a bundle whose manifest says ``model.backbone_input`` ``uint8`` (bf16 exports since
issue #21 item 3) has its backbone compiled to take uint8 channels-last tiles and normalize them
itself (:func:`~tilead.runtime.backends.openvino.compile_backbone`); :attr:`HybridBackend.uint8_tiles`
tells the Predictor to cut such tiles (:func:`tilead.runtime.preprocess.tile_images_u8`). Older bf16
bundles keep float tiles: their heads were refit on the float input's features.

Thread safety: ONNX Runtime sessions may run from several threads at once;
the OpenVINO backbone keeps a stack of idle infer requests, one per running call.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime.backends.base import (
    BackendRequest,
    BufferPool,
    Capabilities,
    LocationOutputs,
    RunLocation,
    TileStream,
    location_jobs,
    run_backbone,
    run_backbone_stream,
    run_locations,
    threads_and_workers,
)
from tilead.runtime.backends.onnxruntime import (
    LeasedBuffers,
    import_ort,
    load_location_sessions,
    run_heads,
    session_providers,
)
from tilead.runtime.backends.openvino import (
    _Location,
    backbone_into,
    compile_backbone,
    import_openvino,
    require_bf16,
    stream_config,
)
from tilead.runtime.backends.pipelined import backbone_then_heads
from tilead.runtime.buffers import Allocate
from tilead.runtime.bundle import (
    OUTPUT_NAME,
    BundleError,
    Manifest,
    read_verified_file,
)
from tilead.runtime.native_heads import LaneHead, NativeHead
from tilead.runtime.timing import StageTimes

CAPABILITIES = Capabilities(devices=("cpu",), full_pipeline=False, detector_score=False, thumbnail=False)
NOT_BF16 = (
    "backend='hybrid' runs bf16 bundles only (tilead-export RUN --precision bf16 or int8_bf16): this bundle's heads "
    "were fitted on {precision} features, which a bf16 backbone would move; use backend='onnxruntime' or 'openvino'"
)


QUEUED_IMAGES = 1
"""Batches of at most this many images run the last backbone calls and the native heads in one queue
(:func:`~tilead.runtime.backends.pipelined.backbone_then_heads`); larger ones keep the barrier. Measured side by
side on a 2-core Zen 4 (``benchmarks/bench_pipelined_heads.py``, docs/cpu_speed.md): the queue 1.04x faster at
batch 1 (bottle and 2048²), 0.97-0.98x at batch 8."""


def bf16_config(threads: int, streams: int = 1) -> dict[str, Any]:
    """OpenVINO's CPU configuration for the bf16 backbone (the exporter's refit uses the same, one thread).

    Args:
        threads: ``INFERENCE_NUM_THREADS``, every stream's threads together (at least 1).
        streams: ``NUM_STREAMS``: calls that run side by side, each on ``threads // streams`` threads
            (:func:`~tilead.runtime.backends.openvino.stream_config`).
    """
    return stream_config({"INFERENCE_PRECISION_HINT": "bf16"}, threads, streams)


class HybridBackend:
    """OpenVINO bf16 backbone, ONNX Runtime heads (see the module docstring).

    Args:
        manifest: The bundle's verified manifest (``model.precision`` ``bf16``).
        models: Every head's ONNX bytes, in ``manifest.models`` order.
        backbone: ``backbone.onnx``'s bytes.
        threads: CPU threads in all.
        location_workers: Backbone calls, and heads, that run at the same time (the backbone's OpenVINO streams).
        allocate: Where the backbone's features come from (:attr:`.base.BackendRequest.allocate`, the
            Predictor's output pool, so that the merged maps reuse their memory); None: a pool of its own.
        bundle: The bundle's folder, where the native heads are read from (None: the ONNX heads run).
        native_heads: Run the native heads where the manifest lists them (False: the heads' graphs).

    Raises:
        ValueError: For a bundle whose precision is not bf16.
        RuntimeError: Without OpenVINO (:class:`~tilead.runtime.backends.openvino.OpenVinoUnavailableError`) or
            on a CPU without bfloat16 units.
        BundleError: If a model cannot be loaded or its inputs and outputs disagree with the manifest, or a native
            head file is missing, modified or does not fit the bundle's features and map size.
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        manifest: Manifest,
        models: Sequence[bytes],
        backbone: bytes | None,
        *,
        threads: int,
        location_workers: int,
        allocate: Allocate | None = None,
        bundle: Path | None = None,
        native_heads: bool = True,
    ) -> None:
        if not manifest.openvino_refit:
            raise ValueError(NOT_BF16.format(precision=manifest.precision.upper()))
        if backbone is None or manifest.features is None:
            raise BundleError(f"layout {manifest.layout!r}: a bf16 bundle needs its shared backbone's model bytes")
        ov = import_openvino()
        ort = import_ort()
        self.manifest = manifest
        count = len(manifest.locations)  # workers counted by locations (location_jobs plans their calls)
        self.threads = threads
        self.location_workers = max(1, min(location_workers, count))
        threads_each = max(1, threads // self.location_workers)
        self.versions = (str(ov.__version__), str(ort.__version__))
        core = ov.Core()
        require_bf16(core, "a bf16 bundle")
        self._backbone: _Location | None = compile_backbone(
            core,
            backbone,
            bf16_config(threads, self.location_workers),
            manifest.preprocessing,
            manifest.grid.tile_size,
            manifest.uint8_backbone,
        )
        self._native: list[LaneHead] | None = None
        self._sessions: list[Any] | None = None
        if native_heads and bundle is not None and manifest.native_heads:
            self._native = load_native_heads(Path(bundle), manifest)
        else:
            providers = session_providers("cpu", manifest)
            self._sessions = load_location_sessions(ort, manifest, models, providers, threads_each)
        self._buffers = BufferPool() if allocate is None else LeasedBuffers(allocate)
        self._jobs = location_jobs(manifest, self.location_workers)
        self._pool = (
            ThreadPoolExecutor(self.location_workers, thread_name_prefix="tilead-hybrid")
            if self.location_workers > 1
            else None
        )

    @property
    def providers(self) -> list[str]:
        """The backbone's runtime, then the heads' (ONNX Runtime, or ``tilead native PaDiM heads (<kernel path>)``)."""
        if self._sessions is None and self._native is None:
            raise RuntimeError("Predictor is closed")
        ov, ort = self.versions
        if self._native is not None:
            heads = f"tilead native PaDiM heads ({kernel_path()})"
        else:
            heads = f"ONNX Runtime {ort} CPUExecutionProvider, heads"
        graph = "INT8 graph, " if self.manifest.precision == "int8_bf16" else ""
        return [f"OpenVINO {ov} CPU, {graph}backbone bf16", heads]

    @property
    def native_heads(self) -> bool:
        """Whether the heads run on the native kernel (else their ONNX graphs)."""
        return self._native is not None

    @property
    def device_memory_bytes(self) -> int | None:
        """None: the models run in host memory."""
        return None

    @property
    def streams_tiles(self) -> bool:
        """True: the Predictor may hand the tiles over a few images at a time (:meth:`infer_stream`)."""
        return True

    @property
    def uint8_tiles(self) -> bool:
        """Whether the backbone takes uint8 ``(locations, n, th, tw, C)`` tiles (the manifest's ``backbone_input``).

        Bundles exported since issue #21 item 3 say ``uint8``: the conversion and normalization run inside
        the compiled backbone (:func:`~tilead.runtime.backends.openvino.compile_backbone`); older ones float32.
        """
        return self.manifest.uint8_backbone

    def infer(self, tiles: np.ndarray, timer: StageTimes | None = None) -> LocationOutputs:
        """The backbone on every tile, then each location's head (:meth:`.base.InferenceBackend.infer`).

        Args:
            tiles: float32 ``(locations, n, C, th, tw)``, or uint8 ``(locations, n, th, tw, C)`` where
                :attr:`uint8_tiles`.
            timer: Receives ``inference`` and ``location:<name>``.
        """
        # The backbone's calls side by side on its streams, then the heads (see the module docstring).
        features = run_backbone(
            self.manifest,
            np.ascontiguousarray(tiles),
            self._run_features,
            self._buffers,
            self._pool,
            timer,
            self.location_workers,
        )
        return self._run_heads(features, timer)

    def infer_stream(self, stream: TileStream, timer: StageTimes | None = None) -> LocationOutputs:
        """:meth:`infer` on tiles made a few images at a time (:class:`.base.TileStream`).

        Only the features of the whole batch are held at once, never all its tiles. With native heads on
        several location workers and at most :data:`QUEUED_IMAGES` images, the backbone calls and the heads
        share one queue (:func:`~tilead.runtime.backends.pipelined.backbone_then_heads`): a head starts once
        its own locations' features are there.
        """
        native, pool = self._native, self._pool
        if native is not None and pool is not None and stream.images <= QUEUED_IMAGES:  # no barrier before the heads
            return backbone_then_heads(
                self.manifest,
                stream,
                self._run_features,
                self._buffers,
                pool,
                timer,
                self._jobs,
                native_run(native),
            )
        features = run_backbone_stream(
            self.manifest, stream, self._run_features, self._buffers, self._pool, timer, self.location_workers
        )
        return self._run_heads(features, timer)

    def _run_features(self, part: np.ndarray, out: np.ndarray) -> None:
        """The backbone on ``part``, its features written straight into ``out`` (C-contiguous)."""
        backbone = self._backbone
        if backbone is None:
            raise RuntimeError("Predictor is closed")
        backbone_into(backbone, part, out)

    def _run_heads(self, features: np.ndarray, timer: StageTimes | None) -> LocationOutputs:
        """Every head on its location's block of ``features`` (taken from the pool, given back here)."""
        native = self._native
        if native is not None:
            try:
                return run_locations(self.manifest, features, native_run(native), self._pool, timer, self._jobs)
            finally:
                self._buffers.give(features)
        return run_heads(
            self.manifest, self._sessions, [OUTPUT_NAME], features, self._buffers, self._pool, timer, self._jobs
        )

    def close(self) -> None:
        """Drop the sessions and the compiled backbone, stop the location workers."""
        self._sessions = None
        self._native = None
        self._backbone = None
        self._buffers.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def create(request: BackendRequest) -> HybridBackend:
    """The registry's factory (CPU only; the Predictor checks the device against the capabilities)."""
    budget, workers = threads_and_workers(request)
    return HybridBackend(
        request.manifest,
        request.models,
        request.backbone,
        threads=budget,
        location_workers=workers,
        allocate=request.allocate,
        bundle=request.bundle,
        native_heads=request.native_heads,
    )


def native_run(heads: Sequence[LaneHead]) -> RunLocation:
    """The native heads as a location call (:data:`~tilead.runtime.backends.base.RunLocation`): model index's map."""

    def run(index: int, block: np.ndarray) -> list[np.ndarray]:
        return [heads[index](block)]

    return run


def kernel_path() -> str:
    """The Mahalanobis kernel's code path on this CPU (``avx512``, ``avx2`` or ``scalar``)."""
    from tilead import _kernels

    return _kernels.mahalanobis_paths()[-1]


def load_native_heads(bundle: Path, manifest: Manifest) -> list[LaneHead]:
    """Every model's native head, read once and verified (size, sha256), checked against the features and map.

    Each is held in the kernel's lane layout only (:meth:`~tilead.runtime.native_heads.NativeHead.lanes`).

    Raises:
        BundleError: Naming the file: missing, modified, not a head file, or of other features or map size.
    """
    if manifest.features is None:
        raise BundleError("native heads need a shared_backbone bundle's features")
    d, fh, fw = manifest.features
    heads = []
    for entry in manifest.native_heads:
        data = read_verified_file(bundle, entry, "native head")
        try:
            head = NativeHead.from_bytes(data, entry.file)
        except ValueError as err:
            raise BundleError(f"model {entry.name}: {err}") from None
        if head.channels != d or head.size != (fh, fw) or head.size != manifest.map_size:
            raise BundleError(
                f"model {entry.name}: native head {entry.file} has {head.channels} features on a "
                f"{head.size[0]} x {head.size[1]} map; the bundle's backbone gives {d} on {fh} x {fw} "
                f"(map size {manifest.map_size[0]} x {manifest.map_size[1]})"
            )
        heads.append(head.lanes())  # the file's layout is dropped here: one copy of the Gaussians
    return heads
