"""The runtime's memory (issue #21): streamed tiles, leased features, best-fit buffers, session options.

Real ONNX Runtime on the small graphs of tests/bundle_factory.py; no mocks.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle, make_shared_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead.runtime import BundleError, Predictor
from tilead.runtime.backends.base import BufferPool, TileStream, run_backbone_stream, stream_group
from tilead.runtime.backends.onnxruntime import (
    LeasedBuffers,
    OnnxRuntimeBackend,
    import_ort,
    session_options,
)
from tilead.runtime.buffers import LeasePool
from tilead.runtime.preprocess import tile_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("memory")
    return make_bundle(root / "per_location"), make_shared_bundle(root / "shared")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _backend(p: Predictor) -> OnnxRuntimeBackend:
    backend = p._open()
    assert isinstance(backend, OnnxRuntimeBackend)
    return backend


# -- stream_group ---------------------------------------------------------------------------------------------


@given(st.integers(0, 1 << 30), st.integers(1, 64), st.integers(0, 1 << 30))
def test_stream_group_holds_at_most_the_limit_and_at_least_one_image(image_bytes: int, n: int, limit: int) -> None:
    group = stream_group(image_bytes, n, limit)
    assert 1 <= group <= n
    if group > 1:
        assert group * max(1, image_bytes) <= limit
    if group < n:  # one more image would not fit
        assert (group + 1) * max(1, image_bytes) > limit


# -- streamed tiles through the shared backbone ---------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_tiles_give_the_maps_of_the_whole_batch(pair: tuple[Path, Path], group: int, workers: int) -> None:
    images = _images(5)
    with Predictor(pair[1], threads=2, location_workers=workers) as p:
        backend, m = _backend(p), p.manifest
        tiles = tile_images(images, m.grid, m.preprocessing)
        want_maps, want_scores = backend.infer(tiles.copy())
        filled: list[tuple[int, int]] = []

        def fill(lo: int, hi: int) -> np.ndarray:
            filled.append((lo, hi))
            return np.ascontiguousarray(tiles[:, lo:hi])

        maps, scores = backend.infer_stream(TileStream(5, group, fill))
    np.testing.assert_array_equal(maps, want_maps)
    assert (scores is None) == (want_scores is None)
    starts = list(range(0, 5, group))
    assert filled == [(lo, min(5, lo + group)) for lo in starts]


def test_a_stream_of_the_wrong_shape_is_refused_and_its_buffer_returned(pair: tuple[Path, Path]) -> None:
    with Predictor(pair[1], threads=1) as p:
        backend, m = _backend(p), p.manifest
        tiles = tile_images(_images(2), m.grid, m.preprocessing)
        pool = BufferPool()
        with pytest.raises(BundleError, match=r"tile stream: expected C-contiguous \(4, 2, \.\.\.\)"):
            run_backbone_stream(
                m, TileStream(2, 2, lambda lo, hi: tiles[:, :1]), backend._run_features, pool, None, None
            )
        with pytest.raises(BundleError, match="C-contiguous"):
            run_backbone_stream(
                m, TileStream(2, 2, lambda lo, hi: tiles[:, :, :, ::-1]), backend._run_features, pool, None, None
            )
        assert pool.idle_bytes > 0  # the features buffer came back


def test_infer_stream_needs_a_shared_backbone(pair: tuple[Path, Path]) -> None:
    with Predictor(pair[0], threads=1) as p:
        backend = _backend(p)
        assert not backend.streams_tiles
        with pytest.raises(BundleError, match="streamed tiles need a shared backbone"):
            backend.infer_stream(TileStream(1, 1, lambda lo, hi: np.empty(0, np.float32)))


def test_a_shared_bundle_streams_and_a_per_location_one_does_not(pair: tuple[Path, Path]) -> None:
    images = list(_images(4, seed=3))
    with Predictor(pair[0], max_batch=4) as old, Predictor(pair[1], max_batch=4) as new:
        assert _backend(new).streams_tiles
        olds, news = old.predict(images), new.predict(images)
        assert isinstance(olds, list)
        assert isinstance(news, list)
        for a, b in zip(olds, news, strict=True):
            np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-6)
        _, times = new.predict_timed(images)
    assert times.seconds["tile"] > 0
    assert times.seconds["inference"] >= times.seconds["location:backbone"] > 0


# -- leased features: the maps of a call reuse their memory -----------------------------------------------------


def test_the_backbone_features_are_leased_from_the_predictors_pool(pair: tuple[Path, Path]) -> None:
    with Predictor(pair[1], max_batch=4) as p:
        backend = _backend(p)
        assert isinstance(backend._buffers, LeasedBuffers)
        for seed in range(3):
            result = p.predict(_images(4, seed))
            del result
        gc.collect()
        assert backend._buffers.idle_bytes == 0  # nothing held by the backend itself
        assert p.manifest.features is not None
        features = 4 * len(p.manifest.locations) * int(np.prod(p.manifest.features)) * 4
        assert p._outputs.idle_bytes >= features


def test_a_backend_without_an_allocator_keeps_its_own_pool(pair: tuple[Path, Path]) -> None:
    with Predictor(pair[1], max_batch=2) as p:
        m = p.manifest
        models = [(pair[1] / loc.file).read_bytes() for loc in m.models]
        assert m.backbone is not None
        backbone = (pair[1] / m.backbone.file).read_bytes()
        own = OnnxRuntimeBackend(m, models, ["CPUExecutionProvider"], threads=1, location_workers=1, backbone=backbone)
        try:
            assert not isinstance(own._buffers, LeasedBuffers)
            tiles = tile_images(_images(2), m.grid, m.preprocessing)
            np.testing.assert_array_equal(own.infer(tiles)[0], _backend(p).infer(tiles)[0])
            assert own._buffers.idle_bytes > 0
        finally:
            own.close()


# -- LeasePool best fit -----------------------------------------------------------------------------------------


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_an_idle_buffer_of_another_shape_serves_a_request_within_fit() -> None:
    pool = LeasePool(keep=4)
    big = pool.take((10, 10), "float32")  # 400 bytes
    first = _address(big)
    del big
    small = pool.take((3, 20), "float32")  # 240 bytes: 400 <= 2 x 240
    assert _address(small) == first
    assert small.shape == (3, 20)
    assert small.flags.c_contiguous
    assert small.flags.writeable
    del small
    tiny = pool.take((10,), "float32")  # 40 bytes: 400 > 2 x 40, a new buffer
    assert _address(tiny) != first
    mask = pool.take((300,), "bool")  # another dtype, 300 bytes: fits
    assert _address(mask) == first
    del tiny, mask


def test_a_large_request_nothing_serves_drops_the_smaller_idle_buffers() -> None:
    pool = LeasePool(keep=4)
    mib = (1 << 20) // 4  # float32 elements in 1 MiB
    small, tiny, big = pool.take((mib,)), pool.take((8,)), pool.take((3 * mib,))
    del small, tiny, big
    assert pool.idle == 3
    little = pool.take((100,))  # under TRIM_BYTES: nothing fits (within FIT), nothing dropped
    assert pool.idle == 3
    huge = pool.take((8 * mib,))  # nothing fits: every idle buffer smaller than 32 MiB goes
    assert pool.idle == 0
    del huge
    assert pool.idle == 1
    mid = pool.take((4 * mib,))  # 16 MiB: the idle 32 MiB buffer fits (FIT 2)
    assert pool.idle == 0
    del little, mid


def test_an_exact_match_is_preferred_to_a_closer_fit() -> None:
    pool = LeasePool(keep=4)
    a, b = pool.take((100,), "float32"), pool.take((60,), "float32")
    exact = _address(a)
    del a, b
    again = pool.take((100,), "float32")
    assert _address(again) == exact
    del again


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 64), st.sampled_from(["float32", "uint8", "bool"]), st.booleans()), max_size=30)
)
def test_best_fit_never_hands_out_memory_a_live_array_uses(steps: list[tuple[int, str, bool]]) -> None:
    pool = LeasePool(keep=3)
    live: list[tuple[np.ndarray, int]] = []
    for i, (size, dtype, drop) in enumerate(steps):
        a = pool.take((size,), dtype)
        assert a.shape == (size,)
        assert a.dtype == np.dtype(dtype)
        a.view(np.uint8)[:] = i % 251
        for other, _ in live:
            assert not np.shares_memory(a, other)
        live.append((a, i % 251))
        if drop and len(live) > 1:
            live.pop(0)
        for arr, value in live:
            assert np.all(arr.view(np.uint8) == value)


# -- ONNX Runtime session options -------------------------------------------------------------------------------


def test_the_locations_graphs_run_without_a_memory_pattern_and_the_backbone_with_it(pair: tuple[Path, Path]) -> None:
    ort = import_ort()
    assert session_options(ort, 1, cpu_only=True, fold=True).enable_mem_pattern is True
    assert session_options(ort, 1, cpu_only=True, fold=True, mem_pattern=False).enable_mem_pattern is False
    with Predictor(pair[1], threads=1) as shared, Predictor(pair[0], threads=1) as full:
        heads = _backend(shared)._sessions
        assert heads is not None
        assert {s.get_session_options().enable_mem_pattern for s in heads} == {False}
        assert _backend(shared)._backbone.get_session_options().enable_mem_pattern is True
        graphs = _backend(full)._sessions
        assert graphs is not None
        assert {s.get_session_options().enable_mem_pattern for s in graphs} == {False}


# -- benchmarks/bench_memory.py ---------------------------------------------------------------------------------


def _write_pngs(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(_images(count, seed=7)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


def test_bench_memory_refuses_too_few_images(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    _write_pngs(tmp_path / "imgs", 2)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_memory.py"),
            str(pair[1]),
            "--images",
            str(tmp_path / "imgs"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "2 image(s) found, the largest batch needs 8" in proc.stderr


@pytest.mark.integration
def test_bench_memory_measures_each_bundle_in_its_own_process(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    _write_pngs(tmp_path / "imgs", 3)
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), str(pair[0]), str(pair[1])]
    cmd += ["--images", str(tmp_path / "imgs"), "--batch", "1", "3", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(out.read_text())
    assert [r["layout"] for r in report["results"]] == ["per_location", "shared_backbone"]
    for r in report["results"]:
        steps = r["steps"]
        assert list(steps) == ["start", "images", "loaded", "batch 1", "batch 3"]
        assert r["peak_rss_mib"] >= max(s["VmRSS"] for s in steps.values())
        parts = r["breakdown_mib"]
        assert sum(parts.values()) == pytest.approx(r["peak_rss_mib"], abs=1e-6)
        assert parts["model files"] > 0
    assert "| per_location | " in proc.stdout
    assert "| shared | " in proc.stdout


def test_process_memory_reads_this_process_resident_and_peak_sizes() -> None:
    from tilead.benchmarking.environment import process_memory_mib

    before = process_memory_mib()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB touched: the resident size and its peak grow
    after = process_memory_mib()
    assert int(block[-1]) == 1
    assert 0 < before["VmRSS"] <= before["VmHWM"]
    assert after["VmRSS"] >= before["VmRSS"] + 48
    assert after["VmHWM"] >= after["VmRSS"]
