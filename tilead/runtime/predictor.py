"""``runtime.Predictor``: a bundle in, anomaly scores, labels, maps and masks out.

No torch, no OpenCV: numpy, a backend and the ``tilead._kernels`` CPU twins.
The Predictor checks the input, splits it into ``max_batch`` chunks and builds
the results; a backend (:mod:`tilead.runtime.backends`, chosen by name from its
registry) runs the models. For an inference-only backend (ONNX Runtime,
OpenVINO) the Predictor tiles the images on the host, the backend returns every
location's maps (and, for a bundle that deploys the detector's own image score,
the per-tile ``score`` outputs), and the runtime's untile, seam smoothing and
normalization run here (the bundle's :class:`tilead.runtime.postprocessor.PostProcessor`). A
full-pipeline backend (native TensorRT) takes the images and returns the
normalized maps itself.

Thread safety: backends are built once and only read afterwards, and every
buffer of a ``predict`` call is its own (reused tile buffers come from a pool,
one per running call); concurrent calls return exactly the serial results
(tested for ONNX Runtime and OpenVINO). The maps and masks a call returns are
never written again: their memory is reused by a later call only once every
array viewing it is gone (:class:`tilead.runtime.buffers.LeasePool`). The host
kernels (tile, untile, seam, normalize) use at most ``threads`` threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from tilead.runtime import backends
from tilead.runtime._checks import describe
from tilead.runtime.backends.base import (
    Backend,
    BackendRequest,
    BufferPool,
    InferenceBackend,
    PipelineBackend,
    StreamingInference,
    ThumbnailInference,
    TileStream,
    VerifiedModels,
    stream_group,
)
from tilead.runtime.buffers import LeasePool
from tilead.runtime.bundle import BundleError, Manifest, read_manifest, read_verified_file, verify_files
from tilead.runtime.devices import thread_budget
from tilead.runtime.image_resize import resize_image
from tilead.runtime.postprocess import resize_maps
from tilead.runtime.postprocessor import PostProcessor, nonfinite_errors
from tilead.runtime.preprocess import InputOrder, tile_images, tile_images_u8, tile_shape, tile_shape_u8
from tilead.runtime.thumbnail import fuser, thumbnail_tiles
from tilead.runtime.timing import StageTimes, timed

BACKENDS = backends.names()
"""What ``Predictor(backend=...)`` accepts: ``auto`` and the registry's names."""

MapSize = Literal["input", "bundle"]
MAP_SIZES: tuple[MapSize, ...] = ("input", "bundle")
"""Where ``predict(..., resize=True)`` returns maps and masks: at each input image's size, or the bundle's."""


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


