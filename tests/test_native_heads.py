"""Native PaDiM heads (#21): the C++ Mahalanobis kernel against a NumPy oracle, the head file, the blur.

The oracle computes ``(x - mean)^T A (x - mean)`` per position in float64 from the full fp16 matrix;
every dispatch path this CPU runs (``tilead._kernels.mahalanobis_paths()``) is compared with it, for the
lane layout the runtime uses (``_kernels.mahalanobis``) and the previous row layout kept to measure against
(``_kernels.mahalanobis_rows``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead import _kernels
from tilead.runtime.native_heads import (
    LANES,
    LaneHead,
    NativeHead,
    blur_maps,
    blur_matrices,
    from_lanes,
    lane_distances,
    native_file,
    pack_upper,
    squared_distances,
    to_lanes,
)
from tilead.trainer.detectors.padim.model import BlockRowPadimHead
from tilead.trainer.maps import blur_map, gaussian_kernel1d

PATHS = _kernels.mahalanobis_paths()


def oracle(features: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray) -> np.ndarray:
    """float64 ``(n, P)``: ``d^T A d`` with ``d = features[k, :, p] - mean[p]``, ``A = inv_cov[p]`` (full matrix)."""
    diff = features.astype(np.float64).transpose(2, 0, 1) - mean.astype(np.float64)[:, None, :]  # (P, n, d)
    out: np.ndarray = np.einsum("pki,pij,pkj->kp", diff, inv_cov.astype(np.float64), diff)
    return out


def _gaussians(rng: np.random.Generator, p: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a symmetric positive definite fp16 inverse covariance per position."""
    mean = rng.standard_normal((p, d)).astype(np.float32)
    g = rng.standard_normal((p, d, d)) / np.sqrt(d)
    inv_cov = (g @ g.transpose(0, 2, 1) + 0.1 * np.eye(d)).astype(np.float16)
    return mean, np.ascontiguousarray(inv_cov)


