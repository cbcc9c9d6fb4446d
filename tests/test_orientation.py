"""Oriented shared models (issue #20, ``grid.assignment: {mode: cluster, orient: true}``).

The 8 square symmetries against a written-out NumPy reference, their round trip (property), the
oriented clustering, the table file, the manifest's ``transform`` entries, the runtime's batching
with a model that is not symmetric, and the eager wrapper against the runtime's transforms.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_assignment import _shared_manifest, _train_shared

from tilead.runtime import orientation
from tilead.runtime.backends.base import location_jobs, run_locations
from tilead.runtime.bundle import BundleError, parse_manifest
from tilead.trainer.assignment import (
    Assignment,
    AssignmentError,
    load_assignment,
    oriented_cluster_assignment,
    resolve_assignment,
    save_assignment,
)
from tilead.trainer.checkpoints import Oriented, orient_tiles, unorient_maps
from tilead.trainer.detectors.base import LocationModel

# NumPy reference, written out for a 3x3 array: rotations counter-clockwise, the left-right mirror before them.
REFERENCE = [
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
    [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
    [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
    [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    [[2, 1, 0], [5, 4, 3], [8, 7, 6]],
    [[0, 3, 6], [1, 4, 7], [2, 5, 8]],
    [[6, 7, 8], [3, 4, 5], [0, 1, 2]],
    [[8, 5, 2], [7, 4, 1], [6, 3, 0]],
]


def test_the_eight_transforms_match_the_reference() -> None:
    x = np.arange(9).reshape(3, 3)
    for t, ref in enumerate(REFERENCE):
        np.testing.assert_array_equal(orientation.apply(x, t), ref, err_msg=f"t={t}")
        np.testing.assert_array_equal(orient_tiles(torch.from_numpy(x), t).numpy(), ref, err_msg=f"torch t={t}")
    assert orientation.allowed(4, 4) == tuple(range(8))
    assert orientation.allowed(4, 6) == (0, 2, 4, 6)
    for t in orientation.allowed(2, 3):  # the shape-keeping ones keep a non-square shape
        assert orientation.apply(np.zeros((2, 3)), t).shape == (2, 3)


def test_bad_transforms_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"transform index in \[0, 8\), got 8"):
        orientation.apply(np.zeros((2, 2)), 8)
    with pytest.raises(ValueError, match=r"quarter turn\) needs square tiles, got \(2, 3\)"):
        orientation.invert(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        orientation.apply(np.zeros(3), 0)


square = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(1, 5)).map(lambda s: (s[0], s[1], s[1])),
    elements=st.floats(-10, 10, width=32),
)


@settings(max_examples=60, deadline=None)
@given(x=square, t=st.integers(0, 7), u=st.integers(0, 7))
def test_transforms_round_trip_and_form_a_group(x: np.ndarray, t: int, u: int) -> None:
    np.testing.assert_array_equal(orientation.invert(orientation.apply(x, t), t), x)
    np.testing.assert_array_equal(orientation.apply(orientation.invert(x, t), t), x)
    np.testing.assert_array_equal(unorient_maps(orient_tiles(torch.from_numpy(x), t), t).numpy(), x)
    # Closed under composition: some single transform does what t then u does (on a generic array).
    generic = np.arange(16.0).reshape(4, 4)
    both = orientation.apply(orientation.apply(generic, t), u)
    assert sum(np.array_equal(both, orientation.apply(generic, v)) for v in range(8)) == 1


def _mirror_tiles() -> np.ndarray:
    """Six locations: 0-2 are one pattern under three transforms, 3-5 another; every mean tile 1 x 8 x 8."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 8, 8))
    return np.stack(
        [a, orientation.apply(a, 4), orientation.apply(a, 3), b, orientation.apply(b, 2), orientation.apply(b, 6)]
    )


def test_oriented_clustering_groups_mirror_images_with_the_aligning_transforms() -> None:
    means = _mirror_tiles()
    table = oriented_cluster_assignment(means, 2)
    assert table.groups == ((0, 1, 2), (3, 4, 5))
    for group in table.groups:
        medoid = [loc for loc in group if table.transform(loc) == 0]
        assert medoid  # the medoid keeps its tiles as cut
        for loc in group:  # every location, transformed, is its medoid's pattern
            np.testing.assert_allclose(orientation.apply(means[loc], table.transform(loc)), means[medoid[0]])
    # k = locations: every location alone, as cut; k = 1: one model, still aligned where it can be.
    assert oriented_cluster_assignment(means, 6).transforms == (0,) * 6
    assert oriented_cluster_assignment(means, 1).num_models == 1
    # Non-square tiles: only the shape-keeping transforms.
    wide = np.random.default_rng(1).normal(size=(5, 1, 4, 6))
    assert set(oriented_cluster_assignment(wide, 2).transforms) <= set(orientation.SHAPE_KEEPING)
    with pytest.raises(AssignmentError, match=r"7 clusters for 6 locations"):
        oriented_cluster_assignment(means, 7)
    with pytest.raises(AssignmentError, match=r"expected mean tiles \(locations, C, h, w\)"):
        oriented_cluster_assignment(means[:, 0], 2)


