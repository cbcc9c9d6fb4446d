"""``runtime.Predictor``: a bundle in, anomaly scores, labels, maps and masks out.

No torch, no OpenCV: numpy, ONNX Runtime and the ``tilead._kernels`` CPU
twins. One ONNX Runtime session per tile location; every image's tile for a
location goes through that location's session in one call (batched tiles),
then the runtime's untile, seam smoothing and normalization run on the maps
(and, for a bundle that deploys the detector's own image score, on the
per-tile ``score`` outputs: see :func:`tilead.runtime.stats.score_images`).

Locations run side by side: on a CPU a small pool of worker threads runs
different locations' sessions at the same time, each session with a share of
the thread budget (``threads // location_workers`` intra-op threads). On this
project's 2-core reference machine two workers with one thread each are about
1.2x faster than one session at a time with two threads: the per-position
Mahalanobis products of one location are memory-bound and overlap with the
convolutions of another.

Thread safety: sessions are created once and only read afterwards; ONNX
Runtime's ``InferenceSession.run`` may be called from several threads at once,
and every buffer of a ``predict`` call is its own. Concurrent calls therefore
return exactly the serial results (tested).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tilead.runtime._checks import describe
from tilead.runtime.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    SCORE_NAME,
    BundleError,
    Manifest,
    check_model_io,
    ort_specs,
    read_manifest,
    read_verified_file,
    verify_files,
)
from tilead.runtime.engines import onnx_digest
from tilead.runtime.image_resize import resize_uint8
from tilead.runtime.preprocess import InputOrder, tile_images
from tilead.runtime.stats import nonfinite_errors, postprocess_maps
from tilead.runtime.timing import StageTimes, timed

Backend = Literal["auto", "onnxruntime", "tensorrt"]


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        score: Image score (normalized to [0, 1] unless the bundle's stage is
            ``none``): the max of the final map, or with the bundle's
            ``image_score`` ``detector`` the detector's own score (max over the
            image's tiles of every location's ``score`` output).
        label: True when the image is anomalous.
        anomaly_map: float32 ``(H, W)`` map (normalized like ``score``).
        mask: bool ``(H, W)`` anomalous pixels.
        raw_score: Image score before normalization.
        error: None, or what was wrong with the model's output for this
            image: NaN or infinity anywhere in a location's output (naming
            the location where the backend tells). Such an image is never
            OK: ``label`` True, ``score`` 1.0 (``inf`` for stage ``none``),
            ``raw_score`` NaN, its non-finite pixels anomalous in ``mask``.
    """

    score: float
    label: bool
    anomaly_map: np.ndarray
    mask: np.ndarray
    raw_score: float
    error: str | None = None

    @property
    def finite(self) -> bool:
        """True when the model output for this image was finite everywhere."""
        return self.error is None

    def __repr__(self) -> str:
        def shape(a: np.ndarray) -> str:
            return f"<{a.dtype} {'x'.join(map(str, a.shape))}>"

        error = "" if self.error is None else f", error={self.error!r}"
        return (
            f"Prediction(score={self.score:.4f}, label={'NG' if self.label else 'OK'}, raw_score={self.raw_score:.6g}, "
            f"anomaly_map={shape(self.anomaly_map)}, mask={shape(self.mask)} ({int(np.count_nonzero(self.mask))} "
            f"anomalous){error})"
        )


def _current_version() -> str:
    from tilead import __version__

    return __version__


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
    return Path(base) / "onnxruntime-trt" / onnx_digest([loc.sha256 for loc in manifest.locations])


def _providers(device: str, manifest: Manifest) -> list[Any]:
    """ONNX Runtime providers for ``device``.

    On CUDA: TensorRT's provider when present (engine cache outside the bundle: :func:`ort_trt_cache`), then CUDA's.
    """
    import onnxruntime as ort

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
            }
            providers.append(("TensorrtExecutionProvider", options))
        return [*providers, "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {describe(device)}")