def test_scalar_is_always_a_path_and_auto_is_the_best() -> None:
    assert PATHS[0] == "scalar"
    assert set(PATHS) <= {"scalar", "avx2", "avx512"}
    rng = np.random.default_rng(0)
    mean, inv_cov = _gaussians(rng, 5, 20)
    x = rng.standard_normal((2, 20, 5)).astype(np.float32)
    packed = pack_upper(inv_cov)
    np.testing.assert_array_equal(squared_distances(x, mean, packed), squared_distances(x, mean, packed, PATHS[-1]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 130),
    p=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_every_path_matches_the_oracle(n: int, d: int, p: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    mean, inv_cov = _gaussians(rng, p, d)
    x = (mean.T[None] + scale * rng.standard_normal((n, d, p))).astype(np.float32)
    want = oracle(x, mean, inv_cov)
    packed = pack_upper(inv_cov)
    first = None
    for path in PATHS:
        got = squared_distances(x, mean, packed, path)
        assert got.shape == (n, p)
        assert got.dtype == np.float32
        # fp32 accumulation of d (d + 1) / 2 terms against float64: relative to the magnitude of the terms.
        bound = 1e-5 * np.sqrt(d) * (np.abs(want).max() + 1e-30) + 1e-30
        assert np.abs(got - want).max() <= bound * 10, (path, np.abs(got - want).max(), bound)
        # the lane layout's paths compute the same per lane (fma chains in one order): the same bits
        first = got if first is None else first
        np.testing.assert_array_equal(got, first, err_msg=path)
        rows = np.empty((n, p), np.float32)
        _kernels.mahalanobis_rows(x, mean, packed, rows, path)
        assert np.abs(rows - want).max() <= bound * 10, ("rows", path, np.abs(rows - want).max(), bound)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_the_packed_triangle_is_exact_for_symmetric_fp16_matrices(d: int, seed: int) -> None:
    """Doubling an fp16 value is exact: the packed rows hold A_ii and 2 A_ij unrounded."""
    rng = np.random.default_rng(seed)
    _, inv_cov = _gaussians(rng, 3, d)
    packed = pack_upper(inv_cov)
    rows, cols = np.triu_indices(d)
    a = inv_cov.astype(np.float64)
    expect = np.where(rows == cols, a[:, rows, cols], 2 * a[:, rows, cols])
    np.testing.assert_array_equal(packed.astype(np.float64), expect)


def test_an_asymmetric_matrix_uses_its_symmetric_part() -> None:
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((4, 6)).astype(np.float32)
    a = rng.standard_normal((4, 6, 6)).astype(np.float16)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    got = squared_distances(x, mean, pack_upper(a))
    np.testing.assert_allclose(got, oracle(x, mean, a), rtol=1e-2, atol=1e-2)  # fp16 rounding of A_ij + A_ji


def test_the_last_position_reads_nothing_past_the_array() -> None:
    """The triangle of the last position ends at the array's end: a page-aligned end would fault on a stray load."""
    rng = np.random.default_rng(2)
    for d in (1, 7, 17, 33):
        mean, inv_cov = _gaussians(rng, 1, d)
        tri = d * (d + 1) // 2
        # Put the packed array at the very end of a buffer, followed by NaN halves that must not be read.
        store = np.full(tri + 64, np.nan, dtype=np.float16)
        store[:tri] = pack_upper(inv_cov)[0]
        packed = store[:tri].reshape(1, tri)
        x = rng.standard_normal((2, d, 1)).astype(np.float32)
        for path in PATHS:
            got = squared_distances(x, mean, packed, path)
            assert np.isfinite(got).all(), path
            np.testing.assert_allclose(got, oracle(x, mean, inv_cov), rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_refused_with_what_was_expected() -> None:
    x = np.zeros((2, 4, 6), np.float32)
    mean = np.zeros((6, 4), np.float32)
    packed = np.zeros((6, 10), np.float16)
    out = np.zeros((2, 6), np.float32)
    rows = _kernels.mahalanobis_rows
    with pytest.raises(ValueError, match=r"packed: expected dtype float16"):
        rows(x, mean, packed.astype(np.float32), out)
    with pytest.raises(ValueError, match=r"packed: expected shape \(6, 10\), got \(6, 9\)"):
        rows(x, mean, packed[:, :9].copy(), out)
    with pytest.raises(ValueError, match=r"mean: expected shape \(6, 4\)"):
        rows(x, mean.T.copy(), packed, out)
    with pytest.raises(ValueError, match=r"features: expected 3 dimensions"):
        rows(x[0], mean, packed, out)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 6\)"):
        rows(x, mean, packed, out[:1].copy())
    with pytest.raises(ValueError, match=r"C-contiguous"):
        rows(np.zeros((2, 6, 4), np.float32).transpose(0, 2, 1), mean, packed, out)
    with pytest.raises(ValueError, match=r"path: expected 'auto', 'scalar', 'avx2' or 'avx512', got 'sse'"):
        rows(x, mean, packed, out, "sse")
    lanes_mean, lanes_packed = to_lanes(mean), to_lanes(packed)  # (1, 4, 16), (1, 10, 16)
    with pytest.raises(ValueError, match=r"packed_lanes: expected dtype float16"):
        _kernels.mahalanobis(x, lanes_mean, lanes_packed.astype(np.float32), out)
    with pytest.raises(
        ValueError, match=r"packed_lanes: expected 3 dimensions with shape \(1, 10, 16\), got 2 dimensions"
    ):
        _kernels.mahalanobis(x, lanes_mean, packed, out)  # the row layout where the lanes belong
    with pytest.raises(
        ValueError, match=r"mean_lanes: expected 3 dimensions with shape \(1, 4, 16\), got 2 dimensions"
    ):
        _kernels.mahalanobis(x, mean, lanes_packed, out)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 6\)"):
        _kernels.mahalanobis(x, lanes_mean, lanes_packed, out[:1].copy())
    with pytest.raises(ValueError, match=r"path: expected 'auto', 'scalar', 'avx2' or 'avx512', got 'sse'"):
        _kernels.mahalanobis(x, lanes_mean, lanes_packed, out, "sse")


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 70), k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_the_lane_layout_round_trips_and_pads_with_zeros(p: int, k: int, seed: int) -> None:
    rows = np.random.default_rng(seed).standard_normal((p, k)).astype(np.float16)
    lanes = to_lanes(rows)
    blocks = -(-p // LANES)
    assert lanes.shape == (blocks, k, LANES)
    assert lanes.flags.c_contiguous
    assert lanes.dtype == np.float16
    for q in (0, p // 2, p - 1):
        np.testing.assert_array_equal(lanes[q // LANES, :, q % LANES], rows[q])
    assert not lanes.reshape(blocks, k, LANES)[-1, :, p - (blocks - 1) * LANES :].any()
    np.testing.assert_array_equal(from_lanes(lanes, p), rows)


def test_a_lane_head_refuses_arrays_of_another_layout() -> None:
    rng = np.random.default_rng(5)
    mean, inv_cov = _gaussians(rng, 20, 4)
    head = NativeHead(mean, pack_upper(inv_cov), np.zeros(0, np.float32), (4, 5))
    lanes = head.lanes()
    assert lanes.mean_lanes.shape == (2, 4, LANES)
    assert lanes.packed_lanes.shape == (2, 10, LANES)
    np.testing.assert_array_equal(from_lanes(lanes.packed_lanes, 20), head.packed)
    with pytest.raises(ValueError, match=r"mean_lanes: expected float32 \(2, d, 16\), got \(20, 4\)"):
        LaneHead(mean, lanes.packed_lanes, head.blur, (4, 5))
    with pytest.raises(ValueError, match=r"packed_lanes: expected float16 \(2, 10, 16\), got \(20, 10\)"):
        LaneHead(lanes.mean_lanes, head.packed, head.blur, (4, 5))
    feats = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(lanes(feats), head(feats))
    np.testing.assert_array_equal(
        lane_distances(feats.reshape(2, 4, 20), lanes.mean_lanes, lanes.packed_lanes),
        squared_distances(feats.reshape(2, 4, 20), mean, head.packed),
    )


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(1, 20)),
    sigma=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_blur_maps_is_the_trainers_blur(shape: tuple[int, int, int], sigma: float, seed: int) -> None:
    """Reflect padding, replicate where the map is no larger than the radius (trainer/maps.blur_map)."""
    n, h, w = shape
    maps = np.random.default_rng(seed).random((n, 1, h, w)).astype(np.float32)
    kernel = gaussian_kernel1d(sigma)
    want = blur_map(torch.from_numpy(maps), kernel).numpy()
    np.testing.assert_allclose(blur_maps(maps, kernel.numpy()), want, rtol=1e-5, atol=1e-6)
    matrices = blur_matrices((h, w), kernel.numpy())  # what a LaneHead keeps: the same products
    np.testing.assert_array_equal(blur_maps(maps, kernel.numpy(), matrices), blur_maps(maps, kernel.numpy()))


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_a_native_head_gives_the_export_heads_map(sigma: float, tmp_path: Path) -> None:
    """The file round trip, then the map of the block-row head the exporter traces, for every path."""
    rng = np.random.default_rng(3)
    h, w, d = 7, 9, 24
    mean, inv_cov = _gaussians(rng, h * w, d)
    head = BlockRowPadimHead(torch.from_numpy(mean), torch.from_numpy(inv_cov), (h, w), sigma).eval()
    blur = head.blur.numpy() if sigma > 0 else np.zeros(0, np.float32)
    native = NativeHead(mean, pack_upper(inv_cov), blur, (h, w))
    native.save(tmp_path / "r0c0.padim.npz")
    loaded = NativeHead.from_bytes((tmp_path / "r0c0.padim.npz").read_bytes())
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file
    assert (tmp_path / "r0c0.padim.npz").stat().st_mode & 0o777 == 0o644  # readable like the bundle's other files
    feats = (mean.T.reshape(1, d, h, w) + rng.standard_normal((5, d, h, w))).astype(np.float32)
    with torch.inference_mode():
        want = head(torch.from_numpy(feats)).numpy()
    for path in PATHS:
        got = loaded(feats, path)
        assert got.shape == (5, 1, h, w)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.max()))
    with pytest.raises(ValueError, match=r"features: expected \(n, 24, 7, 9\), got shape \(5, 24, 9, 7\)"):
        loaded(feats.transpose(0, 1, 3, 2))


def test_bad_head_files_are_refused() -> None:
    rng = np.random.default_rng(4)
    mean, inv_cov = _gaussians(rng, 6, 4)
    good = NativeHead(mean, pack_upper(inv_cov), np.zeros(0, np.float32), (2, 3))
    assert NativeHead.from_bytes(good.to_bytes()).size == (2, 3)
    with pytest.raises(ValueError, match=r"not a valid PaDiM head file"):
        NativeHead.from_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"packed: expected float16 \(6, 10\)"):
        NativeHead(mean, pack_upper(inv_cov)[:, :9], np.zeros(0, np.float32), (2, 3))
    with pytest.raises(ValueError, match=r"mean: expected float32 \(9, d\)"):
        NativeHead(mean, pack_upper(inv_cov), np.zeros(0, np.float32), (3, 3))
    bad = pack_upper(inv_cov)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"packed: expected finite values"):
        NativeHead(mean, bad, np.zeros(0, np.float32), (2, 3))
    import io

    buf = io.BytesIO()
    np.savez(buf, mean=mean, packed=pack_upper(inv_cov), blur=np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"expected the arrays"):
        NativeHead.from_bytes(buf.getvalue(), "heads/r0c0.padim.npz")
    assert native_file("heads/r0c1.onnx") == "heads/r0c1.padim.npz"


