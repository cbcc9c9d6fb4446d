"""Normalize + threshold + score kernel, and the map resize kernel."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import normalize_maps, resize_maps


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


def test_nan_pixels_do_not_become_the_score() -> None:
    maps = np.array([[[np.nan, 1.0], [2.0, 0.5]]], dtype=np.float32)
    res = normalize_maps(maps, pixel_threshold=1.0, image_threshold=1.0)
    assert res.raw_scores[0] == 2.0


@given(map_batches(), st.integers(1, 200), st.integers(1, 200))
def test_resize_matches_reference(maps: np.ndarray, oh: int, ow: int) -> None:
    got = resize_maps(maps, (oh, ow))
    # Source coordinates are float32 (as in PyTorch): their rounding error grows
    # with the coordinate, and scales with the step between neighbouring values.
    atol = 1e-5 + 2.5e-7 * max(*maps.shape[1:], oh, ow) * float(np.abs(maps).max())
    np.testing.assert_allclose(got, ref.resize(maps, oh, ow), rtol=1e-5, atol=atol)
