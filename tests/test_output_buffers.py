"""Reused output buffers (issue #21): results a caller holds are never overwritten, dropped ones are reused.

Also the per-thread kernel budget that follows ``Predictor(threads=...)``.
"""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import GRID, make_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead import _kernels
from tilead.runtime import Predictor, SeamSmoothing, TileGrid, get_num_threads, merge_maps, set_num_threads
from tilead.runtime.buffers import LeasePool
from tilead.runtime.devices import thread_budget
from tilead.runtime.postprocessor import PostProcessor


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


# -- LeasePool --------------------------------------------------------------------------------------


def test_a_buffer_comes_back_only_when_every_view_is_gone() -> None:
    pool = LeasePool(keep=2)
    a = pool.take((3, 4, 5), "float32")
    assert a.flags.c_contiguous
    assert a.flags.writeable
    assert a.dtype == np.float32
    assert a.shape == (3, 4, 5)
    first = address(a)
    view = a[1].view(np.int32)[::2]  # a view of a view keeps the buffer too
    del a
    assert pool.idle == 0
    b = pool.take((3, 4, 5), "float32")
    assert address(b) != first  # the held view's memory is not handed out again
    del view
    assert pool.idle == 1
    c = pool.take((3, 4, 5), "float32")
    assert address(c) == first
    assert pool.idle == 0
    del b, c


def test_a_view_dropped_on_another_thread_gives_the_buffer_back() -> None:
    """The lease's ``__del__`` runs where the last view dies: another thread's drop returns the buffer too."""
    pool = LeasePool(keep=2)
    a = pool.take((16, 16), "float32")
    first = address(a)
    held = [a[3:]]
    del a
    assert pool.idle == 0
    worker = threading.Thread(target=held.clear)
    worker.start()
    worker.join()
    assert pool.idle == 1
    b = pool.take((16, 16), "float32")
    assert address(b) == first


def test_shape_and_dtype_must_match_and_keep_bounds_the_idle_list() -> None:
    pool = LeasePool(keep=1)
    a = pool.take((8,), "uint8")
    del a
    assert pool.idle == 1
    other = pool.take((8,), "float32")  # another dtype: the idle uint8 buffer does not fit
    assert pool.idle == 1
    kept = address(other)
    del other  # two returned, keep=1: the older one (the uint8) is dropped
    assert pool.idle == 1
    small = pool.take((8,), "uint8")  # nothing fits: a new one, the float32 buffer stays idle
    assert pool.idle == 1
    again = pool.take((8,), "float32")
    assert address(again) == kept
    assert pool.idle == 0
    del small, again


def test_closed_pool_keeps_nothing() -> None:
    pool = LeasePool(keep=4)
    a = pool.take((4,), "float32")
    pool.close()
    del a
    assert pool.idle == 0
    with pytest.raises(ValueError, match="keep"):
        LeasePool(keep=-1)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(2, 3), (6,), (1, 2, 3)]), st.booleans()), min_size=1, max_size=25))
def test_no_live_array_ever_shares_memory_with_another(steps: list[tuple[tuple[int, ...], bool]]) -> None:
    """Whatever the order of takes and drops, two live arrays never share a buffer, and values survive."""
    pool = LeasePool(keep=3)
    live: list[tuple[np.ndarray, float]] = []
    for i, (shape, drop_oldest) in enumerate(steps):
        a = pool.take(shape, "float32")
        a.fill(float(i))
        for other, _ in live:
            assert not np.shares_memory(a, other)
        live.append((a, float(i)))
        if drop_oldest and len(live) > 1:
            live.pop(0)
        for arr, value in live:
            assert np.all(arr == value)


def test_concurrent_takes_get_distinct_buffers() -> None:
    pool = LeasePool(keep=4)
    barrier = threading.Barrier(4)

    def work(i: int) -> bool:
        ok = True
        for _ in range(50):
            a = pool.take((64, 64), "float32")
            a.fill(i)
            barrier.wait()  # all four hold a buffer at once
            ok &= bool(np.all(a == i))
            barrier.wait()
            del a
        return ok

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(4)))


# -- merge_maps with an allocator -------------------------------------------------------------------


@pytest.mark.parametrize("edge", ["shift", "pad", "resize"])
def test_merge_into_pooled_buffers_equals_fresh(edge: str) -> None:
    grid = TileGrid((50, 61), 24, 16, edge=edge)
    maps = np.random.default_rng(0).standard_normal((grid.num_locations, 3, 6, 6)).astype(np.float32)
    pool = LeasePool()
    seam = SeamSmoothing(2.0, 0.2)
    want = merge_maps(maps, grid, weights="feather", seam=seam)
    for _ in range(3):  # reused buffers hold the previous call's values: every value is written again
        got = merge_maps(maps * 2, grid, weights="feather", seam=seam, allocate=pool.take)
        got = merge_maps(maps, grid, weights="feather", seam=seam, allocate=pool.take)
        np.testing.assert_array_equal(got, want)
        del got


