"""The runtime pipeline on real MVTec AD bottle images against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import BOTTLE

from tilead.runtime import Preprocessing, SeamSmoothing, TileGrid, merge_maps, normalize_maps, tile_images

cv2 = pytest.importorskip("cv2")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BOTTLE.exists(), reason=f"real data not found at {BOTTLE}"),
]


def bottle_images(n: int) -> np.ndarray:
    paths = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:n]
    return np.stack([cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths])


@pytest.mark.parametrize(
    ("tile", "stride", "edge", "weights"),
    [
        (450, 450, "shift", "uniform"),
        (448, 384, "shift", "feather"),
        (448, 448, "pad", "uniform"),
        (400, 320, "resize", "feather"),
    ],
)
def test_pipeline_matches_reference_on_bottle_images(tile: int, stride: int, edge: str, weights: str) -> None:
    images = bottle_images(3)
    assert images.shape[1:] == (900, 900, 3)
    grid = TileGrid(900, tile, stride, edge=edge)
    prep = Preprocessing()
    tiles = tile_images(images, grid, prep, input_order="BGR")
    # A deterministic "model": channel-mean of 8x8-pooled tiles, at output stride 8.
    locations, n, c, th, tw = tiles.shape
    h, w = th // 8, tw // 8
    maps = tiles[:, :, :, : h * 8, : w * 8].reshape(locations, n, c, h, 8, w, 8).mean(axis=(2, 4, 6)).astype(np.float32)
    seam = SeamSmoothing(sigma=4.0, width=0.1)
    got = merge_maps(maps, grid, weights=weights, seam=seam)  # type: ignore[arg-type]

    want = ref.untile(maps, grid.image_size, grid.tile_size, grid.stride, edge, weights)
    want = ref.smooth_seams(want, grid.image_size, grid.tile_size, grid.stride, edge, seam.sigma, seam.width)
    want = ref.canvas_to_image(want, grid.image_size, edge)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    result = normalize_maps(
        got, pixel_threshold=0.0, image_threshold=0.5, pixel_range=(-2.0, 2.0), image_range=(-2.0, 2.0)
    )
    norm, mask, raw, scores = ref.normalize(want, 0.0, 0.5, (-2.0, 2.0), (-2.0, 2.0))
    np.testing.assert_allclose(result.maps, norm, atol=1e-4)
    np.testing.assert_allclose(result.raw_scores, raw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.scores, scores, atol=1e-4)
    assert (result.masks != mask).mean() < 1e-4
