"""Shared detector map helpers (stage alignment, map blur) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead.trainer.maps import align_stage, blur_map, gaussian_kernel1d, map_size


def _numpy_align(feat: np.ndarray, layer_stride: int, stride: int, size: tuple[int, int], mode: str) -> np.ndarray:
    """Average-pool (partial windows averaged over their pixels), nearest / bilinear upsample, crop or zero-pad."""
    n, c, fh, fw = feat.shape
    if layer_stride < stride:
        k = stride // layer_stride
        oh, ow = -(-fh // k), -(-fw // k)
        out = np.zeros((n, c, oh, ow))
        for i in range(oh):
            for j in range(ow):
                out[..., i, j] = feat[..., i * k : (i + 1) * k, j * k : (j + 1) * k].mean(axis=(-2, -1))
        feat = out
    elif layer_stride > stride:
        f = layer_stride // stride
        feat = feat.repeat(f, axis=-2).repeat(f, axis=-1) if mode == "nearest" else ref.resize(feat, fh * f, fw * f)
    h, w = size
    out = np.zeros((n, c, h, w))
    hh, ww = min(h, feat.shape[-2]), min(w, feat.shape[-1])
    out[..., :hh, :ww] = feat[..., :hh, :ww]
    return out


@settings(max_examples=40, deadline=None)
@given(
    tile=st.tuples(st.integers(16, 80), st.integers(16, 80)),
    layer_stride=st.sampled_from([2, 4, 8, 16, 32]),
    stride=st.sampled_from([4, 8, 16]),
    mode=st.sampled_from(["nearest", "bilinear"]),
    seed=st.integers(0, 2**16),
)
def test_align_stage_matches_numpy(tile: tuple[int, int], layer_stride: int, stride: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fh, fw = -(-tile[0] // layer_stride), -(-tile[1] // layer_stride)
    feat = rng.normal(size=(2, 3, fh, fw)).astype(np.float32)
    size = map_size(tile, stride)
    got = align_stage(torch.from_numpy(feat), layer_stride, stride, size, upsample=mode).numpy()  # type: ignore[arg-type]
    assert got.shape == (2, 3, *size)
    np.testing.assert_allclose(got, _numpy_align(feat, layer_stride, stride, size, mode), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 20, 31), (1, 1, 5, 40)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_map_matches_the_reference_gaussian(shape: tuple[int, int, int, int], sigma: float) -> None:
    maps = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = blur_map(torch.from_numpy(maps), gaussian_kernel1d(sigma)).numpy()
    radius = int(4 * sigma + 0.5)
    if min(shape[-2:]) > radius:
        np.testing.assert_allclose(got[:, 0], ref.gaussian_blur(maps[:, 0], sigma), atol=1e-5)
    else:  # maps smaller than the radius: replicate padding, still a normalized blur
        assert got.shape == shape
        assert got.min() >= maps.min() - 1e-5
        assert got.max() <= maps.max() + 1e-5
