"""Bad input never crashes the process: it raises ValueError naming what was expected and given.

Checked at both layers: the Python wrappers (friendly messages) and the
extension's own boundary (for callers who use tilead._kernels directly).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tilead import _kernels
from tilead.runtime import (
    Preprocessing,
    SeamSmoothing,
    TileGrid,
    normalize_maps,
    resize_maps,
    smooth_seams,
    tile_images,
    untile_maps,
)

GRID = TileGrid(32, 16, 8)  # 3x3 locations
L = GRID.num_locations
IMG = np.zeros((2, 32, 32, 3), dtype=np.uint8)
MAPS = np.zeros((L, 2, 4, 4), dtype=np.float32)
CANVAS = np.zeros((2, 32, 32), dtype=np.float32)


# -- Python wrappers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tile_images(IMG.astype(np.float32), GRID), r"images: expected dtype uint8, got float32"),
        (lambda: tile_images(IMG.astype(np.uint16), GRID), r"images: expected dtype uint8, got uint16"),
        (lambda: tile_images(IMG[None], GRID), r"images: expected 2 or 3 or 4 dimensions, got 5"),
        (lambda: tile_images(IMG[0, 0, 0], GRID), r"images: expected 2 or 3 or 4 dimensions, got 1"),
        (lambda: tile_images(np.zeros((2, 32, 32, 4), np.uint8), GRID), r"expected 1 or 3 channels .* got 4"),
        (
            lambda: tile_images(np.zeros((0, 32, 32, 3), np.uint8), GRID),
            r"expected a non-empty array, got shape \(0, 32, 32, 3\)",
        ),
        (
            lambda: tile_images(np.zeros((2, 30, 32, 3), np.uint8), GRID),
            r"expected height x width 32 x 32 .* got 30 x 32",
        ),
        (lambda: tile_images(IMG[:, :, ::-1], GRID), r"images: expected a C-contiguous array"),
        (
            lambda: tile_images(IMG, GRID, Preprocessing(channels=1, mean=(0.5,), std=(0.5,))),
            r"model takes 1 channel but the images have 3",
        ),
        (
            lambda: tile_images(IMG, GRID, input_order="HSV"),  # type: ignore[arg-type]
            r"input_order: expected 'RGB', 'BGR' or 'GRAY', got 'HSV'",
        ),
        (lambda: tile_images(IMG, GRID, input_order="GRAY"), r"'GRAY' needs 1-channel images, got 3"),
        (
            lambda: tile_images(IMG, GRID, out=np.zeros((L, 2, 3, 16, 15), np.float32)),
            r"out: expected shape \(9, 2, 3, 16, 16\)",
        ),
        (
            lambda: tile_images(IMG, GRID, out=np.zeros((L, 2, 3, 16, 16), np.float64)),
            r"out: expected dtype float32, got float64",
        ),
        (
            lambda: tile_images(IMG, GRID, Preprocessing(dtype="float16"), out=np.zeros((L, 2, 3, 16, 16), np.float32)),
            r"out: expected dtype float16",
        ),
        (lambda: tile_images(IMG, GRID, device="tpu"), r"device: expected one of cpu, cuda, got 'tpu'"),
        (lambda: tile_images([[1, 2]], GRID), r"images: expected a numpy array, got \[\[1, 2\]\]"),  # type: ignore[arg-type]
        (lambda: untile_maps(MAPS.astype(np.float64), GRID), r"maps: expected dtype float32, got float64"),
        (lambda: untile_maps(MAPS[:5], GRID), r"expected 9 locations in dimension 0 \(grid 3x3\), got 5"),
        (lambda: untile_maps(MAPS[0], GRID), r"maps: expected 4 or 5 dimensions, got 3"),
        (lambda: untile_maps(MAPS[:, :, None].repeat(2, axis=2), GRID), r"must have 1 channel"),
        (lambda: untile_maps(MAPS[:, :, :0], GRID), r"expected a non-empty array"),
        (lambda: untile_maps(MAPS[:, :, :, ::2], GRID), r"maps: expected a C-contiguous array"),
        (
            lambda: untile_maps(MAPS, GRID, weights="gaussian"),  # type: ignore[arg-type]
            r"weights: expected 'uniform' or 'feather', got 'gaussian'",
        ),
        (
            lambda: untile_maps(MAPS, GRID, out=np.zeros((2, 32, 31), np.float32)),
            r"out: expected shape \(2, 32, 32\)",
        ),
        (
            lambda: untile_maps(MAPS, GRID, tile_stats=([0.0] * L, [0.0] * L)),  # type: ignore[arg-type]
            r"tile_stats: expected \(thresholds, mins, maxs\)",
        ),
        (
            lambda: untile_maps(MAPS, GRID, tile_stats=([0.0] * 4, [0.0] * 4, [1.0] * 4)),
            r"tile_stats thresholds: expected 9 values",
        ),
        (
            lambda: untile_maps(MAPS, GRID, tile_stats=([0.0] * L, [1.0] * L, [1.0] * L)),
            r"max must exceed min at every location; location 0",
        ),
        (
            lambda: smooth_seams(np.zeros((2, 31, 32), np.float32), GRID, SeamSmoothing()),
            r"maps\[0\]: expected shape \(32, 32\)",
        ),
        (
            lambda: smooth_seams(CANVAS.astype(np.float16), GRID, SeamSmoothing()),
            r"maps: expected dtype float32, got float16",
        ),
        (lambda: SeamSmoothing(sigma=-1.0), r"seam.sigma: expected a number in \[0, 15.8\], got -1"),
        (lambda: SeamSmoothing(sigma=40.0), r"seam.sigma: expected a number in \[0, 15.8\], got 40"),
        (lambda: SeamSmoothing(width=1.5), r"seam.width: expected a number in \[0, 1\], got 1.5"),
        (lambda: SeamSmoothing(sigma=float("nan")), r"seam.sigma: expected a finite number"),
        (lambda: resize_maps(CANVAS, 0), r"size: expected an integer >= 1, got 0"),
        (
            lambda: normalize_maps(CANVAS, pixel_threshold=0.5, image_threshold=0.5, pixel_range=(0, 1)),
            r"give both .* or neither",
        ),
        (
            lambda: normalize_maps(
                CANVAS, pixel_threshold=0.5, image_threshold=0.5, pixel_range=(1, 1), image_range=(0, 1)
            ),
            r"pixel_range: expected min < max, got \(1.0, 1.0\)",
        ),
        (
            lambda: normalize_maps(CANVAS, pixel_threshold="high", image_threshold=0.5),  # type: ignore[arg-type]
            r"pixel_threshold: expected a number, got 'high'",
        ),
        (
            lambda: normalize_maps(CANVAS[None], pixel_threshold=0.5, image_threshold=0.5),
            r"maps: expected 2 or 3 dimensions, got 4",
        ),
        (lambda: Preprocessing(mean=(0.5, 0.5)), r"preprocessing.mean: expected 3 numbers"),
        (
            lambda: Preprocessing(std=(0.5, 0.0, 0.5)),
            r"preprocessing.std\[1\]: expected a number in \[1e-06, 1e\+06\], got 0",
        ),
        (lambda: Preprocessing(channels=2), r"preprocessing.channels: expected 1 or 3, got 2"),
        (lambda: Preprocessing(color_order="RBG"), r"color_order: expected 'RGB' or 'BGR', got 'RBG'"),  # type: ignore[arg-type]
        (lambda: Preprocessing(dtype="int8"), r"dtype: expected 'float32' or 'float16', got 'int8'"),  # type: ignore[arg-type]
        (lambda: Preprocessing.from_dict({"mean": [0, 0, 0], "scale": 2}), r"unknown keys \['scale'\]"),
        (lambda: SeamSmoothing.from_dict({"sigma": 2, "radius": 3}), r"unknown keys \['radius'\]"),
    ],
)
def test_wrappers_reject_bad_input(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_inplace_on_read_only_maps_is_rejected() -> None:
    frozen = CANVAS.copy()
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match=r"maps: expected a writable array, got a read-only one"):
        normalize_maps(frozen, pixel_threshold=0.5, image_threshold=0.5, inplace=True)
    with pytest.raises(ValueError, match=r"maps: expected a writable array"):
        smooth_seams(frozen, GRID, SeamSmoothing(), inplace=True)
    # Without inplace a read-only input is fine.
    assert smooth_seams(frozen, GRID, SeamSmoothing()).flags.writeable


def test_cuda_request_without_gpu_is_one_clear_error() -> None:
    from tilead.runtime import cuda_status

    status = cuda_status()
    if status.usable:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match=r"device='cuda'") as info:
        tile_images(IMG, GRID, device="cuda")
    text = str(info.value)
    assert ("built without CUDA" in text) or ("no CUDA device is usable" in text)
    if status.built:
        assert status.error in text


# -- the extension's own boundary ---------------------------------------------------------------------

NATIVE = GRID.native
NORM_NONE = _kernels.NormSpec(_kernels.NORM_NONE, 0, 0, 0, 0, 0, 0)
TILES = np.zeros((L, 2, 3, 16, 16), dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _kernels.tile_images(IMG[0], NATIVE, TILES, [1, 1, 1], [0, 0, 0]), r"expected 4 dimensions"),
        (
            lambda: _kernels.tile_images(IMG.astype(np.int8), NATIVE, TILES, [1, 1, 1], [0, 0, 0]),
            r"images: expected dtype uint8, got int8",
        ),
        (
            lambda: _kernels.tile_images(IMG[:, :, :, ::-1], NATIVE, TILES, [1, 1, 1], [0, 0, 0]),
            r"images: expected a C-contiguous array",
        ),
        (
            lambda: _kernels.tile_images(IMG, NATIVE, TILES[:, :1], [1, 1, 1], [0, 0, 0]),
            r"out: expected shape \(9, 2, 3, 16, 16\), got \(9, 1, 3, 16, 16\)",
        ),
        (
            lambda: _kernels.tile_images(IMG, NATIVE, TILES.astype(np.float64), [1, 1, 1], [0, 0, 0]),
            r"out: expected dtype float32 or float16, got float64",
        ),
        (lambda: _kernels.tile_images(IMG, NATIVE, TILES, [1, 1], [0, 0]), r"expected 3 values each"),
        (
            lambda: _kernels.tile_images(IMG, NATIVE, np.zeros((L, 2, 1, 16, 16), np.float32), [1], [0]),
            r"3-channel image cannot feed 1 output channel",
        ),
        (
            lambda: _kernels.untile_maps(MAPS, NATIVE, CANVAS, 7),
            r"weights: expected 0 \(uniform\) or 1 \(feather\), got 7",
        ),
        (
            lambda: _kernels.untile_maps(MAPS, NATIVE, MAPS),
            r"out: expected 3 dimensions with shape \(2, 32, 32\), got 4 dimensions",
        ),
        (
            lambda: _kernels.untile_maps(MAPS, NATIVE, CANVAS, 0, np.zeros(L, np.float32), None),
            r"give both or neither",
        ),
        (
            lambda: _kernels.untile_maps(MAPS, NATIVE, CANVAS, 0, np.zeros(3, np.float32), np.zeros(3, np.float32)),
            r"loc_threshold: expected shape \(9,\)",
        ),
        (lambda: _kernels.SeamSpec(2.0, 2.0), r"seam width: expected a number in \[0, 1\], got 2"),
        (lambda: _kernels.SeamSpec(100.0, 0.1), r"seam sigma: expected a number in \[0, 15.8\]"),
        (lambda: _kernels.SeamSpec(float("nan"), 0.1), r"seam sigma: expected"),
        (lambda: _kernels.smooth_seams(CANVAS[0], NATIVE, _kernels.SeamSpec(2.0, 0.1)), r"maps: expected 3 dim"),
        (lambda: _kernels.resize_maps(CANVAS, CANVAS), r"maps and out must not share memory"),
        (
            lambda: _kernels.resize_maps(CANVAS, np.zeros((3, 4, 4), np.float32)),
            r"out: expected shape \(2, 4, 4\)",
        ),
        (
            lambda: _kernels.NormSpec(1, 0, 1, 1, 0, 0, 1),
            r"pixel_max must be greater than pixel_min",
        ),
        (
            lambda: _kernels.normalize_maps(
                CANVAS, CANVAS.copy(), None, np.zeros(3, np.float32), np.zeros(2, np.float32), NORM_NONE
            ),
            r"raw_scores: expected shape \(2,\)",
        ),
        (
            lambda: _kernels.normalize_maps(
                CANVAS,
                CANVAS,
                np.zeros((2, 32, 32), np.bool_),
                np.zeros(2, np.float32),
                np.zeros(2, np.float32),
                NORM_NONE,
            ),
            r"mask: expected dtype uint8, got bool",
        ),
        (
            lambda: _kernels.NormSpec(5, 0, 0, 0, 0, 0, 0),
            r"mode: expected 0 \(none\) or 1",
        ),
        (
            lambda: _kernels.Grid(10, 10, 4, 4, 5, 4, 0),
            r"grid height: stride \(5\) must not exceed the tile \(4\)",
        ),
        (
            lambda: _kernels.Grid(10, 10, 11, 4, 4, 4, 0),
            r"grid height: tile \(11\) must not exceed the image \(10\)",
        ),
        (lambda: _kernels.Grid(10, 0, 4, 4, 4, 4, 0), r"grid width: image, tile and stride must be positive"),
        (
            lambda: _kernels.Grid(10, 10, 4, 4, 4, 4, 3),
            r"grid: edge must be 0 \(shift\), 1 \(pad\) or 2 \(resize\), got 3",
        ),
    ],
)
def test_extension_rejects_bad_input(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_extension_rejects_read_only_output() -> None:
    out = np.zeros_like(TILES)
    out.setflags(write=False)
    with pytest.raises(ValueError, match=r"out: expected a writable array"):
        _kernels.tile_images(IMG, NATIVE, out, [1, 1, 1], [0, 0, 0])


def test_extension_rejects_overlapping_input_and_output() -> None:
    buf = np.zeros(L * 2 * 3 * 16 * 16 * 4, dtype=np.uint8)
    images = buf[: 2 * 32 * 32 * 3].reshape(2, 32, 32, 3)
    out = buf.view(np.float32).reshape(L, 2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images and out must not share memory"):
        _kernels.tile_images(images, NATIVE, out, [1, 1, 1], [0, 0, 0])


def test_empty_batch_is_a_no_op_at_the_extension() -> None:
    # n = 0 is valid at the extension level (early return), rejected by the wrappers.
    out = np.zeros((L, 0, 3, 16, 16), np.float32)
    _kernels.tile_images(np.zeros((0, 32, 32, 3), np.uint8), NATIVE, out, [1, 1, 1], [0, 0, 0])
    maps = np.zeros((L, 0, 4, 4), np.float32)
    _kernels.untile_maps(maps, NATIVE, np.zeros((0, 32, 32), np.float32))
    assert out.shape[1] == 0
