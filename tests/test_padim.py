"""PaDiM statistics and distance maps against a direct NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tilead.trainer.detectors.padim.model import (
    PadimAccumulator,
    PadimHead,
    channel_subset,
    state_nbytes,
    state_tensors,
)
from tilead.trainer.maps import check_strides, gaussian_kernel1d, map_size


def _numpy_fit(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """x: (n, d, P). Per position mean (P, d) and inv(cov + eps I) (P, d, d), float64."""
    _, d, p = x.shape
    means = x.mean(axis=0).T
    invs = np.empty((p, d, d))
    for i in range(p):
        cov = np.cov(x[:, :, i], rowvar=False) + eps * np.eye(d)
        invs[i] = np.linalg.inv(cov)
    return means, invs


@given(
    n=st.integers(2, 12),
    d=st.integers(1, 6),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
    batch=st.integers(1, 5),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_accumulator_matches_numpy(n: int, d: int, h: int, w: int, batch: int, offset: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d, h, w)) + offset  # a large common offset tests the centring
    acc = PadimAccumulator(h * w, d)
    for i in range(0, n, batch):
        acc.update(torch.from_numpy(x[i : i + batch]).float())
    mean, inv = acc.finalize(0.01)
    ref_mean, ref_inv = _numpy_fit(x.astype(np.float32).astype(np.float64).reshape(n, d, h * w), 0.01)
    assert acc.count == n
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-4 * (1 + abs(offset)))
    np.testing.assert_allclose(inv.numpy(), ref_inv, rtol=2e-3, atol=2e-3)


def test_accumulator_errors() -> None:
    acc = PadimAccumulator(4, 3)
    with pytest.raises(ValueError, match="expected"):
        acc.update(torch.zeros(2, 5, 2, 2))
    acc.update(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize(0.01)


def test_head_is_mahalanobis_distance() -> None:
    rng = np.random.default_rng(1)
    n, d, h, w = 3, 4, 2, 5
    mean = rng.normal(size=(h * w, d)).astype(np.float32)
    a = rng.normal(size=(h * w, d, d))
    inv = (a @ a.transpose(0, 2, 1) + np.eye(d)).astype(np.float32)
    emb = rng.normal(size=(n, d, h, w)).astype(np.float32)
    head = PadimHead(torch.from_numpy(mean), torch.from_numpy(inv), (h, w), blur_sigma=0.0)
    out = head(torch.from_numpy(emb)).numpy()
    assert out.shape == (n, 1, h, w)
    for k in range(n):
        for p in range(h * w):
            diff = emb[k, :, p // w, p % w].astype(np.float64) - mean[p]
            expected = np.sqrt(diff @ inv[p].astype(np.float64) @ diff)
            assert out[k, 0, p // w, p % w] == pytest.approx(expected, rel=1e-4)


def test_head_blur_matches_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    h, w, d = 12, 9, 1
    mean = np.zeros((h * w, d), np.float32)
    inv = np.ones((h * w, d, d), np.float32)
    emb = np.abs(rng.normal(size=(1, d, h, w))).astype(np.float32)  # distance = |x| = x
    head = PadimHead(torch.from_numpy(mean), torch.from_numpy(inv), (h, w), blur_sigma=1.0)
    out = head(torch.from_numpy(emb)).numpy()[0, 0]
    # Reflect padding without repeating the edge = scipy's "mirror"; radius int(4 sigma + 0.5) = 4.
    expected = gaussian_filter(emb[0, 0].astype(np.float64), sigma=1.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_gaussian_kernel_is_normalized_and_symmetric() -> None:
    k = gaussian_kernel1d(1.5).numpy()
    assert k.shape == (2 * int(4 * 1.5 + 0.5) + 1,)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(k, k[::-1])


def test_channel_subset_is_seeded_sorted_and_checked() -> None:
    a = channel_subset(176, 100, seed=0)
    b = channel_subset(176, 100, seed=0)
    c = channel_subset(176, 100, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) == 100
    assert a.tolist() == sorted(a.tolist())
    assert int(a.max()) < 176
    with pytest.raises(ValueError, match=r"n_features: expected 1\.\.176"):
        channel_subset(176, 200, seed=0)


def test_map_size_and_strides() -> None:
    assert map_size((464, 464), 8) == (58, 58)
    assert map_size((450, 451), 4) == (113, 113)
    check_strides((4, 8, 16), 8)
    with pytest.raises(ValueError, match="feature_stride"):
        check_strides((4, 12), 8)


def test_state_storage_dtype_and_size() -> None:
    mean = torch.zeros(10, 3)
    inv = torch.eye(3).expand(10, 3, 3).clone()
    idx = torch.arange(3)
    half = state_tensors(mean, inv, idx, "float16")
    full = state_tensors(mean, inv, idx, "float32")
    assert half["inv_cov"].dtype == torch.float16
    assert full["inv_cov"].dtype == torch.float32
    assert state_nbytes(half) == 10 * 3 * 4 + 10 * 9 * 2 + 3 * 8
    assert state_nbytes(full) == 10 * 3 * 4 + 10 * 9 * 4 + 3 * 8


def test_accumulator_finalizes_in_chunks_across_positions() -> None:
    rng = np.random.default_rng(3)
    n, d, h, w = 6, 3, 20, 15  # 300 positions: more than one finalize chunk
    x = rng.normal(size=(n, d, h, w)).astype(np.float32)
    acc = PadimAccumulator(h * w, d)
    acc.update(torch.from_numpy(x))
    mean, inv = acc.finalize(0.1)
    ref_mean, ref_inv = _numpy_fit(x.astype(np.float64).reshape(n, d, h * w), 0.1)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv.numpy(), ref_inv, rtol=1e-4, atol=1e-4)
