"""A shared backbone's calls and the heads in one queue: each head starts once its locations' features are there (#21).

:func:`~tilead.runtime.backends.base.run_backbone_stream` then
:func:`~tilead.runtime.backends.base.run_locations` hold a barrier between the two: every backbone call
of the batch ends before the first head starts, so a worker that finished its backbone calls waits for
the slowest one. Here the last group of images' backbone calls (one call never crosses a location) and
then the heads' jobs are queued on the same location workers, in that order; a head's job first waits
for its own locations' calls. The workers' queue is first in, first out, so when a job waits, every call
it waits for has already been taken by a worker (or is done): nothing waits for work that has not
started, and a worker that runs out of backbone calls starts a head instead of idling at the barrier.
The maps are the same as with the barrier: each head reads only its own locations' features.

Measured on bottle (int8_bf16, native heads, batch 1, 2 workers) in docs/cpu_speed.md.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from tilead.runtime.backends.base import (
    BufferPool,
    Job,
    LocationCalls,
    LocationOutputs,
    RunBackbone,
    RunLocation,
    TileStream,
    stream_calls,
)
from tilead.runtime.bundle import BundleError, Manifest
from tilead.runtime.timing import StageTimes, timed


def backbone_then_heads(
    manifest: Manifest,
    stream: TileStream,
    run: RunBackbone,
    buffers: BufferPool,
    workers: ThreadPoolExecutor,
    timer: StageTimes | None,
    jobs: tuple[Job, ...],
    run_one: RunLocation,
) -> LocationOutputs:
    """The backbone on every tile ``stream`` makes, then every head, without a barrier between the last calls.

    Groups of images before the last go through the backbone as in
    :func:`~tilead.runtime.backends.base.run_backbone_stream` (all their calls done before the next fill). The
    last group's calls, one per location and run of tiles, are submitted to ``workers``, then one task per job
    of ``jobs`` that waits for its locations' calls and runs the head (:class:`.base.LocationCalls`).

    Args:
        manifest: A ``shared_backbone`` manifest.
        stream: The batch's tiles, a few images at a time.
        run: Runs the backbone on a run of one location's tiles, writing the features into the given block.
        buffers: Where the feature buffer comes from; it is given back here, after every task ended.
        workers: The location workers (FIFO; at least the backbone's streams).
        timer: Receives ``inference``, ``location:backbone`` (from the start to the last backbone call's end)
            and ``location:<model name>``.
        jobs: The heads' calls (:func:`~tilead.runtime.backends.base.location_jobs`).
        run_one: Runs one head on its locations' features (:data:`~tilead.runtime.backends.base.RunLocation`).

    Returns:
        ``(maps, scores)`` as :meth:`~tilead.runtime.backends.base.InferenceBackend.infer` describes.

    Raises:
        BundleError: For a manifest without a shared backbone, a fill of the wrong shape, or a head's output
            of the wrong shape. An exception of a backbone call is raised from the head waiting for it.
    """
    if manifest.features is None:
        raise BundleError(f"layout {manifest.layout!r} has no shared backbone")
    count, n = len(manifest.locations), stream.images
    features = buffers.take((count, n, *manifest.features))
    submitted: list[Future[object]] = []
    lock = threading.Lock()
    backbone_end = [0.0]

    def call(loc: int, tiles: np.ndarray, lo: int, a: int, b: int) -> None:
        run(tiles[loc, a:b], features[loc, lo + a : lo + b])
        with lock:
            backbone_end[0] = max(backbone_end[0], time.perf_counter())

    start = time.perf_counter()
    try:
        with timed(timer, "inference"):
            pending: dict[int, list[Future[object]]] = {}
            for lo, tiles, backbone_calls in stream_calls(stream, count):
                pending = {loc: [] for loc in range(count)}
                for loc, a, b in backbone_calls:
                    future: Future[object] = workers.submit(call, loc, tiles, lo, a, b)
                    submitted.append(future)
                    pending[loc].append(future)
                if lo + stream.group < n:  # the next fill reuses the tile array: this group's calls end first
                    for future in submitted:
                        future.result()
            calls = LocationCalls(manifest, features, run_one, jobs)

            def head(job: Job) -> float:
                for loc in job[1]:
                    for future in pending[loc]:
                        future.result()  # taken by a worker already (FIFO): this waits for running work only
                return calls.run(job)

            heads = [workers.submit(head, job) for job in calls.jobs]
            submitted.extend(heads)  # type: ignore[arg-type]
            seconds = [future.result() for future in heads]
        if timer is not None:
            timer.add("location:backbone", max(0.0, backbone_end[0] - start))
        return calls.outputs(seconds, timer)
    finally:
        concurrent.futures.wait(submitted)  # no task writes into or reads the features once they are given back
        buffers.give(features)