@pytest.mark.parametrize(("blocks", "sigma"), [(1, 0.0), (4, 4.0), (7, 1.0)])
def test_the_exporters_native_head_and_exact_map_are_the_block_row_heads(blocks: int, sigma: float) -> None:
    """tilead.exporter.bf16.native_head / exact_map from a BlockRowPadimHead's block rows, any block count."""
    from tilead.exporter.bf16 import exact_map, native_head

    rng = np.random.default_rng(6)
    h, w, d = 6, 5, 30
    mean, inv_cov = _gaussians(rng, h * w, d)
    head = BlockRowPadimHead(torch.from_numpy(mean), torch.from_numpy(inv_cov), (h, w), sigma, blocks=blocks).eval()
    native = native_head(head)
    np.testing.assert_array_equal(native.packed, pack_upper(inv_cov))  # the symmetric fp16 matrix, exactly
    feats = (mean.T.reshape(1, d, h, w) + rng.standard_normal((3, d, h, w))).astype(np.float32)
    with torch.inference_mode():
        want = head(torch.from_numpy(feats)).numpy()
    exact = exact_map(feats, head)
    assert exact.dtype == np.float64
    np.testing.assert_allclose(exact, want, rtol=1e-5, atol=1e-5 * float(want.max()))
    np.testing.assert_allclose(native(feats), exact, rtol=1e-5, atol=1e-5 * float(want.max()))


