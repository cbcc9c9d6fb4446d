"""The fused CPU post-processing pass (untile + seams + normalization in one pass) against the kernels in turn.

``merge_normalize_maps`` runs the same row code as ``untile_maps``, ``smooth_seams`` and
``normalize_maps``: its outputs must equal theirs bit for bit, for every geometry (edge tiles,
overlaps, tiny images), seam setting, normalization mode, batch size and thread count, and match
the NumPy oracle (``reference.py``) within float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GridCase, grids

from tilead import _kernels
from tilead.runtime import SeamSmoothing, TileGrid
from tilead.runtime.devices import thread_budget
from tilead.runtime.postprocess import (
    FusedPass,
    NormalizedMaps,
    fused_postprocess_available,
    merge_normalize_maps,
    norm_params,
    normalize_maps,
    smooth_seams,
    untile_maps,
)
from tilead.runtime.postprocessor import NormalizationStats, PostProcessor, TileStats
from tilead.runtime.timing import StageTimes


@dataclass(frozen=True)
class Case:
    grid: TileGrid
    geometry: GridCase
    maps: np.ndarray
    weights: str
    seam: SeamSmoothing | None
    minmax: bool
    tile_stats: tuple[Sequence[float], Sequence[float], Sequence[float]] | None


@st.composite
def cases(draw: st.DrawFn, max_size: int = 64) -> Case:
    geometry = draw(grids(max_size=max_size))
    grid = TileGrid(geometry.image, geometry.tile, geometry.stride, geometry.edge)
    n = draw(st.integers(1, 3))
    mh, mw = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    maps = (rng.random((grid.num_locations, n, mh, mw), dtype=np.float32) * 4 - 1).astype(np.float32)
    seam = draw(
        st.one_of(
            st.none(),
            st.builds(
                SeamSmoothing, st.just(0.0) | st.floats(0.3, 6.0), st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 1.0])
            ),
        )
    )
    tile_stats = None
    if draw(st.booleans()):
        lo = rng.uniform(-1, 0, grid.num_locations)
        hi = lo + rng.uniform(0.5, 3, grid.num_locations)
        tile_stats = (rng.uniform(lo, hi).tolist(), lo.tolist(), hi.tolist())
    return Case(
        grid, geometry, maps, draw(st.sampled_from(["uniform", "feather"])), seam, draw(st.booleans()), tile_stats
    )


def params_of(case: Case) -> tuple[float, float, tuple[float, float] | None, tuple[float, float] | None]:
    if case.minmax:
        return 0.4, 0.9, (-1.0, 2.0), (0.0, 2.5)
    return 0.4, 0.9, None, None


def chain(case: Case) -> NormalizedMaps:
    """The kernels in turn: untile, seams, normalization."""
    canvas = untile_maps(case.maps, case.grid, weights=case.weights, tile_stats=case.tile_stats)  # type: ignore[arg-type]
    smooth_seams(canvas, case.grid, case.seam, inplace=True)
    pt, it, pr, ir = params_of(case)
    return normalize_maps(canvas, pixel_threshold=pt, image_threshold=it, pixel_range=pr, image_range=ir)


def fused(case: Case) -> NormalizedMaps:
    return merge_normalize_maps(
        case.maps,
        case.grid,
        norm_params(*params_of(case)),
        weights=case.weights,  # type: ignore[arg-type]
        seam=case.seam,
        tile_stats=case.tile_stats,
    )


def assert_same(got: NormalizedMaps, want: NormalizedMaps) -> None:
    for field in ("maps", "masks", "raw_scores", "scores", "labels"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_fused_pass_equals_the_kernels_in_turn(case: Case) -> None:
    if not fused_postprocess_available(case.grid, "cpu"):
        with pytest.raises(ValueError, match="canvas equal to the image"):
            fused(case)
        return
    assert_same(fused(case), chain(case))


@settings(max_examples=60, deadline=None)
@given(cases(max_size=40))
def test_fused_pass_matches_the_numpy_oracle(case: Case) -> None:
    if not fused_postprocess_available(case.grid, "cpu"):
        return
    g = case.geometry
    stats = None if case.tile_stats is None else tuple(np.asarray(v) for v in case.tile_stats)
    merged = ref.untile(case.maps, g.image, g.tile, g.stride, g.edge, case.weights, stats)  # type: ignore[arg-type]
    if case.seam is not None and case.seam.enabled:
        merged = ref.smooth_seams(merged, g.image, g.tile, g.stride, g.edge, case.seam.sigma, case.seam.width)
    pt, it, pr, ir = params_of(case)
    want_maps, want_masks, want_raw, want_scores = ref.normalize(merged, pt, it, pr, ir)
    got = fused(case)
    # float32 rounding of blends and taps over raw values in [-1, 3]: a few ulps of 4
    np.testing.assert_allclose(got.maps, want_maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.raw_scores, want_raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-5)
    # Masks agree wherever the value is not within rounding of the threshold.
    threshold = 0.5 if pr is not None else pt
    clear = np.abs(want_maps - threshold) > 3e-5
    np.testing.assert_array_equal(got.masks[clear], want_masks[clear])


@settings(max_examples=40, deadline=None)
@given(cases(max_size=48), st.integers(1, 5))
def test_fused_pass_does_not_depend_on_the_thread_count(case: Case, threads: int) -> None:
    if not fused_postprocess_available(case.grid, "cpu"):
        return
    with thread_budget(1):
        one = fused(case)
    with thread_budget(threads):
        assert_same(fused(case), one)


@pytest.mark.parametrize("edge", ["shift", "pad"])
@pytest.mark.parametrize("n", [1, 4])
def test_real_sizes_and_non_finite_values_equal_the_chain(edge: str, n: int) -> None:
    """Bottle-like geometry (900, 2x2 of 464) with NaN and infinity in one location: the non-finite rule holds."""
    grid = TileGrid(900, 464, 436, edge)
    maps = np.random.default_rng(n).random((grid.num_locations, n, 58, 58), dtype=np.float32)
    maps[1, 0, 10:12, 20] = np.nan
    maps[2, n - 1, 3, 3] = np.inf
    geometry = GridCase((900, 900), (464, 464), (436, 436), edge)
    case = Case(grid, geometry, maps, "uniform", SeamSmoothing(2.0, 0.1), True, None)
    if not fused_postprocess_available(grid, "cpu"):
        pytest.skip(f"edge {edge}: the canvas is not the image")
    got = fused(case)
    assert_same(got, chain(case))
    assert np.isnan(got.raw_scores[0])
    assert got.scores[0] == 1.0
    assert got.labels[0]
    assert np.isnan(got.raw_scores[n - 1])


def test_grid_whose_canvas_is_not_the_image_is_refused() -> None:
    grid = TileGrid(100, 48, 48, "pad")
    assert grid.canvas_size != grid.image_size
    assert not fused_postprocess_available(grid, "cpu")
    assert not fused_postprocess_available(TileGrid(96, 48, 48), "cuda")
    maps = np.zeros((grid.num_locations, 1, 6, 6), np.float32)
    with pytest.raises(ValueError, match="canvas equal to the image"):
        merge_normalize_maps(maps, grid, norm_params(0.5, 0.5, None, None))


def test_kernel_checks_its_arrays() -> None:
    grid = TileGrid(64, 32, 32)
    maps = np.zeros((4, 2, 8, 8), np.float32)
    out = np.empty((2, 64, 64), np.float32)
    mask = np.empty((2, 64, 64), np.uint8)
    raw, scores = np.empty(2, np.float32), np.empty(2, np.float32)
    seam, norm = _kernels.SeamSpec(2.0, 0.1), norm_params(0.5, 0.5, None, None)

    def call(**kw: np.ndarray) -> None:
        args: dict[str, np.ndarray] = {"maps": maps, "out": out, "mask": mask, "raw_scores": raw, "scores": scores}
        args.update(kw)
        _kernels.postprocess_maps(
            args["maps"], grid.native, args["out"], args["mask"], args["raw_scores"], args["scores"], 0, None, None,
            seam, norm,
        )  # fmt: skip

    call()
    with pytest.raises(ValueError, match="out: expected shape"):
        call(out=np.empty((2, 64, 63), np.float32))
    with pytest.raises(ValueError, match="mask: expected shape"):
        call(mask=np.empty((1, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="maps: expected dtype float32"):
        call(maps=maps.astype(np.float64))
    with pytest.raises(ValueError, match="raw_scores: expected shape"):
        call(raw_scores=np.empty(3, np.float32))
    with pytest.raises(ValueError, match="must not share memory"):
        call(scores=raw)


def _stats(stage: str, grid: TileGrid) -> NormalizationStats:
    if stage == "none":
        return NormalizationStats("none", 0.4, 0.9)
    if stage == "tile":
        k = grid.num_locations
        tile = TileStats((0.3,) * k, (-1.0,) * k, (2.0,) * k)
        return NormalizationStats("tile", 0.5, 0.6, (0.0, 1.0), (0.0, 1.0), tile)
    return NormalizationStats("image", 0.4, 0.9, (-1.0, 2.0), (0.0, 2.5))


@pytest.mark.parametrize("stage", ["image", "tile", "none"])
@pytest.mark.parametrize("detector_scores", [False, True])
def test_predictor_path_inplace_equals_the_staged_path(stage: str, detector_scores: bool) -> None:
    """``apply(inplace=True)`` (the Predictor's call, fused) returns what the staged path returns."""
    grid = TileGrid((90, 70), (40, 30), (25, 20))
    post = PostProcessor(grid, "feather", SeamSmoothing(1.5, 0.2), _stats(stage, grid))
    rng = np.random.default_rng(3)
    maps = rng.random((grid.num_locations, 3, 9, 7), dtype=np.float32) * 3 - 1
    maps[0, 1, 2, 2] = np.nan
    tile_scores = rng.random((grid.num_locations, 3), dtype=np.float32) if detector_scores else None
    _, want = post.apply(maps, tile_scores=tile_scores)
    timer = StageTimes()
    merged, got = post.apply(maps, tile_scores=tile_scores, inplace=True, timer=timer)
    assert list(timer.seconds) == ["untile", "normalize"]  # the fused pass, then the scores' bookkeeping
    assert merged is got.maps
    assert_same(got, want)
    assert got.errors == want.errors
    assert got.errors is not None
    assert got.errors[1] is not None


@pytest.mark.parametrize("stage", ["image", "tile", "none"])
def test_a_postprocessor_builds_its_fused_pass_once_and_it_equals_a_fresh_one(stage: str) -> None:
    """The Predictor's path reuses one checked :class:`FusedPass`; it computes what a pass built per call does."""
    grid = TileGrid((90, 70), (40, 30), (25, 20))
    post = PostProcessor(grid, "feather", SeamSmoothing(1.5, 0.2), _stats(stage, grid))
    kept = post.fused_pass
    assert kept is not None
    assert post.fused_pass is kept
    maps = np.random.default_rng(5).random((grid.num_locations, 2, 9, 7), dtype=np.float32) * 3 - 1
    stats = post.stats
    assert stats is not None
    tile = stats.tile_stats.as_tuple() if stats.tile_stats is not None else None
    params = norm_params(stats.pixel_threshold, stats.image_threshold, stats.pixel_range, stats.image_range)
    want = merge_normalize_maps(maps, grid, params, weights="feather", seam=SeamSmoothing(1.5, 0.2), tile_stats=tile)
    _, got = post.apply(maps, inplace=True)
    assert_same(got, want)
    assert_same(kept.run(maps), want)


def test_no_fused_pass_without_statistics_or_where_the_canvas_is_not_the_image() -> None:
    assert PostProcessor(TileGrid(96, 48, 48)).fused_pass is None
    padded = TileGrid(100, 48, 48, "pad")
    assert PostProcessor(padded, stats=_stats("image", padded)).fused_pass is None
    with pytest.raises(ValueError, match="canvas equal to the image"):
        FusedPass.build(padded, norm_params(0.5, 0.5, None, None))
    with pytest.raises(ValueError, match="weights: expected 'uniform' or 'feather'"):
        FusedPass.build(TileGrid(96, 48, 48), norm_params(0.5, 0.5, None, None), weights="linear")  # type: ignore[arg-type]
