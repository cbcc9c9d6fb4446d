"""Seam smoothing against SciPy's Gaussian and the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GridCase, grids

from tilead.runtime import SeamSmoothing, TileGrid, get_num_threads, set_num_threads, smooth_seams

ndimage = pytest.importorskip("scipy.ndimage")


def grid_of(case: GridCase) -> TileGrid:
    return TileGrid(case.image, case.tile, case.stride, case.edge)


def scipy_seams(maps: np.ndarray, case: GridCase, sigma: float, width: float) -> np.ndarray:
    """Independent oracle: SciPy's Gaussian on the whole map, band pixels replaced.

    truncate=4 gives radius int(4*sigma+0.5); 'mirror' is reflect without repeating the edge.
    """
    blurred = np.stack(
        [ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="mirror", truncate=4.0) for m in maps]
    )
    band = ref.band_mask(case.image, case.tile, case.stride, case.edge, width)
    return np.where(band[None], blurred, maps)


@st.composite
def seam_cases(draw: st.DrawFn) -> tuple[GridCase, np.ndarray, float, float]:
    case = draw(grids(max_size=64))
    canvas = grid_of(case).canvas_size
    n = draw(st.integers(1, 2))
    sigma = draw(st.floats(0.3, 6.0))
    width = draw(st.sampled_from([0.05, 0.1, 0.25, 0.5]))
    seed = draw(st.integers(0, 2**32 - 1))
    maps = np.random.default_rng(seed).random((n, *canvas), dtype=np.float32)
    return case, maps, sigma, width


@given(seam_cases())
def test_seam_smoothing_matches_scipy_gaussian(args: tuple[GridCase, np.ndarray, float, float]) -> None:
    case, maps, sigma, width = args
    got = smooth_seams(maps, grid_of(case), SeamSmoothing(sigma, width))
    np.testing.assert_allclose(got, scipy_seams(maps, case, sigma, width), rtol=1e-5, atol=1e-6)


@given(seam_cases())
def test_seam_smoothing_matches_numpy_reference(args: tuple[GridCase, np.ndarray, float, float]) -> None:
    case, maps, sigma, width = args
    got = smooth_seams(maps, grid_of(case), SeamSmoothing(sigma, width))
    want = ref.smooth_seams(maps, case.image, case.tile, case.stride, case.edge, sigma, width)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_band_pixels_change_and_bands_follow_anomalib_rule() -> None:
    # 2x2 non-overlapping tiles of 32: one seam at 32 on each axis; band
    # half-width int(32 * 0.25) = 8 -> rows/cols 24..39 are band.
    grid = TileGrid(64, 32)
    maps = np.random.default_rng(3).random((1, 64, 64), dtype=np.float32)
    got = smooth_seams(maps, grid, SeamSmoothing(sigma=2.0, width=0.25))
    changed = got != maps
    band = np.zeros((64, 64), dtype=bool)
    band[24:40, :] = True
    band[:, 24:40] = True
    assert not changed[0][~band].any()
    assert changed[0][band].mean() > 0.99  # random data: every band pixel moves


def test_inplace_and_copy_agree() -> None:
    grid = TileGrid(48, 16, 12)
    maps = np.random.default_rng(4).random((2, 48, 48), dtype=np.float32)
    copy = smooth_seams(maps, grid, SeamSmoothing())
    assert copy is not maps
    same = smooth_seams(maps, grid, SeamSmoothing(), inplace=True)
    assert same is maps
    np.testing.assert_array_equal(copy, maps)


@pytest.mark.parametrize("seam", [SeamSmoothing(sigma=0.0), SeamSmoothing(width=0.0)])
def test_disabled_smoothing_changes_nothing(seam: SeamSmoothing) -> None:
    grid = TileGrid(64, 32)
    maps = np.random.default_rng(5).random((1, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(smooth_seams(maps, grid, seam), maps)


def test_single_tile_has_no_seams() -> None:
    grid = TileGrid(40, 40)
    maps = np.random.default_rng(6).random((1, 40, 40), dtype=np.float32)
    np.testing.assert_array_equal(smooth_seams(maps, grid, SeamSmoothing()), maps)


def test_two_dimensional_map_is_accepted() -> None:
    grid = TileGrid(64, 32)
    maps = np.random.default_rng(7).random((64, 64), dtype=np.float32)
    np.testing.assert_array_equal(
        smooth_seams(maps, grid, SeamSmoothing()), smooth_seams(maps[None], grid, SeamSmoothing())[0]
    )


@settings(max_examples=40, deadline=None)
@given(grids(max_size=200), st.floats(0.3, 8.0), st.sampled_from([0.05, 0.1, 0.3]), st.integers(0, 2**32 - 1))
def test_any_thread_count_gives_the_same_bits(case: GridCase, sigma: float, width: float, seed: int) -> None:
    """Row ranges split unevenly over 2, 3 or 5 threads (and runs ending mid-block) change no bit."""
    grid = grid_of(case)
    maps = np.random.default_rng(seed).random((2, *grid.canvas_size), dtype=np.float32)
    before = get_num_threads()
    try:
        set_num_threads(1)
        one = smooth_seams(maps, grid, SeamSmoothing(sigma, width))
        for threads in (2, 3, 5):
            set_num_threads(threads)
            np.testing.assert_array_equal(smooth_seams(maps, grid, SeamSmoothing(sigma, width)), one)
    finally:
        set_num_threads(before)
    np.testing.assert_allclose(one, scipy_seams(maps, case, sigma, width), rtol=1e-5, atol=1e-6)
