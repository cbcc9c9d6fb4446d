"""TileGrid: validation, serialization and geometric properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from strategies import GridCase, grids

from tilead.runtime import TileGrid, location_name, parse_location


def make(case: GridCase) -> TileGrid:
    return TileGrid(case.image, case.tile, case.stride, case.edge)


@given(grids(max_size=200))
def test_origins_and_canvas_match_reference(case: GridCase) -> None:
    grid = make(case)
    oy, ch = ref.axis_origins(case.image[0], case.tile[0], case.stride[0], case.edge)
    ox, cw = ref.axis_origins(case.image[1], case.tile[1], case.stride[1], case.edge)
    assert grid.origins_y == tuple(oy)
    assert grid.origins_x == tuple(ox)
    assert grid.canvas_size == (ch, cw)
    assert (grid.rows, grid.cols) == (len(oy), len(ox))


@given(grids(max_size=120))
def test_boxes_cover_every_canvas_pixel_and_stay_inside(case: GridCase) -> None:
    grid = make(case)
    ch, cw = grid.canvas_size
    count = np.zeros((ch, cw), dtype=np.int32)
    for y0, x0, y1, x1 in grid.boxes():
        assert 0 <= y0 < y1 <= ch
        assert 0 <= x0 < x1 <= cw
        assert (y1 - y0, x1 - x0) == grid.tile_size
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1
    if grid.edge == "shift":
        assert grid.canvas_size == grid.image_size
    else:
        assert ch >= grid.image_size[0]
        assert cw >= grid.image_size[1]
        # The padded or resized canvas is the smallest grid span covering the image.
        assert ch - grid.stride[0] < grid.image_size[0] or grid.rows == 1
        assert cw - grid.stride[1] < grid.image_size[1] or grid.cols == 1


@given(grids(max_size=120))
def test_origins_start_at_zero_increase_and_last_tile_reaches_the_edge(case: GridCase) -> None:
    grid = make(case)
    for origins, tile, canvas, stride in (
        (grid.origins_y, grid.tile_size[0], grid.canvas_size[0], grid.stride[0]),
        (grid.origins_x, grid.tile_size[1], grid.canvas_size[1], grid.stride[1]),
    ):
        assert origins[0] == 0
        assert all(b > a for a, b in itertools.pairwise(origins))
        assert all(b - a <= stride for a, b in itertools.pairwise(origins))
        assert origins[-1] + tile == canvas


@given(grids(max_size=200))
def test_dict_round_trip(case: GridCase) -> None:
    grid = make(case)
    again = TileGrid.from_dict(grid.to_dict())
    assert again == grid
    assert hash(again) == hash(grid)
    assert again.boxes() == grid.boxes()


def test_known_grid_for_the_bottle_images() -> None:
    grid = TileGrid(900, 448)
    assert grid.origins_y == (0, 448, 452)
    assert grid.location_names() == ["r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2", "r2c0", "r2c1", "r2c2"]
    assert grid.box(2, 1) == (452, 448, 900, 896)
    padded = TileGrid(900, 448, edge="pad")
    assert padded.origins_y == (0, 448, 896)
    assert padded.canvas_size == (1344, 1344)
    assert TileGrid((900, 600), (450, 300)).num_locations == 4


def test_location_names_round_trip() -> None:
    assert location_name(3, 12) == "r3c12"
    assert parse_location("r3c12") == (3, 12)
    for bad in ("r3", "c1r2", "r-1c0", 7):
        with pytest.raises(ValueError, match="expected 'r<row>c<col>'"):
            parse_location(bad)  # type: ignore[arg-type]


def test_location_index_outside_grid() -> None:
    grid = TileGrid(64, 32)
    assert grid.location_index(1, 1) == 3
    with pytest.raises(ValueError, match=r"outside the grid of 2 rows x 2 cols"):
        grid.location_index(2, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"image_size": 64, "tile_size": 32, "stride": 48},
            r"height stride \(48\) must not exceed the tile height \(32\)",
        ),
        ({"image_size": 64, "tile_size": 65}, r"tile height \(65\) must not exceed the image height \(64\)"),
        (
            {"image_size": (64, 30), "tile_size": 32},
            r"tile width \(32\) must not exceed the image width \(30\)",
        ),
        ({"image_size": 0, "tile_size": 32}, r"image_size: expected an integer >= 1, got 0"),
        ({"image_size": 64, "tile_size": 0}, r"tile_size: expected an integer >= 1, got 0"),
        ({"image_size": 64, "tile_size": 32, "stride": 0}, r"stride: expected an integer >= 1, got 0"),
        ({"image_size": 64.0, "tile_size": 32}, r"image_size: expected an integer >= 1, got 64.0"),
        ({"image_size": 64, "tile_size": 32.5}, r"tile_size: expected an integer >= 1, got 32.5"),
        ({"image_size": 64, "tile_size": True}, r"tile_size: expected an integer >= 1, got True"),
        (
            {"image_size": (64, 64, 3), "tile_size": 32},
            r"image_size: expected an integer or a pair .* got 3 values",
        ),
        ({"image_size": "64", "tile_size": 32}, r"image_size: expected an integer or a pair"),
        (
            {"image_size": 64, "tile_size": 32, "edge": "wrap"},
            r"edge: expected one of shift, pad, resize, got 'wrap'",
        ),
    ],
)
def test_invalid_grids_raise_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TileGrid(**kwargs)  # type: ignore[arg-type]


def test_numpy_integers_are_accepted() -> None:
    grid = TileGrid(np.int64(64), (np.int32(32), 16))
    assert grid.tile_size == (32, 16)
    assert isinstance(grid.tile_size[0], int)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image_size": 64, "tile_size": 32}, r"missing keys \['stride'\]"),
        ({"image_size": 64, "tile_size": 32, "stride": 32, "overlap": 0}, r"unknown keys \['overlap'\]"),
        ([64, 32, 32], r"expected a mapping"),
    ],
)
def test_from_dict_rejects_bad_data(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TileGrid.from_dict(data)  # type: ignore[arg-type]