def test_nearly_singular_gaussians_lose_no_more_than_the_block_row_head() -> None:
    """Gaussians fitted on 5 samples (eps 0.01): large terms cancel; every path stays as exact as the graph's form.

    The reference is float64; the block-row head (what the ONNX graph computes, float32) sets the bar. Before
    the kernel kept float64 totals its error was several times the head's on such Gaussians (the 2048² demo
    run's export refused it).
    """
    rng = np.random.default_rng(0)
    p, d = 128, 100
    fit = rng.standard_normal((5, d, p)).astype(np.float32) * 3
    mean = np.ascontiguousarray(fit.mean(0).T)
    centred = fit.astype(np.float64).transpose(2, 0, 1) - mean[:, None, :]  # (P, 5, d)
    cov = np.einsum("psi,psj->pij", centred, centred) / 4 + 0.01 * np.eye(d)
    inv = np.linalg.inv(cov)
    inv16 = np.ascontiguousarray((0.5 * (inv + inv.transpose(0, 2, 1))).astype(np.float16))
    test = (fit[:4] + 0.1 * rng.standard_normal((4, d, p))).astype(np.float32)
    exact = np.sqrt(np.maximum(oracle(test, mean, inv16), 0.0))
    span = float(exact.max() - exact.min())
    head = BlockRowPadimHead(torch.from_numpy(mean), torch.from_numpy(inv16), (p, 1), 0.0).eval()
    with torch.inference_mode():
        graph = head(torch.from_numpy(test.reshape(4, d, p, 1))).numpy().reshape(4, p)
    bar = float(np.abs(graph - exact).max()) / span
    packed = pack_upper(inv16)
    for path in PATHS:
        got = np.sqrt(np.maximum(squared_distances(test, mean, packed, path), 0.0))
        assert float(np.abs(got - exact).max()) / span <= 2 * bar, path