# -- Predictor --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("buffers") / "b")


def images(seed: int, n: int) -> np.ndarray:
    h, w = TileGrid.from_dict(GRID).image_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_held_results_are_never_overwritten_and_dropped_ones_are_reused(bundle: Path) -> None:
    with Predictor(bundle, max_batch=4) as p:
        first = p.predict(images(0, 3))
        assert isinstance(first, list)
        kept_map = first[1].anomaly_map.copy()
        kept_mask = first[1].mask.copy()
        held = first[1]
        del first
        for seed in range(1, 4):  # later calls while one result of the first batch is still held
            p.predict(images(seed, 3))
        np.testing.assert_array_equal(held.anomaly_map, kept_map)
        np.testing.assert_array_equal(held.mask, kept_mask)
        held_address = address(held.anomaly_map)
        del held
        gc.collect()
        reused = p.predict(images(5, 3))
        assert isinstance(reused, list)
        assert address(reused[1].anomaly_map) == held_address  # the last buffer returned is taken first
        with Predictor(bundle, max_batch=4) as other:
            fresh = other.predict(images(5, 3))
        assert isinstance(fresh, list)
        for a, b in zip(reused, fresh, strict=True):
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.score == b.score
            assert a.label == b.label


def test_a_loop_that_drops_its_results_reuses_two_buffers(bundle: Path) -> None:
    with Predictor(bundle, max_batch=2) as p:
        seen: set[int] = set()
        result = None
        for seed in range(8):
            result = p.predict(images(seed, 2))  # the previous result is alive during this call
            assert isinstance(result, list)
            seen.add(address(result[0].anomaly_map))
        assert len(seen) == 2  # two buffers taking turns, not one new allocation per call


def test_predictor_threads_budget_the_kernels(bundle: Path) -> None:
    before = get_num_threads()
    set_num_threads(7)
    try:
        with Predictor(bundle, threads=1) as one, Predictor(bundle, threads=2) as two:
            x = images(9, 2)
            a, b = one.predict(x), two.predict(x)
            assert isinstance(a, list)
            assert isinstance(b, list)
            for r, s in zip(a, b, strict=True):
                np.testing.assert_array_equal(r.anomaly_map, s.anomaly_map)
        assert get_num_threads() == 7  # the budget was the call's only
    finally:
        set_num_threads(before)


def test_the_post_processing_runs_under_the_predictors_budget(bundle: Path) -> None:
    seen: list[int] = []

    class Recording(PostProcessor):
        def apply(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(get_num_threads())
            return super().apply(*args, **kwargs)

    before = get_num_threads()
    set_num_threads(7)
    try:
        for threads in (1, 3):
            with Predictor(bundle, threads=threads) as p:
                post = p.post
                p.post = Recording(post.grid, post.weights, post.seam, post.stats, post.image_score)
                p.predict(images(2, 1))
                assert seen[-1] == threads
        assert get_num_threads() == 7
    finally:
        set_num_threads(before)


def test_thread_budget_is_per_thread_and_nests() -> None:
    before = get_num_threads()
    set_num_threads(5)
    try:
        seen: list[int] = []
        with thread_budget(2):
            assert get_num_threads() == 2
            with thread_budget(1):
                assert get_num_threads() == 1
            assert get_num_threads() == 2
            other = threading.Thread(target=lambda: seen.append(get_num_threads()))
            other.start()
            other.join()
        assert seen == [5]  # another thread does not see this thread's budget
        assert get_num_threads() == 5
        assert _kernels.get_thread_budget() == 0
        with thread_budget(None):
            assert get_num_threads() == 5
    finally:
        set_num_threads(before)


@pytest.mark.parametrize("edge", ["pad", "resize"])
def test_canvas_to_image_writes_into_out_and_checks_it(edge: str) -> None:
    grid = TileGrid((50, 61), 24, 16, edge=edge)
    canvas = np.random.default_rng(3).standard_normal((2, *grid.canvas_size)).astype(np.float32)
    out = np.full((2, *grid.image_size), np.nan, dtype=np.float32)
    got = grid.canvas_to_image(canvas, out=out)
    assert got is out
    np.testing.assert_array_equal(out, grid.canvas_to_image(canvas))
    with pytest.raises(ValueError, match=r"out"):
        grid.canvas_to_image(canvas, out=np.empty((2, 50, 60), np.float32))
    with pytest.raises(ValueError, match=r"out"):
        grid.canvas_to_image(canvas, out=np.empty((2, 50, 61), np.float64))
