"""Shared models on a CPU: one call per location with location workers, one batched call per model without.

:func:`tilead.runtime.backends.base.location_jobs` plans the calls; ``run_locations`` makes them; the
backends size their location workers by locations (an ``all_to_one`` bundle's one model still runs on
every worker). Real ONNX Runtime and OpenVINO on the bundle factory's shared-model bundles.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_assignment import TABLE, make_shared_model_bundle

from tilead import runtime
from tilead.runtime.backends.base import location_jobs, lpt_makespan, run_locations
from tilead.runtime.bundle import BundleError, Manifest, read_manifest

TABLES = [TABLE, (0, 0, 1, 1), (0, 0, 0, 0), (0, 1, 0, 0)]


def _stand_in(table: tuple[int, ...]) -> Manifest:
    """What location_jobs reads of a manifest: the location -> model table and the groups it implies."""
    groups = tuple(tuple(loc for loc, m in enumerate(table) if m == model) for model in range(max(table) + 1))
    return cast(Manifest, SimpleNamespace(location_model=table, groups=groups))


def test_lpt_makespan_examples() -> None:
    assert lpt_makespan([1] * 16, 2) == 8  # one model per location
    assert lpt_makespan([4, 4, 4, 4], 2) == 8  # 2x2 neighbourhood blocks of a 4x4 grid
    assert lpt_makespan([7, 3, 3, 3], 2) == 9  # the demo run's k-means clusters: 7 | 3 + 3 + 3
    assert lpt_makespan([16], 2) == 16  # all_to_one
    assert lpt_makespan([5, 4, 3, 3, 3], 3) == 7  # 5 | 4 + 3 | 3 + 3
    assert lpt_makespan([3, 1], 1) == 4


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 4), st.sampled_from([None, True, False]))
def test_jobs_cover_every_location_once_with_its_model(raw: list[int], workers: int, force: bool | None) -> None:
    used = sorted(set(raw))  # models numbered 0.. in order of use, every one serving a location
    table = tuple(used.index(m) for m in raw)
    manifest = _stand_in(table)
    jobs = location_jobs(manifest, workers, force)
    assert sorted(loc for _, locs in jobs for loc in locs) == list(range(len(table)))
    assert all(table[loc] == model for model, locs in jobs for loc in locs)
    sizes = [len(g) for g in manifest.groups]
    even = -(-len(table) // workers)
    per_location = force if force is not None else workers > 1 and lpt_makespan(sizes, workers) > even
    if per_location:
        assert [locs for _, locs in jobs] == [(loc,) for loc in range(len(table))]
    else:  # one call per model, largest first, its locations in order
        assert sorted(model for model, _ in jobs) == list(range(len(sizes)))
        assert [len(locs) for _, locs in jobs] == sorted(sizes, reverse=True)
        assert all(locs == manifest.groups[model] for model, locs in jobs)


@pytest.mark.parametrize(
    ("table", "workers", "per_location"),
    [
        ((0, 1, 2, 3), 2, False),  # one model per location: the same calls either way
        ((0, 0, 1, 1), 2, False),  # equal groups load two workers evenly: batched
        ((0, 0, 0, 0), 2, True),  # one model on two workers: per location
        ((0, 1, 0, 0), 2, True),  # 3 + 1 locations: per location
        ((0, 1, 0, 0), 1, False),  # no workers: batched
        ((0, 0, 0, 0), 1, False),
    ],
)
def test_the_rule_on_small_tables(table: tuple[int, ...], workers: int, per_location: bool) -> None:
    jobs = location_jobs(_stand_in(table), workers)
    assert all(len(locs) == 1 for _, locs in jobs) == (per_location or max(table) == len(table) - 1)
    assert (len(jobs) == len(table)) == (per_location or max(table) == len(table) - 1)


@pytest.mark.parametrize("table", TABLES)
def test_run_locations_gives_the_same_maps_per_location_or_per_model(tmp_path: Path, table: tuple[int, ...]) -> None:
    mode = "all_to_one" if max(table) == 0 else "cluster"
    manifest = read_manifest(make_shared_model_bundle(tmp_path / "b", table, mode))
    n, (h, w) = 3, manifest.map_size
    rng = np.random.default_rng(0)
    tiles = rng.random((len(table), n, 3, h, w), dtype=np.float32)
    gains = np.array([2.0, -1.5, 0.5])
    calls: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def run_one(index: int, block: np.ndarray) -> list[np.ndarray]:
        with lock:
            calls.append((index, block.shape[0], threading.current_thread().name))
        return [(block.mean(axis=1, keepdims=True) * gains[index]).astype(np.float32)]

    expected = np.stack([tiles[loc].mean(axis=1) * gains[m] for loc, m in enumerate(table)]).astype(np.float32)
    with ThreadPoolExecutor(2, thread_name_prefix="w") as pool:
        for force, want in ((True, [n] * len(table)), (False, [len(g) * n for g in manifest.groups])):
            calls.clear()
            maps, scores = run_locations(manifest, tiles, run_one, pool, None, location_jobs(manifest, 2, force))
            np.testing.assert_array_equal(maps, expected)
            assert scores is None
            assert sorted(size for _, size, _ in calls) == sorted(want)
            assert {name for _, _, name in calls} <= {f"w_{i}" for i in range(2)}
    calls.clear()
    maps, _ = run_locations(manifest, tiles, run_one, None, None)  # no jobs given: one batched call per model
    np.testing.assert_array_equal(maps, expected)
    assert [(m, size) for m, size, _ in calls] == [(m, len(g) * n) for m, g in enumerate(manifest.groups)]
    with pytest.raises(BundleError, match="every location once"):
        run_locations(manifest, tiles, run_one, None, None, [(table[0], (0,))])
    wrong = ((table[0] + 1, (0,)), *((table[loc], (loc,)) for loc in range(1, len(table))))
    with pytest.raises(BundleError, match="each with its own model"):
        run_locations(manifest, tiles, run_one, None, None, wrong)


class _Recording:
    """An ONNX Runtime session whose ``run`` calls are recorded (model index, tiles per call)."""

    def __init__(self, session: Any, index: int, log: list[tuple[int, int]]) -> None:
        self._session, self._index, self._log = session, index, log

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self._log.append((self._index, next(iter(feeds.values())).shape[0]))
        return self._session.run(names, feeds)


def test_onnxruntime_calls_per_location_by_default_and_per_model_on_request(tmp_path: Path) -> None:
    bundle = make_shared_model_bundle(tmp_path / "b", (0, 0, 0, 0), "all_to_one")
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with runtime.Predictor(bundle, backend="onnxruntime", threads=2) as p:
        # Workers are sized by locations: the one model of all_to_one runs on both workers.
        assert p.location_workers == 2
        backend: Any = p._backend
        log: list[tuple[int, int]] = []
        backend._sessions = [_Recording(s, i, log) for i, s in enumerate(backend._sessions)]
        per_location = p.location_maps(images)
        assert log == [(0, 2)] * 4
        assert backend.batch_per_model is False
        backend.batch_per_model = True
        log.clear()
        per_model = p.location_maps(images)
        assert log == [(0, 8)]
        backend.batch_per_model = False
        log.clear()
        p.location_maps(images)
        assert log == [(0, 2)] * 4
    np.testing.assert_allclose(per_location, per_model, rtol=1e-6, atol=1e-6)


def test_default_location_workers_count_locations(tmp_path: Path) -> None:
    bundle = make_shared_model_bundle(tmp_path / "b", (0, 0, 0, 0), "all_to_one")
    with runtime.Predictor(bundle, backend="onnxruntime") as p:
        assert p.location_workers == min(4, os.cpu_count() or 1)
    with runtime.Predictor(bundle, backend="onnxruntime", threads=1) as p:
        assert p.location_workers == 1


def test_openvino_gives_a_shared_model_a_stream_per_worker(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    table = (0, 1, 0, 0)  # m0 serves three locations, m1 one
    bundle = make_shared_model_bundle(tmp_path / "b", table, "cluster")
    for workers, want in ((2, [2, 1]), (1, [1, 1])):
        with runtime.Predictor(bundle, backend="openvino", threads=2, location_workers=workers) as p:
            backend: Any = p._backend
            streams = [int(loc.compiled.get_property("NUM_STREAMS")) for loc in backend._locations]
            assert streams == want
            threads = [int(loc.compiled.get_property("INFERENCE_NUM_THREADS")) for loc in backend._locations]
            assert threads == ([2, 1] if workers == 2 else [2, 2])
