"""The shared backbone's calls and the heads in one queue (:mod:`tilead.runtime.backends.pipelined`).

A NumPy backbone and NumPy heads stand in for OpenVINO and the native heads: the maps must be those of
the barrier path (``run_backbone_stream`` then ``run_locations``) for every grouping of the images and
number of workers, a head must never read features that are still being written, and a failing call
must neither hang nor keep the feature buffer.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from bundle_factory import make_shared_bundle

from tilead.runtime.backends.base import BufferPool, TileStream, location_jobs, run_backbone_stream, run_locations
from tilead.runtime.backends.pipelined import backbone_then_heads
from tilead.runtime.bundle import BundleError, Manifest, read_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return read_manifest(make_shared_bundle(tmp_path_factory.mktemp("pipelined") / "b"))


def _tiles(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    th, tw = manifest.grid.tile_size
    rng = np.random.default_rng(seed)
    return rng.random((len(manifest.locations), n, 3, th, tw), dtype=np.float32)


class _Backbone:
    """Features from tiles (each channel a different scaled mean of the tile), after a random short sleep."""

    def __init__(self, manifest: Manifest, fail_at: int | None = None) -> None:
        assert manifest.features is not None
        self.d, self.fh, self.fw = manifest.features
        self.fail_at = fail_at
        self.calls = 0
        self.lock = threading.Lock()
        self.rng = random.Random(0)

    def __call__(self, tiles: np.ndarray, out: np.ndarray) -> None:
        with self.lock:
            self.calls += 1
            call, pause = self.calls, self.rng.random() * 0.004
        time.sleep(pause)
        if self.fail_at is not None and call == self.fail_at:
            raise RuntimeError("backbone call failed")
        means = tiles.mean(axis=(1, 2, 3))  # (k,)
        gains = np.arange(1, self.d + 1, dtype=np.float32)
        out[...] = (means[:, None, None, None] * gains[None, :, None, None]).astype(np.float32)


def _head(manifest: Manifest, seen: list[float]) -> object:
    h, w = manifest.map_size
    gains = np.linspace(0.5, 2.0, len(manifest.models), dtype=np.float32)

    def run_one(index: int, block: np.ndarray) -> list[np.ndarray]:
        seen.append(float(block.min()))
        per_tile = block.sum(axis=(1, 2, 3)) * gains[index]  # (k * n,)
        return [np.broadcast_to(per_tile[:, None, None, None], (len(block), 1, h, w)).astype(np.float32)]

    return run_one


def _stream(tiles: np.ndarray, group: int) -> TileStream:
    """The tiles ``group`` images at a time, each fill written into the previous fill's array (as the Predictor's)."""
    arrays: dict[int, np.ndarray] = {}

    def fill(lo: int, hi: int) -> np.ndarray:
        out = arrays.setdefault(hi - lo, np.empty((tiles.shape[0], hi - lo, *tiles.shape[2:]), np.float32))
        out[...] = tiles[:, lo:hi]
        return out

    return TileStream(tiles.shape[1], group, fill)


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("per_location", [True, False])
def test_the_maps_are_the_barrier_paths(
    manifest: Manifest, n: int, group: int, workers: int, per_location: bool
) -> None:
    tiles = _tiles(manifest, n, seed=n + group)
    jobs = location_jobs(manifest, workers, per_location)
    seen: list[float] = []
    run_one = _head(manifest, seen)
    buffers = BufferPool()
    with ThreadPoolExecutor(workers) as pool:
        features = run_backbone_stream(
            manifest, _stream(tiles, group), _Backbone(manifest), buffers, pool, None, workers
        )
        want, _ = run_locations(manifest, features.copy(), run_one, pool, None, jobs)  # type: ignore[arg-type]
        buffers.give(features)
        for _ in range(3):
            poison = buffers.take(features.shape)  # the buffer the call will take, holding what no backbone writes
            poison.fill(-1.0)
            buffers.give(poison)
            got, scores = backbone_then_heads(
                manifest,
                _stream(tiles, group),
                _Backbone(manifest),
                buffers,
                pool,
                None,
                jobs,
                run_one,  # type: ignore[arg-type]
            )
            np.testing.assert_array_equal(got, want)
            assert scores is None
    assert min(seen) > 0  # the tiles' means are positive: no head read a block the backbone had not written yet
    assert buffers.idle_bytes > 0  # the feature buffer came back every time


def test_the_timer_gets_the_backbone_and_every_model(manifest: Manifest) -> None:
    from tilead.runtime.timing import StageTimes

    timer = StageTimes()
    tiles = _tiles(manifest, 2)
    with ThreadPoolExecutor(2) as pool:
        backbone_then_heads(
            manifest, _stream(tiles, 1), _Backbone(manifest), BufferPool(), pool, timer,
            location_jobs(manifest, 2), _head(manifest, []),  # type: ignore[arg-type]
        )  # fmt: skip
    assert timer.seconds["inference"] >= timer.seconds["location:backbone"] > 0
    assert all(f"location:{m.name}" in timer.seconds for m in manifest.models)


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_a_failing_backbone_call_is_raised_and_the_buffer_returned(manifest: Manifest, fail_at: int) -> None:
    tiles = _tiles(manifest, 3)
    buffers = BufferPool()
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match="backbone call failed"):
            backbone_then_heads(
                manifest, _stream(tiles, 2), _Backbone(manifest, fail_at), buffers, pool, None,
                location_jobs(manifest, 2), _head(manifest, []),  # type: ignore[arg-type]
            )  # fmt: skip
        assert buffers.idle_bytes > 0
        # The workers are free again: the next call runs.
        got, _ = backbone_then_heads(
            manifest, _stream(tiles, 2), _Backbone(manifest), buffers, pool, None,
            location_jobs(manifest, 2), _head(manifest, []),  # type: ignore[arg-type]
        )  # fmt: skip
        assert got.shape == (len(manifest.locations), 3, *manifest.map_size)


def test_a_stream_of_the_wrong_shape_is_refused(manifest: Manifest) -> None:
    tiles = _tiles(manifest, 2)
    buffers = BufferPool()
    with ThreadPoolExecutor(2) as pool, pytest.raises(BundleError, match=r"tile stream: expected C-contiguous"):
        backbone_then_heads(
            manifest, TileStream(2, 2, lambda lo, hi: tiles[:, :1]), _Backbone(manifest), buffers, pool, None,
            location_jobs(manifest, 2), _head(manifest, []),  # type: ignore[arg-type]
        )  # fmt: skip
    assert buffers.idle_bytes > 0


def test_a_head_of_the_wrong_shape_is_refused(manifest: Manifest) -> None:
    tiles = _tiles(manifest, 1)

    def bad(index: int, block: np.ndarray) -> list[np.ndarray]:
        return [np.zeros((len(block), 1, 2, 2), np.float32)]

    with ThreadPoolExecutor(2) as pool, pytest.raises(BundleError, match="model output shape"):
        backbone_then_heads(
            manifest, _stream(tiles, 1), _Backbone(manifest), BufferPool(), pool, None, location_jobs(manifest, 2), bad
        )