def test_oriented_table_file_round_trip_and_checks(tmp_path: Path) -> None:
    from tilead.runtime import TileGrid

    table = Assignment("cluster", (0, 0, 1, 1), ("m0", "m1"), (0, 4, 0, 2))
    save_assignment(tmp_path, table)
    assert load_assignment(tmp_path, 4) == table
    assert json.loads((tmp_path / "assignment.json").read_text())["transforms"] == [0, 4, 0, 2]
    grid = TileGrid((16, 16), 8)
    assert resolve_assignment("cluster", 2, 0, grid, tmp_path, orient=True) == table
    with pytest.raises(AssignmentError, match=r"holds a 'cluster' \(orient\) table, the config asks for 'cluster'$"):
        resolve_assignment("cluster", 2, 0, grid, tmp_path)
    for bad in ([0, 4, 0], [0, 4, 0, 8], [0, 4, 0, True]):
        (tmp_path / "assignment.json").write_text(json.dumps({**table.to_dict(), "transforms": bad}))
        with pytest.raises(AssignmentError, match=r"transforms: expected 4 orientation indices in \[0, 8\)"):
            load_assignment(tmp_path, 4)
    plain = Assignment("neighbourhood", (0, 0, 1, 1), ("m0", "m1"))
    assert "transforms" not in plain.to_dict()
    assert plain.transform(3) == 0


def test_manifest_transforms_are_validated(tmp_path: Path) -> None:
    good = _shared_manifest(tmp_path)
    for loc, t in zip(good["locations"], (0, 4, 1, 7), strict=True):
        loc["transform"] = t
    parsed = parse_manifest(good)
    assert parsed.location_transform == (0, 4, 1, 7)
    assert parsed.transform(2) == 1
    assert parse_manifest(_shared_manifest(tmp_path / "plain")).location_transform == ()

    def bad(edit: Any, match: str) -> None:
        data = copy.deepcopy(good)
        edit(data)
        with pytest.raises(BundleError, match=match):
            parse_manifest(data)

    bad(lambda d: d["locations"][1].update(transform=8), r"locations\[1\]\.transform: expected one of \[0, 1,")
    bad(lambda d: d["locations"][1].update(transform="4"), r"locations\[1\]\.transform")
    bad(lambda d: d["locations"][1].pop("transform"), "a transform on some locations only")
    bad(lambda d: d.update(assignment="neighbourhood"), "only assignment 'cluster' orients locations")


class _Corner:
    """A model that is not symmetric: each tile's map is its first channel's top-left corner, times a gain."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.calls: list[int] = []

    def __call__(self, index: int, batch: np.ndarray) -> list[np.ndarray]:
        self.calls.append(len(batch))
        return [batch[:, :1, : self.h, : self.w] * (index + 1.0)]


def test_runtime_turns_each_location_before_its_model_and_back(tmp_path: Path) -> None:
    data = _shared_manifest(tmp_path)  # 2x2 grid, tiles 40 x 40, maps 5 x 5; m0: r0c0 + r1c1, m1: r0c1 + r1c0
    turns = (3, 4, 0, 6)
    for loc, t in zip(data["locations"], turns, strict=True):
        loc["transform"] = t
    manifest = parse_manifest(data)
    tiles = np.random.default_rng(2).normal(size=(4, 3, 3, 40, 40)).astype(np.float32)
    model = _Corner(5, 5)
    maps, scores = run_locations(manifest, tiles, model, None, None)
    assert scores is None
    assert model.calls == [6, 6]  # one batched call per model: 2 locations x 3 images
    for loc, (m, t) in enumerate(zip(manifest.location_model, turns, strict=True)):
        want = orientation.invert(orientation.apply(tiles[loc], t)[:, 0, :5, :5] * (m + 1.0), t)
        np.testing.assert_array_equal(maps[loc], want, err_msg=f"location {loc}")
    model.calls.clear()  # one call per location (a CPU's location workers): each turned on its own, the same maps
    again, _ = run_locations(manifest, tiles, model, None, None, location_jobs(manifest, 2, per_location=True))
    assert model.calls == [3, 3, 3, 3]
    np.testing.assert_array_equal(again, maps)


class _Asymmetric(LocationModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x[:, :1], dim=-1)[..., ::8, ::8]


def test_eager_wrapper_matches_the_runtime_transforms() -> None:
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32))
    inner = _Asymmetric()
    for t in range(8):
        got = Oriented(inner, t)(x).numpy()
        want = orientation.invert(
            inner(torch.from_numpy(np.ascontiguousarray(orientation.apply(x.numpy(), t)))).numpy(), t
        )
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        if t:
            assert not np.allclose(got, inner(x).numpy())  # the model is not symmetric: the transform matters
        score = Oriented(inner, t).forward_with_score(x)[1]
        assert score.shape == (2,)


@pytest.mark.integration
def test_oriented_cluster_trains_exports_and_predicts_like_the_eager_ensemble(tmp_path: Path) -> None:
    from tilead import runtime
    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.data import discover
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.inference import location_maps
    from tilead.trainer.run import Run

    run = _train_shared(tmp_path, {"mode": "cluster", "k": 2, "orient": True})
    table = json.loads((run / "assignment.json").read_text())
    assert len(table["transforms"]) == 4
    opened = Run.open(run)
    cfg, grid = opened.config, opened.grid
    bundle = export_bundle(run, tmp_path / "bundle", progress=False).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [loc["transform"] for loc in manifest["locations"]] == table["transforms"]
    samples = list(discover(cfg.data).test)
    eager, _, kept = location_maps(cfg, opened.models(), samples, grid, opened.preprocessing, batch_size=4)
    images = np.concatenate([b.images for b in ImageLoader(cfg.data).iter_batches(kept, 4)])
    with runtime.Predictor(bundle) as p:
        assert p.manifest.location_transform == tuple(table["transforms"])
        got = p.location_maps(images, input_order=cfg.data.channel_order)
    span = float(eager.max() - eager.min())
    assert np.abs(got - eager).max() <= 1e-4 * span
    with pytest.raises(
        ValueError, match="layout shared_backbone: not implemented for runs whose locations are oriented"
    ):
        export_bundle(run, tmp_path / "b2", progress=False, layout="shared_backbone")