def _nearly_singular_head(
    rng: np.random.Generator, p: int, d: int, sigma: float
) -> tuple[BlockRowPadimHead, np.ndarray]:
    """A head whose Gaussians were fitted on 5 samples (eps 0.01), and test features near those samples."""
    h = p // 4
    fit = (rng.standard_normal((5, d, p)) * 3 + 20).astype(np.float32)  # far from 0: x - mean rounds too
    mean = np.ascontiguousarray(fit.mean(0).T)
    centred = fit.astype(np.float64).transpose(2, 0, 1) - mean[:, None, :]
    cov = np.einsum("psi,psj->pij", centred, centred) / 4 + 0.01 * np.eye(d)
    inv = np.linalg.inv(cov)
    inv16 = np.ascontiguousarray((0.5 * (inv + inv.transpose(0, 2, 1))).astype(np.float16))
    head = BlockRowPadimHead(torch.from_numpy(mean), torch.from_numpy(inv16), (h, 4), sigma).eval()
    test = (fit[:3] + 0.1 * rng.standard_normal((3, d, p))).astype(np.float32).reshape(3, d, h, 4)
    return head, test


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_float32_maps_stay_within_the_rounding_bound_and_a_wrong_packing_does_not(sigma: float) -> None:
    """tilead.exporter.bf16.rounding_bound: every kernel path and the float32 graph fall inside it; a bug does not.

    The export accepts a native head within the bound at every pixel; the bound must hold for correct float32
    arithmetic on nearly singular Gaussians (where the fixed tolerances refused a correct head on one machine)
    and must still refuse a head whose triangle is packed wrongly.
    """
    from tilead.exporter.bf16 import exact_map, native_head, rounding_bound

    head, feats = _nearly_singular_head(np.random.default_rng(1), 64, 100, sigma)
    exact = exact_map(feats, head)
    bound = rounding_bound(feats, head)
    assert bound.shape == exact.shape
    assert (bound >= 0).all()
    span = float(exact.max() - exact.min())
    allowed = bound + 1e-6 * span
    with torch.inference_mode():
        graph = head(torch.from_numpy(feats)).numpy().astype(np.float64)
    assert (np.abs(graph - exact) <= allowed).all()
    native = native_head(head)
    for path in PATHS:
        assert (np.abs(native(feats, path=path).astype(np.float64) - exact) <= allowed).all(), path
    # tight enough to matter: the off-diagonal weights not doubled (a packing bug) move the map past it
    rows, cols = np.triu_indices(100)
    halved = native.packed.copy()
    halved[:, rows != cols] *= np.float16(0.5)
    wrong = NativeHead(native.mean, halved, native.blur, native.size)
    assert (np.abs(wrong(feats).astype(np.float64) - exact) > allowed).any()
