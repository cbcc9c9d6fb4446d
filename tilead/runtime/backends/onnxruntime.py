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

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime._checks import describe
from tilead.runtime.backends.base import (
    BackendRequest,
    BufferPool,
    Capabilities,
    LocationOutputs,
    default_location_workers,
    run_backbone,
    run_locations,
)
from tilead.runtime.bundle import (
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SCORE_NAME,
    BundleError,
    Manifest,
    check_backbone_io,
    check_model_io,
    ort_specs,
)
from tilead.runtime.engines import onnx_digest
from tilead.runtime.timing import StageTimes

log = logging.getLogger("tilead.runtime.backends.onnxruntime")

CAPABILITIES = Capabilities(devices=("cpu", "cuda"), full_pipeline=False, detector_score=True)


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
    names = [p[0] if isinstance(p, tuple) else str(p) for p in requested]
    wanted = [n for n in names if n in GPU_PROVIDERS]
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


class OnnxRuntimeBackend:
    """One ONNX Runtime session per location (see the module docstring).

    Args:
        manifest: The bundle's verified manifest.
        models: Every location's ONNX bytes, row-major (the heads of a ``shared_backbone`` bundle).
        providers: Execution providers (:func:`session_providers`).
        threads: CPU threads in all.
        location_workers: Locations run at the same time (at most the number of locations).
        backbone: The shared backbone's ONNX bytes (``shared_backbone`` bundles only).

    Raises:
        BundleError: If ONNX Runtime cannot load a model, or a bundle's layout and ``backbone`` disagree.
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
    ) -> None:
        ort = import_ort()
        self.manifest = manifest
        count = len(manifest.models)  # one call per model
        self.threads = threads
        self.location_workers = max(1, min(location_workers, count))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session per location runs at a time: idle pools must not spin on the cores the active one needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = max(1, threads // self.location_workers)
        # Inter-op parallelism comes from the location workers; graphs are sequential chains.
        options.inter_op_num_threads = 1
        sessions: list[Any] = []
        for loc, model in zip(manifest.models, models, strict=True):
            try:
                session = ort.InferenceSession(model, sess_options=options, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception types
                raise BundleError(f"location {loc.name}: ONNX Runtime cannot load {loc.file}: {err}") from err
            check_providers(providers, session.get_providers(), loc.name)
            release_model_bytes(session, providers)
            # Names, element types and shapes against the manifest, at load rather than at the first predict.
            check_model_io(loc.name, ort_specs(session.get_inputs()), ort_specs(session.get_outputs()), manifest)
            sessions.append(session)
        self._backbone: Any = None
        if (backbone is None) != (manifest.backbone is None):
            state = "missing" if backbone is None else "given, but the layout has no shared backbone"
            raise BundleError(f"layout {manifest.layout!r}: the backbone's model bytes are {state}")
        if backbone is not None:
            whole = ort.SessionOptions()
            whole.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            whole.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # Its calls are spread over the location workers (run_backbone): the heads' share of the threads.
            whole.intra_op_num_threads = options.intra_op_num_threads
            whole.inter_op_num_threads = 1
            try:
                self._backbone = ort.InferenceSession(backbone, sess_options=whole, providers=providers)
            except Exception as err:
                raise BundleError(f"the shared backbone: ONNX Runtime cannot load backbone.onnx: {err}") from err
            check_providers(providers, self._backbone.get_providers(), "backbone")
            release_model_bytes(self._backbone, providers)
            check_backbone_io(ort_specs(self._backbone.get_inputs()), ort_specs(self._backbone.get_outputs()), manifest)
        self._buffers = BufferPool()
        self._sessions: list[Any] | None = sessions
        self._names = [OUTPUT_NAME, SCORE_NAME] if manifest.image_score == "detector" else [OUTPUT_NAME]
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
        backbone = self._backbone
        if backbone is None:

            def run_one(index: int, location_tiles: np.ndarray) -> Sequence[np.ndarray]:
                outs: Sequence[np.ndarray] = sessions[index].run(names, {INPUT_NAME: location_tiles})
                return outs

            return run_locations(self.manifest, tiles, run_one, pool, timer)

        def run_features(part: np.ndarray, out: np.ndarray) -> None:
            binding = backbone.io_binding()
            binding.bind_cpu_input(INPUT_NAME, part)
            binding.bind_output(FEATURES_NAME, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            backbone.run_with_iobinding(binding)

        def run_head(index: int, features: np.ndarray) -> Sequence[np.ndarray]:
            outs: Sequence[np.ndarray] = sessions[index].run(names, {FEATURES_NAME: features})
            return outs

        features = run_backbone(
            self.manifest, np.ascontiguousarray(tiles), run_features, self._buffers, pool, timer, self.location_workers
        )
        try:
            return run_locations(self.manifest, features, run_head, pool, timer)
        finally:
            self._buffers.give(features)

    def close(self) -> None:
        """Drop the sessions and stop the location workers."""
        self._sessions = None
        self._backbone = None
        self._buffers.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def create(request: BackendRequest) -> OnnxRuntimeBackend:
    """The registry's factory: sessions for ``request.device`` with the thread budget split over locations."""
    providers = session_providers(request.device, request.manifest, request.max_batch)
    budget = request.threads if request.threads is not None else (os.cpu_count() or 1)
    count = len(request.manifest.models)
    workers = request.location_workers
    if workers is None:
        workers = default_location_workers(request.device, count, budget)
    return OnnxRuntimeBackend(
        request.manifest,
        request.models,
        providers,
        threads=budget,
        location_workers=workers,
        backbone=request.backbone,
    )
