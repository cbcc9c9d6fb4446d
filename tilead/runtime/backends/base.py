"""What the Predictor asks of a backend, and the shared per-location loop of the inference-only backends.

Two kinds of backend fit one protocol (:class:`Backend`):

* **Inference only** (``capabilities.full_pipeline`` False: ONNX Runtime,
  OpenVINO). The Predictor tiles on the host and calls
  :meth:`InferenceBackend.infer` with every location's tiles; the backend runs
  each location's model and returns the raw maps and, for bundles whose
  ``image_score`` is ``detector``, the per-tile scores. Untiling, seams and
  normalization stay in the Predictor (:func:`tilead.runtime.stats.postprocess_maps`).
* **Full pipeline** (``capabilities.full_pipeline`` True: native TensorRT).
  The backend takes the uint8 images and runs tiling, inference, untiling,
  seams and normalization itself (:meth:`PipelineBackend.run_images`).

Every backend is built from one :class:`BackendRequest` by the factory the
registry (:mod:`tilead.runtime.backends`) names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from tilead.runtime.bundle import BundleError, Manifest
from tilead.runtime.postprocess import NormalizedMaps
from tilead.runtime.preprocess import InputOrder
from tilead.runtime.timing import StageTimes, timed

LocationOutputs = tuple[np.ndarray, np.ndarray | None]
"""``(maps, scores)``: float32 ``(locations, n, h, w)`` and float32 ``(locations, n)`` or None."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    Attributes:
        devices: Devices it runs on (``"cpu"``, ``"cuda"``).
        full_pipeline: It runs tiling, inference and post-processing itself
            (:class:`PipelineBackend`); otherwise inference only (:class:`InferenceBackend`).
        detector_score: It returns the per-tile ``score`` output of bundles
            whose ``image_score`` is ``detector``.
    """

    devices: tuple[str, ...]
    full_pipeline: bool
    detector_score: bool


@dataclass(frozen=True)
class BackendRequest:
    """Everything a backend factory gets from the Predictor.

    Attributes:
        bundle: Bundle directory.
        manifest: Its manifest (files verified).
        models: Every location's ONNX model bytes, row-major (read by the Predictor; empty for a
            backend whose registry entry has ``reads_onnx`` False).
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for inference in all (None: the machine's logical cores).
        location_workers: Locations run at the same time (None: the backend's default).
        max_batch: Most images per call.
        precision: Engine precision for backends that have several (TensorRT), or None.
        build_on_load: Asks the backend to build missing engines (refused: the exporter builds them).
        cuda_graphs: Capture and replay CUDA graphs per batch size (the TensorRT backend; others ignore it).
    """

    bundle: Path
    manifest: Manifest
    models: tuple[bytes, ...]
    device: str
    threads: int | None
    location_workers: int | None
    max_batch: int
    precision: str | None = None
    build_on_load: bool = False
    cuda_graphs: bool = True


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


RunLocation = Callable[[int, np.ndarray], Sequence[np.ndarray]]
"""``(location index, its tiles (n, C, th, tw)) -> [map (n, 1, h, w), score (n,)?]``."""


def default_location_workers(device: str, locations: int, threads: int) -> int:
    """Locations side by side when not given: on a CPU ``min(locations, threads)``, on a GPU 1."""
    return min(locations, threads) if device == "cpu" else 1


def run_locations(
    manifest: Manifest,
    tiles: np.ndarray,
    run_one: RunLocation,
    pool: ThreadPoolExecutor | None,
    timer: StageTimes | None,
) -> LocationOutputs:
    """Run every location's model (side by side on ``pool`` when given) and gather checked outputs.

    Args:
        manifest: The bundle's manifest (map size, locations, image score).
        tiles: float32 ``(locations, n, C, th, tw)``.
        run_one: Runs one location's model; returns its outputs in the order
            ``map`` then (for ``image_score`` ``detector``) ``score``.
        pool: Worker threads, or None to run the locations one after another.
        timer: Receives ``inference`` and ``location:<name>`` stages.

    Returns:
        ``(maps, scores)`` as :meth:`InferenceBackend.infer` describes.

    Raises:
        BundleError: If a model's output shape differs from the manifest's.
    """
    m = manifest
    count, n = tiles.shape[0], tiles.shape[1]
    h, w = m.map_size
    maps = np.empty((count, n, h, w), dtype=np.float32)
    scores = np.empty((count, n), dtype=np.float32) if m.image_score == "detector" else None

    def run(index: int) -> float:
        start = time.perf_counter()
        outs = run_one(index, tiles[index])
        out = np.asarray(outs[0])
        if out.shape != (n, 1, h, w):
            raise BundleError(
                f"location {m.locations[index].name}: model output shape {out.shape}, the manifest promises "
                f"({n}, 1, {h}, {w})"
            )
        maps[index] = out[:, 0]
        if scores is not None:
            score = np.asarray(outs[1])
            if score.shape != (n,):
                raise BundleError(
                    f"location {m.locations[index].name}: model output 'score' has shape {score.shape}, expected ({n},)"
                )
            scores[index] = score
        return time.perf_counter() - start

    with timed(timer, "inference"):
        indices = range(count)
        seconds = list(pool.map(run, indices)) if pool is not None else [run(i) for i in indices]
    if timer is not None:
        for loc, sec in zip(m.locations, seconds, strict=True):
            timer.add(f"location:{loc.name}", sec)
    return maps, scores
