"""Normalize + threshold + score kernel, and the map resize kernel."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import get_num_threads, normalize_maps, resize_maps, set_num_threads


@st.composite
def map_batches(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 4))
    h = draw(st.integers(1, 300))
    w = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    return (np.random.default_rng(seed).standard_normal((n, h, w)) * 3).astype(np.float32)


@given(map_batches(), st.floats(-2, 2), st.floats(-2, 2), st.floats(0.1, 10), st.floats(0.1, 10))
def test_minmax_normalization_matches_reference(maps: np.ndarray, pt: float, it: float, pr: float, ir: float) -> None:
    res = normalize_maps(
        maps,
        pixel_threshold=pt,
        image_threshold=it,
        pixel_range=(-1.0, -1.0 + pr),
        image_range=(0.5, 0.5 + ir),
    )
    norm, mask, raw, scores = ref.normalize(maps, pt, it, (-1.0, -1.0 + pr), (0.5, 0.5 + ir))
    np.testing.assert_allclose(res.maps, norm, rtol=1e-5, atol=1e-6)
    # Values within float rounding of the 0.5 cut may land either side.
    undecided = np.abs(norm - 0.5) < 1e-6
    np.testing.assert_array_equal(res.masks[~undecided], mask[~undecided])
    np.testing.assert_array_equal(res.raw_scores, raw.astype(np.float32))
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
    decided = np.abs(scores - 0.5) > 1e-6
    np.testing.assert_array_equal(res.labels[decided], (scores > 0.5)[decided])


@given(map_batches(), st.floats(-2, 2), st.floats(-2, 2))
def test_raw_thresholding_without_ranges(maps: np.ndarray, pt: float, it: float) -> None:
    res = normalize_maps(maps, pixel_threshold=pt, image_threshold=it)
    np.testing.assert_array_equal(res.maps, maps)
    np.testing.assert_array_equal(res.masks, maps > np.float32(pt))
    np.testing.assert_array_equal(res.scores, maps.reshape(len(maps), -1).max(axis=1))
    np.testing.assert_array_equal(res.labels, res.scores > it)


def test_known_values_and_inplace() -> None:
    maps = np.array([[[0.0, 1.0], [2.0, 4.0]]], dtype=np.float32)
    res = normalize_maps(maps, pixel_threshold=2.0, image_threshold=3.0, pixel_range=(0.0, 4.0), image_range=(0.0, 2.0))
    np.testing.assert_allclose(res.maps[0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(res.masks[0], [[False, False], [False, True]])
    assert res.raw_scores[0] == 4.0
    assert res.scores[0] == pytest.approx(1.0)  # (4 - 3) / 2 + 0.5
    assert res.labels[0]
    assert res.maps is not maps
    inplace = normalize_maps(
        maps,
        pixel_threshold=2.0,
        image_threshold=3.0,
        pixel_range=(0.0, 4.0),
        image_range=(0.0, 2.0),
        inplace=True,
    )
    assert inplace.maps.base is maps or inplace.maps is maps
    np.testing.assert_allclose(maps[0], [[0.0, 0.25], [0.5, 1.0]])


@st.composite
def poisoned_batches(draw: st.DrawFn) -> np.ndarray:
    """Map batches with NaN / +inf / -inf written at a few random pixels of some images."""
    maps = draw(map_batches())
    n, h, w = maps.shape
    hits = draw(
        st.lists(
            st.tuples(
                st.integers(0, n - 1),
                st.integers(0, h - 1),
                st.integers(0, w - 1),
                st.sampled_from([np.nan, np.inf, -np.inf]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    for i, y, x, v in hits:
        maps[i, y, x] = v
    return maps


@given(poisoned_batches(), st.floats(-2, 2), st.floats(-2, 2), st.floats(0.1, 10), st.floats(0.1, 10))
def test_nonfinite_values_are_anomalous_minmax(maps: np.ndarray, pt: float, it: float, pr: float, ir: float) -> None:
    res = normalize_maps(
        maps, pixel_threshold=pt, image_threshold=it, pixel_range=(-1.0, -1.0 + pr), image_range=(0.5, 0.5 + ir)
    )
    norm, mask, raw, scores = ref.normalize(maps, pt, it, (-1.0, -1.0 + pr), (0.5, 0.5 + ir))
    bad_pixel = ~np.isfinite(maps)
    bad_image = bad_pixel.reshape(len(maps), -1).any(axis=1)
    # The rule itself, independent of the oracle: every poisoned pixel and image is anomalous.
    assert np.all(res.maps[bad_pixel] == 1.0)
    assert np.all(res.masks[bad_pixel])
    assert np.all(np.isnan(res.raw_scores[bad_image]))
    assert np.all(res.scores[bad_image] == 1.0)
    assert np.all(res.labels[bad_image])
    np.testing.assert_array_equal(res.finite, ~bad_image)
    # And everything else as the oracle says.
    np.testing.assert_allclose(res.maps, norm, rtol=1e-5, atol=1e-6)
    undecided = np.abs(norm - 0.5) < 1e-6
    np.testing.assert_array_equal(res.masks[~undecided], mask[~undecided])
    np.testing.assert_array_equal(res.raw_scores, raw.astype(np.float32))  # NaN == NaN here
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)


@given(poisoned_batches(), st.floats(-2, 2), st.floats(-2, 2))
def test_nonfinite_values_are_anomalous_raw(maps: np.ndarray, pt: float, it: float) -> None:
    res = normalize_maps(maps, pixel_threshold=pt, image_threshold=it)
    bad_pixel = ~np.isfinite(maps)
    bad_image = bad_pixel.reshape(len(maps), -1).any(axis=1)
    np.testing.assert_array_equal(res.maps, maps)
    np.testing.assert_array_equal(res.masks, (maps > np.float32(pt)) | bad_pixel)
    _, _, raw, scores = ref.normalize(maps, pt, it, None, None)
    np.testing.assert_array_equal(res.raw_scores, raw.astype(np.float32))
    np.testing.assert_array_equal(res.scores, scores.astype(np.float32))
    assert np.all(np.isinf(res.scores[bad_image]))
    assert np.all(res.labels[bad_image])
    np.testing.assert_array_equal(res.labels[~bad_image], res.scores[~bad_image] > it)


def test_one_nan_in_a_large_map_is_found_in_every_chunk() -> None:
    # 3 x 300 x 300 = several 65536-value chunks per image; one poisoned value in the last chunk of image 1.
    maps = np.zeros((3, 300, 300), dtype=np.float32)
    maps[1, 299, 299] = np.nan
    maps[2, 0, 0] = -np.inf
    res = normalize_maps(maps, pixel_threshold=0.5, image_threshold=0.5, pixel_range=(0, 1), image_range=(0, 1))
    assert res.raw_scores[0] == 0.0
    assert not res.labels[0]
    assert res.error(0) is None
    assert np.isnan(res.raw_scores[1])
    assert res.scores[1] == 1.0
    assert res.labels[1]
    assert res.error(1)
    assert np.isnan(res.raw_scores[2])
    assert res.labels[2]
    assert int(res.masks[1].sum()) == 1
    assert bool(res.masks[1, 299, 299])


@given(map_batches(), st.integers(1, 200), st.integers(1, 200))
def test_resize_matches_reference(maps: np.ndarray, oh: int, ow: int) -> None:
    got = resize_maps(maps, (oh, ow))
    # Source coordinates are float32 (as in PyTorch): their rounding error grows
    # with the coordinate, and scales with the step between neighbouring values.
    atol = 1e-5 + 2.5e-7 * max(*maps.shape[1:], oh, ow) * float(np.abs(maps).max())
    np.testing.assert_allclose(got, ref.resize(maps, oh, ow), rtol=1e-5, atol=atol)


def float32_oracle(maps: np.ndarray, pt: float, pmin: float, pmax: float) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's arithmetic in float32 NumPy: ``clamp((x - t) * (1 / (max - min)) + 0.5, 0, 1)``, 1 if non-finite."""
    t = np.float32(pt)
    scale = np.float32(1.0) / (np.float32(pmax) - np.float32(pmin))
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.clip((maps - t) * scale + np.float32(0.5), np.float32(0), np.float32(1))
    norm = np.where(np.isfinite(maps), norm, np.float32(1)).astype(np.float32)
    return norm, norm > np.float32(0.5)