class Predictor:
    """Runs a bundle on uint8 images.

    Args:
        bundle: Bundle directory (``tilead-export`` output).
        device: ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"`` / ``"onnxruntime"`` (ONNX Runtime: CPU, or on
            CUDA its TensorRT provider when present, then its CUDA provider), or
            ``"tensorrt"`` (the native TensorRT backend, device ``"cuda"``:
            the bundle's engines for this GPU on the extension's device
            pipeline; see :mod:`tilead.trt.backend`).
        threads: CPU threads for inference in all (default: the machine's
            logical cores); each session gets ``threads // location_workers``.
        location_workers: Locations run at the same time (default: on CPU
            ``min(locations, threads)``, on CUDA 1).
        max_batch: Images per inference call (bounds memory for long lists).
        precision: TensorRT engines to use, ``"fp32"`` or ``"fp16"`` (None: any listed).
        build_on_load: TensorRT: build missing engines for this GPU from the
            bundle's ONNX (needs the full TensorRT builder; minutes).

    Raises:
        BundleError: For a missing, corrupt, modified or unknown-schema bundle.
        ValueError: For bad arguments.
        RuntimeError: If the device is not available (for TensorRT:
            :class:`tilead.trt.modules.TensorRTUnavailableError`, naming what is
            missing and how to get it).

    Example:
        >>> with Predictor("bundles/bottle") as predictor:  # doctest: +SKIP
        ...     result = predictor.predict(cv2.imread("x.png"))
        ...     result.score, result.label, result.anomaly_map.shape
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "cpu",
        backend: Backend = "auto",
        *,
        threads: int | None = None,
        location_workers: int | None = None,
        max_batch: int = 8,
        precision: str | None = None,
        build_on_load: bool = False,
    ) -> None:
        if backend not in ("auto", "onnxruntime", "tensorrt"):
            raise ValueError(f"backend: expected 'auto', 'onnxruntime' or 'tensorrt', got {describe(backend)}")
        if backend == "tensorrt" and device != "cuda":
            raise ValueError(f"backend='tensorrt' runs on device='cuda', got device={describe(device)}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {describe(max_batch)}")
        for name, value in (("threads", threads), ("location_workers", location_workers)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {describe(value)}")
        self.path = Path(bundle)
        self.device = device
        self.backend = "tensorrt" if backend == "tensorrt" else "onnxruntime"
        self.max_batch = max_batch
        self.manifest: Manifest = read_manifest(self.path, current_version=_current_version())
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # close() waits on it for running calls
        self._running = 0
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._sessions: list[Any] | None = None
        self._trt: Any = None
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        self.location_workers = 1
        if self.backend == "tensorrt":
            from tilead.trt.modules import require_map_only

            require_map_only(self.path, self.manifest)  # before any GPU check: the bundle itself is the problem
            verify_files(self.path, self.manifest)
            from tilead.trt.backend import TensorRTBackend

            self._trt = TensorRTBackend(
                self.path, self.manifest, precision=precision, max_batch=max_batch, build_on_load=build_on_load
            )
            return
        providers = _providers(device, self.manifest)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session per location runs at a time: idle pools must not spin on the cores the active one needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        budget = threads if threads is not None else (os.cpu_count() or 1)
        count = self.manifest.grid.num_locations
        if location_workers is None:
            location_workers = min(count, budget) if device == "cpu" else 1
        self.location_workers = min(location_workers, count)
        self.threads = budget
        options.intra_op_num_threads = max(1, budget // self.location_workers)
        # Inter-op parallelism comes from the location workers; graphs are sequential chains.
        options.inter_op_num_threads = 1
        sessions: list[Any] = []
        for loc in self.manifest.locations:
            path = self.path / loc.file
            model = read_verified_file(self.path, loc)  # read once, hashed; the session gets these bytes
            try:
                session = ort.InferenceSession(model, sess_options=options, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception types
                raise BundleError(f"location {loc.name}: ONNX Runtime cannot load {path}: {err}") from err
            check_model_io(loc.name, ort_specs(session.get_inputs()), ort_specs(session.get_outputs()), self.manifest)
            sessions.append(session)
        self._sessions = sessions
        if self.location_workers > 1:
            self._pool = ThreadPoolExecutor(self.location_workers, thread_name_prefix="tilead-location")

    # -- properties -------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` the bundle expects."""
        return self.manifest.grid.image_size

    @property
    def channels(self) -> int:
        """Image channels the bundle expects (1 or 3)."""
        return self.manifest.preprocessing.channels

    @property
    def device_memory_bytes(self) -> int | None:
        """Device memory the TensorRT backend holds (buffers + engine activations); None for ONNX Runtime."""
        return None if self._trt is None else int(self._trt.device_bytes)

    @property
    def providers(self) -> list[str]:
        """What runs the models: ONNX Runtime's execution providers in priority order, or the TensorRT engines."""
        if self._trt is not None:
            return list(self._trt.providers)
        sessions = self._sessions
        if not sessions:
            raise RuntimeError("Predictor is closed")
        return list(sessions[0].get_providers())

    # -- lifecycle --------------------------------------------------------------------------------

    def warmup(self, iterations: int = 1) -> None:
        """Run a black image through every session (first-call allocations, kernel selection)."""
        h, w = self.image_size
        blank = np.zeros((h, w, self.channels), dtype=np.uint8)
        for _ in range(iterations):
            self.predict(blank, input_order="GRAY" if self.channels == 1 else "BGR")

    def close(self) -> None:
        """Release the sessions once running calls have finished; later calls raise ``RuntimeError``.

        The error is always ``RuntimeError("Predictor is closed")``.

        Safe to call from another thread during a ``predict`` (which completes
        normally) and more than once.
        """
        with self._idle:
            self._closed = True
            while self._running:
                self._idle.wait()
            self._sessions = None
            trt, self._trt = self._trt, None
            pool, self._pool = self._pool, None
        if trt is not None:
            trt.close()
        if pool is not None:
            pool.shutdown(wait=True)

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """Mark a call as running (close() waits for it); raise if the Predictor is closed."""
        with self._idle:
            if self._closed:
                raise RuntimeError("Predictor is closed")
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference --------------------------------------------------------------------------------

    def _images(self, images: Any, resize: bool) -> tuple[bool, list[np.ndarray]]:
        """Split the input into single HxWxC images; returns (was_single, images)."""
        if isinstance(images, np.ndarray):
            if images.ndim in (2, 3):
                items, single = [images], True
            elif images.ndim == 4:
                items, single = list(images), False
            else:
                raise ValueError(f"images: expected (H, W), (H, W, C) or (n, H, W, C), got {describe(images)}")
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            items, single = list(images), False
        else:
            raise ValueError(f"images: expected a numpy array or a list of arrays, got {describe(images)}")
        if not items:
            raise ValueError("images: the list is empty; expected at least one image")
        out = []
        h, w = self.image_size
        for i, img in enumerate(items):
            if not isinstance(img, np.ndarray):
                raise ValueError(f"images[{i}]: expected a numpy array, got {describe(img)}")
            if img.dtype != np.uint8:
                raise ValueError(f"images[{i}]: expected dtype uint8, got {img.dtype}")
            if img.ndim == 2:
                img = img[:, :, None]
            if img.ndim != 3 or img.shape[2] not in (1, 3):
                raise ValueError(f"images[{i}]: expected (H, W), (H, W, 1) or (H, W, 3), got shape {img.shape}")
            if img.shape[2] != self.channels and not (img.shape[2] == 1 and self.channels == 3):
                raise ValueError(
                    f"images[{i}]: the bundle's model takes {self.channels} channel(s), got {img.shape[2]}"
                )
            if img.shape[:2] != (h, w):
                if not resize:
                    raise ValueError(
                        f"images[{i}]: expected image size {h}x{w} (height x width, the bundle's image_size), "
                        f"got {img.shape[0]}x{img.shape[1]}; pass resize=True to resize"
                    )
                img = _resize_uint8(img, (h, w))
            if img.shape[2] == 1 and self.channels == 3:
                img = np.repeat(img, 3, axis=2)
            out.append(np.ascontiguousarray(img))
        return single, out

    def _location_outputs(
        self, batch: np.ndarray, input_order: InputOrder, timer: StageTimes | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw per-location maps ``(locations, n, h, w)`` of a ``(n, H, W, C)`` uint8 batch.

        Returns:
            ``(maps, scores)``: the maps, and the detector's per-tile scores
            float32 ``(locations, n)`` when the bundle deploys them (else None).
        """
        sessions, pool = self._sessions, self._pool
        order: InputOrder = "GRAY" if batch.shape[3] == 1 else input_order
        if self._trt is not None:
            return np.asarray(self._trt.location_maps(batch, order)), None
        if sessions is None:
            raise RuntimeError("Predictor is closed")
        m = self.manifest
        n = batch.shape[0]
        with timed(timer, "tile"):
            tiles = tile_images(batch, m.grid, m.preprocessing, input_order=order)
        h, w = m.map_size
        maps = np.empty((m.grid.num_locations, n, h, w), dtype=np.float32)
        with_score = m.image_score == "detector"
        names = [OUTPUT_NAME, SCORE_NAME] if with_score else [OUTPUT_NAME]
        scores = np.empty((m.grid.num_locations, n), dtype=np.float32) if with_score else None

        def run(index: int) -> float:
            start = time.perf_counter()
            outs = sessions[index].run(names, {INPUT_NAME: tiles[index]})
            out = outs[0]
            if out.shape != (n, 1, h, w):
                raise BundleError(
                    f"location {m.locations[index].name}: model output shape {out.shape}, the manifest promises "
                    f"({n}, 1, {h}, {w})"
                )
            maps[index] = out[:, 0]
            if scores is not None:
                if outs[1].shape != (n,):
                    raise BundleError(
                        f"location {m.locations[index].name}: model output {SCORE_NAME!r} has shape "
                        f"{outs[1].shape}, expected ({n},)"
                    )
                scores[index] = outs[1]
            return time.perf_counter() - start

        with timed(timer, "inference"):
            indices = range(len(sessions))
            seconds = list(pool.map(run, indices)) if pool is not None else [run(i) for i in indices]
        if timer is not None:
            for loc, sec in zip(m.locations, seconds, strict=True):
                timer.add(f"location:{loc.name}", sec)
        return maps, scores

    def location_maps(self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False) -> np.ndarray:
        """Raw per-location maps, before merging (what evaluation needs).

        Args:
            images: As for :meth:`predict`.
            input_order: As for :meth:`predict`.
            resize: As for :meth:`predict`.

        Returns:
            float32 ``(locations, n, h, w)``.
        """
        return self.location_outputs(images, input_order=input_order, resize=resize)[0]

    def location_outputs(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw per-location maps and, when the bundle deploys them, the detector's per-tile image scores.

        Args:
            images: As for :meth:`predict`.
            input_order: As for :meth:`predict`.
            resize: As for :meth:`predict`.

        Returns:
            ``(maps, scores)``: float32 ``(locations, n, h, w)`` and float32
            ``(locations, n)`` (None unless the manifest's image score is ``detector``).
        """
        _, items = self._images(images, resize)
        with self._in_use():
            chunks = [
                self._location_outputs(np.stack(items[start : start + self.max_batch]), input_order)
                for start in range(0, len(items), self.max_batch)
            ]
        maps = np.concatenate([c[0] for c in chunks], axis=1)
        parts = [c[1] for c in chunks if c[1] is not None]
        return maps, np.concatenate(parts, axis=1) if parts else None

    def _run(self, batch: np.ndarray, input_order: InputOrder, timer: StageTimes | None) -> list[Prediction]:
        m = self.manifest
        trt = self._trt
        if trt is not None:
            order: InputOrder = "GRAY" if batch.shape[3] == 1 else input_order
            result = trt.run(batch, order, timer)
            if not result.finite.all():  # name the broken locations: one more pass, only for a broken output
                result = replace(result, errors=nonfinite_errors(np.asarray(trt.location_maps(batch, order)), m.grid))
        else:
            maps, scores = self._location_outputs(batch, input_order, timer)
            _, result = postprocess_maps(
                maps, m.grid, m.stats, weights=m.weights, seam=m.seam, timer=timer, tile_scores=scores
            )
        return [
            Prediction(
                float(result.scores[i]),
                bool(result.labels[i]),
                result.maps[i],
                result.masks[i],
                float(result.raw_scores[i]),
                result.error(i),
            )
            for i in range(batch.shape[0])
        ]

    def predict(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False
    ) -> Prediction | list[Prediction]:
        """Score images.

        Args:
            images: uint8 ``(H, W)``, ``(H, W, C)`` (one image), ``(n, H, W, C)``
                or a list of ``(H, W[, C])`` arrays; ``C`` 1 or 3, at the bundle's
                image size unless ``resize``.
            input_order: Channel order of 3-channel images: ``"BGR"`` (OpenCV's) or ``"RGB"``.
            resize: Resize other sizes to the bundle's (bilinear) instead of raising.

        Returns:
            One :class:`Prediction` for one image, else a list in input order.

        Raises:
            ValueError: For a wrong type, dtype, channel count, size or an empty list.
            RuntimeError: After :meth:`close`.
        """
        single, results = self._predict(images, input_order, resize, None)
        return results[0] if single else results

    def predict_timed(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False
    ) -> tuple[list[Prediction], StageTimes]:
        """:meth:`predict` that also returns where the time went.

        Stages (seconds, summed over ``max_batch`` chunks): ``input`` (checks,
        resizing, stacking), ``tile``, ``inference`` (wall time of all
        locations), ``untile``, ``seam``, ``crop``, ``normalize``,
        plus ``location:<name>`` per location (the time of its session's run,
        which overlaps with other locations' when they run side by side).

        Returns:
            ``(predictions, times)``; predictions always as a list.
        """
        timer = StageTimes()
        _, results = self._predict(images, input_order, resize, timer)
        return results, timer

    def _predict(
        self, images: Any, input_order: InputOrder, resize: bool, timer: StageTimes | None
    ) -> tuple[bool, list[Prediction]]:
        with timed(timer, "input"):
            single, items = self._images(images, resize)
        results: list[Prediction] = []
        with self._in_use():
            for start in range(0, len(items), self.max_batch):
                with timed(timer, "input"):
                    chunk = items[start : start + self.max_batch]
                    batch = chunk[0][None] if len(chunk) == 1 else np.stack(chunk)  # one image: a view, no copy
                results.extend(self._run(batch, input_order, timer))
        return single, results


def _resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``(H, W, C)`` image with the runtime's resize kernel, in bounded memory."""
    return resize_uint8(image, size)
