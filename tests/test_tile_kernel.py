"""Tile kernel against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st
from strategies import GridCase, grids

from tilead import _kernels
from tilead.runtime import EDGE_POLICIES, Preprocessing, TileGrid, tile_images


def grid_of(case: GridCase) -> TileGrid:
    return TileGrid(case.image, case.tile, case.stride, case.edge)


@st.composite
def tile_cases(draw: st.DrawFn) -> tuple[GridCase, int, int, int, str, str, np.ndarray]:
    case = draw(grids(max_size=40))
    n = draw(st.integers(1, 3))
    in_c = draw(st.sampled_from([1, 3]))
    out_c = 3 if in_c == 3 else draw(st.sampled_from([1, 3]))
    in_order = draw(st.sampled_from(["BGR", "RGB"]))
    model_order = draw(st.sampled_from(["BGR", "RGB"]))
    seed = draw(st.integers(0, 2**32 - 1))
    images = np.random.default_rng(seed).integers(0, 256, (n, *case.image, in_c), dtype=np.uint8)
    return case, n, in_c, out_c, in_order, model_order, images


@given(tile_cases())
def test_tile_matches_reference(args: tuple[GridCase, int, int, int, str, str, np.ndarray]) -> None:
    case, _n, in_c, out_c, in_order, model_order, images = args
    mean = [0.485, 0.456, 0.406][:out_c]
    std = [0.229, 0.224, 0.225][:out_c]
    prep = Preprocessing(tuple(mean), tuple(std), out_c, model_order)  # type: ignore[arg-type]
    got = tile_images(images, grid_of(case), prep, input_order=in_order)  # type: ignore[arg-type]
    swap = in_c == 3 and in_order != model_order
    want = ref.tile(images, case.tile, case.stride, case.edge, mean, std, out_c, swap)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@given(tile_cases())
def test_fp16_tiles_are_the_rounded_fp32_tiles(
    args: tuple[GridCase, int, int, int, str, str, np.ndarray],
) -> None:
    case, _n, _in_c, out_c, in_order, model_order, images = args
    base = Preprocessing(channels=out_c, mean=(0.5,) * out_c, std=(0.25,) * out_c, color_order=model_order)  # type: ignore[arg-type]
    half = Preprocessing(
        channels=out_c,
        mean=(0.5,) * out_c,
        std=(0.25,) * out_c,
        color_order=model_order,  # type: ignore[arg-type]
        dtype="float16",
    )
    grid = grid_of(case)
    f32 = tile_images(images, grid, base, input_order=in_order)  # type: ignore[arg-type]
    f16 = tile_images(images, grid, half, input_order=in_order)  # type: ignore[arg-type]
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16.view(np.uint16), f32.astype(np.float16).view(np.uint16))


def test_fp16_conversion_rounds_like_numpy_over_the_whole_range() -> None:
    # Every uint8 value times scales from 1e-10 (subnormals, zero) to 1e6
    # (overflow to inf), both signs: the kernel's float->half must equal
    # NumPy's round-to-nearest-even conversion bit for bit.
    grid = TileGrid((1, 256), (1, 256))
    images = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1)
    for scale in (1e-10, 3e-8, 1e-7, 6.1e-5 / 255, 1e-3, 0.37, 1.0, 255.5, 300.0, 1e6):
        for bias in (0.0, -0.001, 65504.0, -65519.0):
            out32 = np.empty((1, 1, 1, 1, 256), np.float32)
            out16 = np.empty((1, 1, 1, 1, 256), np.float16)
            _kernels.tile_images(images, grid.native, out32, [scale], [bias])
            _kernels.tile_images(images, grid.native, out16, [scale], [bias])
            with np.errstate(over="ignore"):  # overflow to inf is the expected rounding
                want = out32.astype(np.float16)
            np.testing.assert_array_equal(out16.view(np.uint16), want.view(np.uint16))
    out32 = np.empty((1, 1, 1, 1, 256), np.float32)
    out16 = np.empty((1, 1, 1, 1, 256), np.float16)
    for special in (np.inf, -np.inf, np.nan):
        _kernels.tile_images(images, grid.native, out32, [0.0], [special])
        _kernels.tile_images(images, grid.native, out16, [0.0], [special])
        np.testing.assert_array_equal(out16, out32.astype(np.float16))


def test_gray_image_feeds_three_channel_model() -> None:
    grid = TileGrid(8, 4)
    img = np.full((8, 8), 128, dtype=np.uint8)
    prep = Preprocessing()
    tiles = tile_images(img, grid, prep, input_order="GRAY")
    for c in range(3):
        np.testing.assert_allclose(tiles[:, 0, c], (128 / 255 - prep.mean[c]) / prep.std[c], rtol=1e-6)


def test_bgr_input_is_swapped_for_rgb_model() -> None:
    grid = TileGrid(4, 4)
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[..., 0] = 10  # blue in BGR
    img[..., 2] = 200  # red in BGR
    prep = Preprocessing(mean=(0, 0, 0), std=(1, 1, 1))
    rgb_model = tile_images(img, grid, prep, input_order="BGR")
    assert np.allclose(rgb_model[0, 0, 0], 200 / 255)  # model channel 0 is red
    assert np.allclose(rgb_model[0, 0, 2], 10 / 255)
    same_order = tile_images(img, grid, prep, input_order="RGB")
    assert np.allclose(same_order[0, 0, 0], 10 / 255)


def test_pad_policy_fills_with_normalized_black() -> None:
    grid = TileGrid(10, 8, 8, edge="pad")  # canvas 16
    img = np.full((10, 10, 3), 255, dtype=np.uint8)
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tiles = tile_images(img, grid, prep, input_order="RGB")
    last = tiles[grid.location_index(1, 1), 0, 0]
    assert np.allclose(last[:2, :2], 1.0)  # image pixels (rows/cols 8..9)
    assert np.allclose(last[2:, :], -1.0)  # padding
    assert np.allclose(last[:, 2:], -1.0)


def test_writes_into_caller_buffer(device: str) -> None:
    grid = TileGrid(32, 16, 8)
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    buf = np.full((grid.num_locations, 2, 3, 16, 16), np.nan, dtype=np.float32)
    result = tile_images(img, grid, out=buf, device=device)
    assert result is buf
    assert np.isfinite(buf).all()
    np.testing.assert_allclose(buf, tile_images(img, grid), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("edge", EDGE_POLICIES)
def test_real_bottle_image_tiles(edge: str) -> None:
    cv2 = pytest.importorskip("cv2")
    from conftest import BOTTLE

    path = BOTTLE / "train" / "good" / "000.png"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img.shape == (900, 900, 3)
    grid = TileGrid(900, 448, 384, edge=edge)
    prep = Preprocessing()
    got = tile_images(img, grid, prep, input_order="BGR")
    want = ref.tile(img[None], grid.tile_size, grid.stride, edge, list(prep.mean), list(prep.std), 3, True)
    # resize: source coordinates are float32 (as in PyTorch); near x = 900 their
    # spacing is 6e-5 px, i.e. up to 0.015 grey levels, 3e-4 after normalization.
    atol = 5e-4 if edge == "resize" else 2e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_simd_and_portable_paths_are_bit_identical(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    out = Path(str(tmp_path))
    script = (
        "import numpy as np, sys\n"
        "from tilead.runtime import EDGE_POLICIES, Preprocessing, TileGrid, tile_images\n"
        "rng = np.random.default_rng(5)\n"
        "grid = TileGrid((67, 101), (40, 53), (27, 24), edge='pad')\n"
        "rgb = rng.integers(0, 256, (2, 67, 101, 3), dtype=np.uint8)\n"
        "gray = rng.integers(0, 256, (2, 67, 101, 1), dtype=np.uint8)\n"
        "res = {}\n"
        "for dt in ('float32', 'float16'):\n"
        "    res['rgb_' + dt] = tile_images(rgb, grid, Preprocessing(dtype=dt), input_order='BGR')\n"
        "    res['gray3_' + dt] = tile_images(gray, grid, Preprocessing(dtype=dt))\n"
        "    one = Preprocessing(mean=(0.4,), std=(0.3,), channels=1, dtype=dt)\n"
        "    res['gray1_' + dt] = tile_images(gray, grid, one)\n"
        "np.savez(sys.argv[1], **res)\n"
    )
    import os

    for name, disable in (("simd", "0"), ("portable", "1")):
        env = dict(os.environ, TILEAD_DISABLE_SIMD=disable)
        subprocess.run([sys.executable, "-c", script, str(out / f"{name}.npz")], check=True, env=env, timeout=120)
    simd = np.load(out / "simd.npz")
    portable = np.load(out / "portable.npz")
    assert sorted(simd.files) == sorted(portable.files)
    for key in simd.files:
        np.testing.assert_array_equal(simd[key], portable[key], err_msg=key)
