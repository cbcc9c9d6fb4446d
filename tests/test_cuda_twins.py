"""CUDA twins against CPU twins (GPU only), and the build's CUDA status.

Where no GPU is visible the comparisons are skipped, not faked; CI still
checks that the CUDA sources were compiled (TILEAD_EXPECT_CUDA=1).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tilead import _kernels
from tilead.runtime import (
    EDGE_POLICIES,
    Preprocessing,
    SeamSmoothing,
    TileGrid,
    cuda_status,
    normalize_maps,
    resize_maps,
    smooth_seams,
    tile_images,
    untile_maps,
)

STATUS = cuda_status()
needs_gpu = pytest.mark.skipif(not STATUS.usable, reason=f"no usable CUDA device: {STATUS.error or 'not built'}")


def test_cuda_build_status_is_reported() -> None:
    assert isinstance(STATUS.built, bool)
    if os.environ.get("TILEAD_EXPECT_CUDA") == "1":
        assert STATUS.built, "CI compiled with TILEAD_CUDA=ON, but the module has no CUDA kernels"
        archs = STATUS.architectures.split(",")
        for arch in ("75", "80", "86", "87", "89", "90"):
            assert any(a.startswith(arch) for a in archs), f"sm_{arch} missing from {archs}"
    if STATUS.built and not STATUS.usable:
        # A CUDA build on a GPU-less machine must explain itself, not crash.
        assert STATUS.device_count == 0
        assert STATUS.error


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("edge", EDGE_POLICIES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tile_cuda_matches_cpu(edge: str, dtype: str) -> None:
    grid = TileGrid((300, 410), (128, 96), (100, 90), edge=edge)
    images = np.random.default_rng(0).integers(0, 256, (3, 300, 410, 3), dtype=np.uint8)
    prep = Preprocessing(dtype=dtype)  # type: ignore[arg-type]
    cpu = tile_images(images, grid, prep)
    gpu = tile_images(images, grid, prep, device="cuda")
    if dtype == "float32":
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
        return
    # FP16 tiles: nvcc contracts x * scale + bias into one fused multiply-add (one rounding), the CPU twin rounds
    # twice, so the float32 values may differ in their last bit, and that can move the FP16 result by one step.
    # Allowed: one FP16 step (the spacing at each CPU value), nothing more.
    step = np.spacing(np.abs(cpu)).astype(np.float32)
    diff = np.abs(gpu.astype(np.float32) - cpu.astype(np.float32))
    assert np.all(diff <= step), float(np.max(diff / step))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("weights", ["uniform", "feather"])
def test_untile_smooth_normalize_resize_cuda_match_cpu(weights: str) -> None:
    grid = TileGrid((300, 410), (128, 96), (100, 90))
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((grid.num_locations, 2, 16, 12)).astype(np.float32)
    stats = (
        rng.uniform(-1, 1, grid.num_locations),
        np.full(grid.num_locations, -2.0),
        np.full(grid.num_locations, 2.0),
    )
    for tile_stats in (None, stats):
        cpu = untile_maps(maps, grid, weights=weights, tile_stats=tile_stats)  # type: ignore[arg-type]
        gpu = untile_maps(maps, grid, weights=weights, tile_stats=tile_stats, device="cuda")  # type: ignore[arg-type]
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
    canvas = untile_maps(maps, grid, weights=weights)  # type: ignore[arg-type]
    seam = SeamSmoothing(sigma=3.0, width=0.2)
    np.testing.assert_allclose(
        smooth_seams(canvas, grid, seam, device="cuda"),
        smooth_seams(canvas, grid, seam),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        resize_maps(canvas, (111, 517), device="cuda"), resize_maps(canvas, (111, 517)), rtol=1e-5, atol=1e-5
    )
    kw = {
        "pixel_threshold": 0.1,
        "image_threshold": 0.3,
        "pixel_range": (-2.0, 2.0),
        "image_range": (-1.0, 3.0),
    }
    a = normalize_maps(canvas, device="cuda", **kw)  # type: ignore[arg-type]
    b = normalize_maps(canvas, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.raw_scores, b.raw_scores)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ranges", [None, ((-2.0, 2.0), (-1.0, 3.0))])
def test_normalize_cuda_follows_the_nonfinite_rule_like_cpu(ranges: tuple[tuple[float, float], ...] | None) -> None:
    maps = np.random.default_rng(2).standard_normal((4, 257, 1031)).astype(np.float32)
    maps[1, 256, 1030] = np.nan
    maps[2, 0, 0] = np.inf
    maps[3, 100, 7] = -np.inf
    pr, ir = ranges if ranges is not None else (None, None)
    kw = {"pixel_threshold": 0.1, "image_threshold": 0.3, "pixel_range": pr, "image_range": ir}
    a = normalize_maps(maps, device="cuda", **kw)  # type: ignore[arg-type]
    b = normalize_maps(maps, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.raw_scores, b.raw_scores)  # NaN for images 1-3 on both
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.labels[1:].all()
    assert not np.isnan(a.raw_scores[0])


def test_cuda_namespace_has_the_same_entry_points_as_cpu() -> None:
    for name in ("tile_images", "untile_maps", "smooth_seams", "resize_maps", "normalize_maps", "fuse_thumbnail"):
        cpu_doc = getattr(_kernels, name).__doc__
        cuda_doc = getattr(_kernels.cuda, name).__doc__
        assert cpu_doc == cuda_doc  # same pybind11 signature line and description


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_fuse_thumbnail_cuda_matches_cpu(weighted: bool) -> None:
    """The TensorRT pipeline's thumbnail fusion: products and sums rounded one by one on both twins, so bit-equal."""
    rng = np.random.default_rng(3)
    thumb = rng.normal(0, 2, (3, 17, 13)).astype(np.float32)
    maps = rng.normal(0, 2, (3, 300, 410)).astype(np.float32)
    maps[1, 5, 7] = np.nan
    thumb[2, 0, 0] = np.inf
    spec = _kernels.FuseSpec(0.3, 0.7, -0.2, 0.25, weighted, 0.4 if weighted else 0.0)
    cpu, gpu = maps.copy(), maps.copy()
    _kernels.fuse_thumbnail(thumb, cpu, spec)
    _kernels.cuda.fuse_thumbnail(thumb, gpu, spec)
    np.testing.assert_array_equal(gpu, cpu)