class Predictor:
    """Runs a bundle on uint8 images.

    Args:
        bundle: Bundle directory (``tilead-export`` output).
        device: ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"`` / ``"onnxruntime"`` (ONNX Runtime: CPU, or on
            CUDA its TensorRT provider when present, then its CUDA provider),
            ``"openvino"`` (OpenVINO, device ``"cpu"``), ``"hybrid"`` (bf16 bundles,
            device ``"cpu"``: the backbone on OpenVINO in bfloat16, the heads on ONNX
            Runtime; what ``"auto"`` picks for them), or ``"tensorrt"`` (the
            native TensorRT backend, device ``"cuda"``: the bundle's engines for
            this GPU on the extension's device pipeline; see
            :mod:`tilead.runtime.backends.tensorrt`). See :mod:`tilead.runtime.backends`.
        threads: CPU threads for inference in all (default: the machine's
            logical cores); each session gets ``threads // location_workers``.
            The host kernels (tiling, untiling, seams, normalization) use at most as many.
        location_workers: Locations run at the same time (default: on CPU
            ``min(locations, threads)``, on CUDA 1). Shared models (task assignment) get one
            batched call per model where that loads the workers evenly, else one call per location
            (:func:`tilead.runtime.backends.base.location_jobs`).
        max_batch: Images per inference call (bounds memory for long lists).
        precision: TensorRT engines to use, ``"fp32"`` or ``"fp16"`` (None: any listed).
        build_on_load: Refused with a ValueError for TensorRT: the runtime does not
            build engines; build them with ``tilead-export BUNDLE --trt``.
        cuda_graphs: TensorRT backend: capture each batch size's device pipeline once
            into a CUDA graph and replay it (falls back, logged once, where capture
            fails). Other backends accept and ignore it.
        bf16_backbone: Run a ``shared_backbone`` bundle's backbone in bfloat16 on
            a CPU with bf16 units (``backend="openvino"``; ``"hybrid"`` always does; the heads stay
            float32). Not recommended with today's bundles: PaDiM heads fit on
            FP32 features lose much quality (bottle AUPRO 0.466 instead of
            0.967; heads refit on bf16 features keep it, ``docs/cpu_speed.md``). Refused with a ValueError for another
            backend or layout, and with a RuntimeError on a CPU without bf16 units.
        native_heads: ``backend="hybrid"``: run a bf16 bundle's native PaDiM heads (the C++ kernel,
            :mod:`tilead.runtime.native_heads`) where the bundle has them; False: the heads' ONNX graphs
            (for comparison). Other backends ignore it.

    Raises:
        BundleError: For a missing, corrupt, modified or unknown-schema bundle.
        ValueError: For bad arguments.
        RuntimeError: If the device or the backend's package is not available
            (for TensorRT:
            :class:`tilead.runtime.backends.tensorrt_modules.TensorRTUnavailableError`,
            for OpenVINO :class:`tilead.runtime.backends.openvino.OpenVinoUnavailableError`,
            naming what is missing and how to get it).

    Example:
        >>> with Predictor("bundles/bottle") as predictor:  # doctest: +SKIP
        ...     result = predictor.predict(cv2.imread("x.png"))
        ...     result.score, result.label, result.anomaly_map.shape
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "cpu",
        backend: str = "auto",
        *,
        threads: int | None = None,
        location_workers: int | None = None,
        max_batch: int = 8,
        precision: str | None = None,
        build_on_load: bool = False,
        cuda_graphs: bool = True,
        bf16_backbone: bool = False,
        native_heads: bool = True,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {describe(device)}")
        spec = backends.resolve(backend, device)
        if not isinstance(bf16_backbone, bool):
            raise ValueError(f"bf16_backbone: expected True or False, got {describe(bf16_backbone)}")
        if bf16_backbone and not spec.bf16_backbone:
            able = ", ".join(repr(s.name) for s in backends.REGISTRY.values() if s.bf16_backbone)
            raise ValueError(
                f"bf16_backbone=True: backend={spec.name!r} cannot run the backbone in bfloat16; use {able}"
            )
        if not isinstance(native_heads, bool):
            raise ValueError(f"native_heads: expected True or False, got {describe(native_heads)}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {describe(max_batch)}")
        for name, value in (("threads", threads), ("location_workers", location_workers)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {describe(value)}")
        self.path = Path(bundle)
        self.device = device
        self.backend = spec.name
        self.max_batch = max_batch
        self.bf16_backbone = bf16_backbone
        self.manifest: Manifest = read_manifest(self.path, current_version=_current_version())
        if backend == "auto" and device == "cpu" and self.manifest.openvino_refit:
            # bf16 heads need the bf16 backbone: OpenVINO's, heads on ONNX Runtime
            spec = backends.REGISTRY[backends.BF16_DEFAULT]
            self.backend = spec.name
        if bf16_backbone and self.manifest.backbone is None:
            raise ValueError(
                f"bf16_backbone=True: {self.path} has layout {self.manifest.layout!r}, whose graphs hold backbone and "
                "head together; it needs a shared_backbone bundle (tilead-export --layout shared_backbone)"
            )
        self.post = PostProcessor.from_manifest(self.manifest)  # every post-processing setting, built once
        models: Sequence[bytes] = ()
        backbone = thumbnail = None
        if spec.reads_onnx:
            # Each model file read once, when the backend loads it (one file's bytes held at a time); size and
            # sha256 checked on these bytes, which the backend then loads.
            if self.manifest.backbone is not None:
                backbone = read_verified_file(self.path, self.manifest.backbone)
            if self.manifest.thumbnail is not None and self.manifest.thumbnail.file is not None:
                thumbnail = read_verified_file(self.path, self.manifest.thumbnail.file)
            models = VerifiedModels(self.path, self.manifest.models)
        else:
            verify_files(self.path, self.manifest)  # the engines are read and checked by their backend
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # close() waits on it for running calls
        self._running = 0
        self._closed = False
        # Image-size maps and masks reused once the caller has dropped every result viewing them (never earlier);
        # the ONNX Runtime backend takes the shared backbone's features here too, so the maps reuse their memory.
        self._outputs = LeasePool(keep=4)
        request = BackendRequest(
            bundle=self.path,
            manifest=self.manifest,
            models=models,
            backbone=backbone,
            thumbnail=thumbnail,
            device=device,
            threads=threads,
            location_workers=location_workers,
            max_batch=max_batch,
            precision=precision,
            build_on_load=build_on_load,
            cuda_graphs=bool(cuda_graphs),
            bf16_backbone=bf16_backbone,
            allocate=self._outputs.take,
            native_heads=native_heads,
        )
        # Tile buffers reused across calls (one per call running at once): no fresh tens of MB to page-fault in.
        self._tiles = BufferPool(keep=4)
        created = spec.create(request)
        if self.manifest.thumbnail is not None and not created.capabilities.thumbnail:
            created.close()
            raise BundleError(
                f"{self.path}: this bundle has a thumbnail branch, which backend={spec.name!r} does not run; "
                "use backend='onnxruntime', 'openvino' or 'tensorrt'"
            )
        self._backend: Backend | None = created
        self.threads = self._backend.threads
        self.location_workers = self._backend.location_workers
        # Decided once: a runtime-checkable Protocol's isinstance inspects every attribute (about 50 µs a call).
        self._streams = (
            not created.capabilities.full_pipeline
            and self.manifest.thumbnail is None
            and isinstance(created, StreamingInference)
            and created.streams_tiles
        )

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
        """Device memory the backend holds (TensorRT: buffers + engine activations); None for host-memory backends."""
        return self._open().device_memory_bytes

    @property
    def providers(self) -> list[str]:
        """What runs the models: ONNX Runtime's execution providers in priority order, OpenVINO, or the engines."""
        return list(self._open().providers)

    def _open(self) -> Backend:
        """The backend, or RuntimeError after :meth:`close`."""
        backend = self._backend
        if backend is None:
            raise RuntimeError("Predictor is closed")
        return backend

    # -- lifecycle --------------------------------------------------------------------------------

    def warmup(self, iterations: int = 1) -> None:
        """Run a black image through every session (first-call allocations, kernel selection)."""
        h, w = self.image_size
        blank = np.zeros((h, w, self.channels), dtype=np.uint8)
        for _ in range(iterations):
            self.predict(blank, input_order="GRAY" if self.channels == 1 else "BGR")

    def close(self) -> None:
        """Release the backend (sessions, pools, device memory) once running calls have finished.

        Later calls raise ``RuntimeError("Predictor is closed")``. Safe to call
        from another thread during a ``predict`` (which completes normally) and
        more than once.
        """
        with self._idle:
            self._closed = True  # no new call starts; running ones finish on the backend they hold
            while self._running:
                self._idle.wait()
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
        self._tiles.clear()
        self._outputs.close()

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

    def _images(self, images: Any, resize: bool) -> tuple[bool, list[np.ndarray], list[tuple[int, int] | None]]:
        """Split the input into single HxWxC images at the bundle's size.

        Returns:
            ``(was_single, images, sizes)``: ``sizes[i]`` is image i's own ``(H, W)`` when it was resized, else None.
        """
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
        sizes: list[tuple[int, int] | None] = []
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
            sizes.append(None if img.shape[:2] == (h, w) else (int(img.shape[0]), int(img.shape[1])))
            if img.shape[:2] != (h, w):
                if not resize:
                    raise ValueError(
                        f"images[{i}]: expected image size {h}x{w} (height x width, the bundle's image_size), "
                        f"got {img.shape[0]}x{img.shape[1]}; pass resize=True to resize"
                    )
                img = resize_image(img, (h, w))  # as training resizes (area or bilinear), bounded memory
            if img.shape[2] == 1 and self.channels == 3:
                img = np.repeat(img, 3, axis=2)
            out.append(np.ascontiguousarray(img))
        return single, out, sizes

    def _location_outputs(
        self, batch: np.ndarray | Sequence[np.ndarray], input_order: InputOrder, timer: StageTimes | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Raw per-location maps ``(locations, n, h, w)`` of ``n`` uint8 ``(H, W, C)`` images.

        Args:
            batch: A ``(n, H, W, C)`` array or a list of ``(H, W, C)`` arrays (stacked only where needed: a
                backend that streams the tiles gets them a few images at a time, never the whole batch's).
            input_order: As for :meth:`predict`.
            timer: Receives the stages.

        Returns:
            ``(maps, scores, thumbnail)``: the maps, the detector's per-tile scores
            float32 ``(locations, n)`` when the bundle deploys them (else None), and the
            thumbnail model's raw maps float32 ``(n, h, w)`` for a bundle with a thumbnail branch (else None).
        """
        backend = self._open()
        order: InputOrder = "GRAY" if batch[0].shape[2] == 1 else input_order
        m = self.manifest
        if self._streams:
            return (*self._streamed_outputs(cast(StreamingInference, backend), batch, order, timer), None)
        with self._stacked(batch, timer) as stacked:
            if backend.capabilities.full_pipeline:
                return cast(PipelineBackend, backend).branch_outputs(stacked, order)
            uint8 = takes_uint8_tiles(backend)
            buffer = self._tiles.take(*tile_layout(m, stacked.shape[0], uint8))
            try:
                with timed(timer, "tile"):
                    tiles = cut_tiles(stacked, m, order, buffer, uint8)
                    small = None
                    if m.thumbnail is not None:
                        small = thumbnail_tiles(stacked, m.thumbnail.size, m.preprocessing, input_order=order)
                if small is None:
                    maps, scores = cast(InferenceBackend, backend).infer(tiles, timer)
                    return maps, scores, None
                (maps, scores), thumbnail = cast(ThumbnailInference, backend).infer_with_thumbnail(tiles, small, timer)
                return maps, scores, thumbnail
            finally:
                self._tiles.give(buffer)  # the backends' outputs never alias their input

    def _streamed_outputs(
        self,
        backend: StreamingInference,
        images: np.ndarray | Sequence[np.ndarray],
        order: InputOrder,
        timer: StageTimes | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`_location_outputs` through :meth:`.StreamingInference.infer_stream`: tiles a few images at a time."""
        m = self.manifest
        n = len(images)
        uint8 = takes_uint8_tiles(backend)
        one, dtype = tile_layout(m, 1, uint8)
        group = stream_group(int(np.prod(one)) * dtype.itemsize, n)
        # Leased like the outputs: once the backbone has read it, the call's masks can take its memory.
        shape, _ = tile_layout(m, group, uint8)
        buffer = self._outputs.take(shape, dtype.str)
        # The uint8 tile kernel takes the images where they are; the float one wants them stacked first.
        staging = None if group == 1 or uint8 else self._tiles.take((group, *images[0].shape), "uint8")

        def fill(lo: int, hi: int) -> np.ndarray:
            count = hi - lo
            with timed(timer, "tile"):
                part: np.ndarray | list[np.ndarray]
                if count == 1:
                    part = images[lo][None]
                elif staging is None:
                    part = list(images[lo:hi])
                else:
                    part = np.stack(list(images[lo:hi]), out=staging[:count])
                # The first ``count`` images' worth of the buffer, C-contiguous (the last group may be short).
                out = buffer.reshape(-1)[: int(np.prod(one)) * count].reshape(one[0], count, *one[2:])
                return cut_tiles(part, m, order, out, uint8)

        try:
            return backend.infer_stream(TileStream(n, group, fill), timer)
        finally:
            if staging is not None:
                self._tiles.give(staging)

    @contextmanager
    def _stacked(self, images: np.ndarray | Sequence[np.ndarray], timer: StageTimes | None) -> Iterator[np.ndarray]:
        """``images`` as one ``(n, H, W, C)`` array: as given, a view of one image, or stacked into a pooled buffer."""
        if isinstance(images, np.ndarray):
            yield images
            return
        if len(images) == 1:
            yield images[0][None]
            return
        with timed(timer, "input"):
            stacked = np.stack(images, out=self._tiles.take((len(images), *images[0].shape), "uint8"))
        try:
            yield stacked
        finally:
            self._tiles.give(stacked)

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
        maps, scores, _ = self.branch_outputs(images, input_order=input_order, resize=resize)
        return maps, scores

    def branch_outputs(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`location_outputs` plus the thumbnail model's raw maps (bundles with a thumbnail branch).

        Merge them as :meth:`predict` does with
        ``postprocess_maps(..., fuse=fuser(manifest.thumbnail, thumbnail))``
        (:func:`tilead.runtime.thumbnail.fuser`).

        Returns:
            ``(maps, scores, thumbnail)``: as :meth:`location_outputs`, and float32 ``(n, h, w)``
            (None without a thumbnail branch).
        """
        _, items, _ = self._images(images, resize)
        with self._in_use(), thread_budget(self.threads):
            chunks = [
                self._location_outputs(np.stack(items[start : start + self.max_batch]), input_order)
                for start in range(0, len(items), self.max_batch)
            ]
        maps = np.concatenate([c[0] for c in chunks], axis=1)
        parts = [c[1] for c in chunks if c[1] is not None]
        small = [c[2] for c in chunks if c[2] is not None]
        return (
            maps,
            np.concatenate(parts, axis=1) if parts else None,
            np.concatenate(small, axis=0) if small else None,
        )

    def _run(
        self, batch: np.ndarray | Sequence[np.ndarray], input_order: InputOrder, timer: StageTimes | None
    ) -> list[Prediction]:
        m = self.manifest
        backend = self._open()
        if backend.capabilities.full_pipeline:
            order: InputOrder = "GRAY" if batch[0].shape[2] == 1 else input_order
            pipeline = cast(PipelineBackend, backend)
            with self._stacked(batch, timer) as stacked:
                result = pipeline.run_images(stacked, order, timer)
                if not result.finite.all():  # name the broken locations: one more pass, only for a broken output
                    maps, tile_scores = pipeline.location_outputs(stacked, order)
                    result = replace(result, errors=nonfinite_errors(np.asarray(maps), m.grid, tile_scores))
        else:
            maps, scores, thumbnail = self._location_outputs(batch, input_order, timer)
            fuse = None if m.thumbnail is None or thumbnail is None else fuser(m.thumbnail, thumbnail)
            _, result = self.post.apply(
                maps, tile_scores=scores, timer=timer, inplace=True, fuse=fuse, allocate=self._outputs.take
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
            for i in range(len(batch))
        ]

    def predict(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False, map_size: MapSize = "input"
    ) -> Prediction | list[Prediction]:
        """Score images.

        Args:
            images: uint8 ``(H, W)``, ``(H, W, C)`` (one image), ``(n, H, W, C)``
                or a list of ``(H, W[, C])`` arrays; ``C`` 1 or 3, at the bundle's
                image size unless ``resize``.
            input_order: Channel order of 3-channel images: ``"BGR"`` (OpenCV's) or ``"RGB"``.
            resize: Resize other sizes to the bundle's instead of raising, as training resizes
                (:func:`tilead.runtime.image_resize.resize_image`: OpenCV's ``INTER_AREA`` when
                shrinking along both axes, else bilinear).
            map_size: With ``resize``, where a resized image's ``anomaly_map`` and ``mask``
                come back: ``"input"`` (default) at the image's own size, ``"bundle"`` at the
                bundle's image size (what the models saw). At the input size the map is the
                bundle-size map resized bilinearly (align_corners=False) and the mask is that
                map above the pixel threshold (0.5 on normalized maps, the raw pixel threshold
                for stage ``none``; non-finite values anomalous). ``score``, ``raw_score`` and
                ``label`` do not depend on it.

        Returns:
            One :class:`Prediction` for one image, else a list in input order.

        Raises:
            ValueError: For a wrong type, dtype, channel count, size or an empty list.
            RuntimeError: After :meth:`close`.
        """
        single, results = self._predict(images, input_order, resize, None, map_size)
        return results[0] if single else results

    def predict_timed(
        self, images: Any, *, input_order: InputOrder = "BGR", resize: bool = False, map_size: MapSize = "input"
    ) -> tuple[list[Prediction], StageTimes]:
        """:meth:`predict` that also returns where the time went.

        Stages (seconds, summed over ``max_batch`` chunks): ``input`` (checks,
        resizing, stacking), ``tile``, ``inference`` (wall time of all
        locations), ``untile``, ``seam``, ``crop``, ``fuse`` (thumbnail branch), ``normalize``,
        ``output_resize`` (maps of resized images back to their own size),
        plus ``location:<name>`` per location (the time of its session's run,
        which overlaps with other locations' when they run side by side).

        Returns:
            ``(predictions, times)``; predictions always as a list.
        """
        timer = StageTimes()
        _, results = self._predict(images, input_order, resize, timer, map_size)
        return results, timer

    def _predict(
        self, images: Any, input_order: InputOrder, resize: bool, timer: StageTimes | None, map_size: MapSize = "input"
    ) -> tuple[bool, list[Prediction]]:
        if map_size not in MAP_SIZES:
            raise ValueError(f"map_size: expected 'input' or 'bundle', got {describe(map_size)}")
        with timed(timer, "input"):
            single, items, sizes = self._images(images, resize)
        results: list[Prediction] = []
        with self._in_use(), thread_budget(self.threads):  # the kernels (tile, untile, ...) use the same budget
            for start in range(0, len(items), self.max_batch):
                # Stacked into a reused buffer only where the backend needs the whole batch at once (_stacked).
                results.extend(self._run(items[start : start + self.max_batch], input_order, timer))
        if map_size == "input" and any(sizes):
            with timed(timer, "output_resize"):
                results = [
                    r if size is None else self._at_size(r, size) for r, size in zip(results, sizes, strict=True)
                ]
        return single, results

    def _at_size(self, result: Prediction, size: tuple[int, int]) -> Prediction:
        """``result`` with its map resized (bilinear) to ``size`` and its mask re-thresholded there."""
        stats = self.manifest.stats
        anomaly_map = resize_maps(result.anomaly_map[None], size)[0]
        with np.errstate(invalid="ignore"):
            if stats.stage == "none":
                mask = ~np.isfinite(anomaly_map) | (anomaly_map > np.float32(stats.pixel_threshold))
            else:
                mask = ~np.isfinite(anomaly_map) | (anomaly_map > np.float32(0.5))
        return replace(result, anomaly_map=anomaly_map, mask=mask)


def takes_uint8_tiles(backend: Backend) -> bool:
    """Whether an inference backend takes uint8 channels-last tiles, else float tiles.

    Its ``uint8_tiles``: an OpenVINO backbone compiled to normalize them itself
    (:func:`tilead.runtime.backends.openvino.compile_backbone`).
    """
    return bool(getattr(backend, "uint8_tiles", False))


def tile_layout(manifest: Manifest, n: int, uint8: bool) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of ``n`` images' tiles: uint8 ``(L, n, th, tw, C)``, else ``(L, n, C, th, tw)`` float."""
    if uint8:
        return tile_shape_u8(manifest.grid, n, manifest.preprocessing), np.dtype(np.uint8)
    return tile_shape(manifest.grid, n, manifest.preprocessing), np.dtype(manifest.preprocessing.dtype)


def cut_tiles(
    images: np.ndarray | list[np.ndarray], manifest: Manifest, order: InputOrder, out: np.ndarray, uint8: bool
) -> np.ndarray:
    """``images`` cut into ``out`` (:func:`tile_layout`): uint8 or normalized float tiles.

    Args:
        images: uint8 ``(n, H, W, C)``; for uint8 tiles also a list of ``n`` ``(H, W, C)`` images.
        manifest: The bundle's manifest (grid, preprocessing).
        order: The images' channel order.
        out: The tile buffer, :func:`tile_layout`'s shape and dtype.
        uint8: Cut uint8 channels-last tiles (else normalized float tiles).
    """
    if uint8:
        return tile_images_u8(images, manifest.grid, manifest.preprocessing, input_order=order, out=out)
    if isinstance(images, list):
        raise TypeError("float tiles are cut from one (n, H, W, C) array")
    return tile_images(images, manifest.grid, manifest.preprocessing, input_order=order, out=out)
