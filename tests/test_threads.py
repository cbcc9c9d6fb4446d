"""Thread count does not change results, and concurrent calls give the serial results."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tilead.runtime import (
    SeamSmoothing,
    TileGrid,
    get_num_threads,
    merge_maps,
    normalize_maps,
    set_num_threads,
    tile_images,
)

GRID = TileGrid((256, 320), 96, 80, edge="pad")


def pipeline(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tiles = tile_images(images, GRID)
    maps = np.ascontiguousarray(tiles[:, :, 1, ::8, ::8])
    merged = merge_maps(maps, GRID, weights="feather", seam=SeamSmoothing(sigma=3.0, width=0.2))
    res = normalize_maps(merged, pixel_threshold=0.1, image_threshold=0.2, pixel_range=(-2, 2), image_range=(-2, 2))
    return tiles, res.maps, res.scores


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = get_num_threads()
    yield
    set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_results_do_not_depend_on_thread_count() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 256, 320, 3), dtype=np.uint8)
    set_num_threads(1)
    one = pipeline(images)
    set_num_threads(4)
    assert get_num_threads() == 4
    four = pipeline(images)
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a, b)
    set_num_threads(0)
    assert get_num_threads() >= 1


def test_concurrent_calls_give_the_serial_results() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (2, 256, 320, 3), dtype=np.uint8) for _ in range(8)]
    serial = [pipeline(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(pipeline, batches * 3))
    for i, got in enumerate(concurrent):
        for a, b in zip(got, serial[i % len(batches)], strict=True):
            np.testing.assert_array_equal(a, b)