@st.composite
def odd_batches(draw: st.DrawFn) -> np.ndarray:
    """Maps whose pixel counts end mid-vector and mid-chunk (65536-value chunks split over threads), some poisoned."""
    n = draw(st.integers(1, 3))
    hw = draw(st.sampled_from([1, 3, 15, 16, 17, 31, 65535, 65536, 65537, 2 * 65536 + 5, 3 * 65536 - 1]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    maps = (rng.standard_normal((n, 1, hw)) * 3).astype(np.float32)
    for _ in range(draw(st.integers(0, 3))):
        maps[rng.integers(n), 0, rng.integers(hw)] = rng.choice([np.nan, np.inf, -np.inf])
    return maps


@given(odd_batches(), st.floats(-2, 2), st.floats(0.01, 10), st.booleans(), st.sampled_from([1, 2, 3, 5]))
def test_minmax_values_are_float32_numpy_bit_for_bit(
    maps: np.ndarray, pt: float, pr: float, inplace: bool, threads: int
) -> None:
    """The vectorized one-pass kernel equals float32 NumPy exactly, in place or not, at every thread count."""
    before = get_num_threads()
    set_num_threads(threads)
    try:
        work = maps.copy()
        res = normalize_maps(
            work,
            pixel_threshold=pt,
            image_threshold=pt,
            pixel_range=(-1.0, -1.0 + pr),
            image_range=(-1.0, -1.0 + pr),
            inplace=inplace,
        )
    finally:
        set_num_threads(before)
    norm, mask = float32_oracle(maps, pt, -1.0, -1.0 + pr)
    np.testing.assert_array_equal(res.maps, norm)
    np.testing.assert_array_equal(res.masks, mask)
    finite = np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
    expect_raw = np.where(finite, np.where(np.isfinite(maps), maps, -np.inf).reshape(len(maps), -1).max(axis=1), np.nan)
    np.testing.assert_array_equal(res.raw_scores, expect_raw.astype(np.float32))
    if inplace:
        np.testing.assert_array_equal(work, norm)
    else:
        np.testing.assert_array_equal(work, maps)


@given(odd_batches(), st.floats(-2, 2), st.booleans())
def test_raw_mode_masks_and_copies_bit_for_bit(maps: np.ndarray, pt: float, inplace: bool) -> None:
    work = maps.copy()
    res = normalize_maps(work, pixel_threshold=pt, image_threshold=pt, inplace=inplace)
    np.testing.assert_array_equal(res.maps, maps)
    np.testing.assert_array_equal(res.masks, ~np.isfinite(maps) | (maps > np.float32(pt)))
