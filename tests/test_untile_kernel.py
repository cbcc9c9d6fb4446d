"""Untile kernel against the NumPy reference, and the constant round trip."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import GridCase, grids

from tilead.runtime import Preprocessing, TileGrid, tile_images, untile_maps


def grid_of(case: GridCase) -> TileGrid:
    return TileGrid(case.image, case.tile, case.stride, case.edge)


@st.composite
def untile_cases(draw: st.DrawFn) -> tuple[GridCase, np.ndarray, str]:
    case = draw(grids(max_size=48))
    n = draw(st.integers(1, 3))
    # Model output resolution: from heavily downsampled to larger than the tile.
    mh = draw(st.integers(1, max(1, case.tile[0] + 3)))
    mw = draw(st.integers(1, max(1, case.tile[1] + 3)))
    seed = draw(st.integers(0, 2**32 - 1))
    locations = grid_of(case).num_locations
    maps = np.random.default_rng(seed).standard_normal((locations, n, mh, mw)).astype(np.float32)
    weights = draw(st.sampled_from(["uniform", "feather"]))
    return case, maps, weights


@given(untile_cases())
def test_untile_matches_reference(args: tuple[GridCase, np.ndarray, str]) -> None:
    case, maps, weights = args
    got = untile_maps(maps, grid_of(case), weights=weights)  # type: ignore[arg-type]
    want = ref.untile(maps, case.image, case.tile, case.stride, case.edge, weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(untile_cases())
def test_untile_with_per_location_normalization(args: tuple[GridCase, np.ndarray, str]) -> None:
    case, maps, weights = args
    rng = np.random.default_rng(maps.size)
    locations = (int(maps.shape[0]),)
    lo = rng.uniform(-2, 0, locations)
    hi = lo + rng.uniform(0.5, 3, locations)
    t = rng.uniform(-1, 1, locations)
    got = untile_maps(maps, grid_of(case), weights=weights, tile_stats=(t, lo, hi))  # type: ignore[arg-type]
    want = ref.untile(maps, case.image, case.tile, case.stride, case.edge, weights, (t, lo, hi))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(grids(max_size=64), st.sampled_from(["uniform", "feather"]), st.integers(0, 255), st.integers(1, 8))
def test_tile_then_untile_of_a_constant_is_the_constant(case: GridCase, weights: str, value: int, factor: int) -> None:
    grid = grid_of(case)
    if case.edge == "pad":
        # Padding is black, so a subsampled map would blend black into the
        # image region; at full tile resolution every image pixel keeps its value.
        factor = 1
    image = np.full((*case.image, 3), value, dtype=np.uint8)
    prep = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tiles = tile_images(image, grid, prep, input_order="RGB")
    # Use channel 0, subsampled like a model's output stride, as the anomaly map.
    maps = np.ascontiguousarray(tiles[:, :, 0, ::factor, ::factor])
    merged = grid.canvas_to_image(untile_maps(maps, grid, weights=weights))  # type: ignore[arg-type]
    assert merged.shape == (1, *case.image)
    # float32 sums over up to tile^2 overlapping tiles (stride 1): a few ulp per term.
    np.testing.assert_allclose(merged, value / 255.0, rtol=2e-5, atol=1e-6)


def test_five_dimensional_single_channel_maps_are_accepted() -> None:
    grid = TileGrid(32, 16, 8)
    maps = np.random.default_rng(1).random((grid.num_locations, 2, 1, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(untile_maps(maps, grid), untile_maps(maps[:, :, 0].copy(), grid))


def test_feather_weights_cross_fade_linearly_across_an_overlap() -> None:
    # Two tiles of 8 overlapping by 4 on a 12-wide image; the left tile is 0,
    # the right tile is 1: feathering gives a linear ramp over the overlap.
    grid = TileGrid((1, 12), (1, 8), (1, 4))
    maps = np.zeros((2, 1, 1, 8), dtype=np.float32)
    maps[1] = 1.0
    row = untile_maps(maps, grid, weights="feather")[0, 0]
    np.testing.assert_allclose(row[:4], 0.0)
    np.testing.assert_allclose(row[4:8], [0.125, 0.375, 0.625, 0.875], rtol=1e-6)
    np.testing.assert_allclose(row[8:], 1.0)
    uniform = untile_maps(maps, grid, weights="uniform")[0, 0]
    np.testing.assert_allclose(uniform[4:8], 0.5)


def test_upsampling_matches_torch_interpolate() -> None:
    torch = pytest.importorskip("torch")
    grid = TileGrid(64, 64)
    maps = np.random.default_rng(2).random((1, 2, 8, 8), dtype=np.float32)
    got = untile_maps(maps, grid)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(maps[0][:, None]), size=(64, 64), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(got, want[:, 0].numpy(), rtol=1e-6, atol=1e-6)


@given(untile_cases(), st.data())
def test_nonfinite_values_survive_per_location_normalization(
    args: tuple[GridCase, np.ndarray, str], data: st.DataObject
) -> None:
    """Stage ``tile`` must not clamp an infinity into a plausible 0 or 1 (issue #16): it stays NaN."""
    case, maps, weights = args
    locations, n, mh, mw = maps.shape
    # Upsampling reads every map pixel; downsampling skips some (a skipped value cannot show, and
    # postprocess_maps checks every location's map before merging for that reason).
    assume(mh <= case.tile[0] and mw <= case.tile[1])
    loc = data.draw(st.integers(0, locations - 1))
    img = data.draw(st.integers(0, n - 1))
    y, x = data.draw(st.integers(0, mh - 1)), data.draw(st.integers(0, mw - 1))
    maps[loc, img, y, x] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    stats = (np.zeros(locations), np.full(locations, -1.0), np.full(locations, 1.0))
    grid = grid_of(case)
    got = untile_maps(maps, grid, weights=weights, tile_stats=stats)  # type: ignore[arg-type]
    y0, x0, y1, x1 = grid.boxes()[loc]
    assert np.isnan(got[img, y0:y1, x0:x1]).any()  # the poisoned tile shows it where it lies
    clean = [i for i in range(n) if i != img]
    assert np.isfinite(got[clean]).all()
    want = ref.untile(maps[:, clean], case.image, case.tile, case.stride, case.edge, weights, stats)
    np.testing.assert_allclose(got[clean], want, rtol=1e-5, atol=1e-5)
