"""Banded uint8 resize (``Predictor(resize=True)`` on huge images, issue #16 item 8)."""

from __future__ import annotations

import numpy as np
import reference as ref
from hypothesis import example, given
from hypothesis import strategies as st

from tilead.runtime.image_resize import lerp_rows, resize_uint8


@given(
    st.integers(1, 120),
    st.integers(1, 120),
    st.sampled_from([1, 3]),
    st.integers(1, 90),
    st.integers(1, 90),
    st.integers(1, 5000),
    st.integers(0, 2**32 - 1),
)
@example(h=100, w=114, c=3, oh=78, ow=56, band=1, seed=168)  # float32 coordinates 0.0016 off the oracle
def test_banded_resize_is_the_whole_image_kernel_bit_for_bit(
    h: int, w: int, c: int, oh: int, ow: int, band: int, seed: int
) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    whole = resize_uint8(image, (oh, ow), whole_elements=image.size)
    banded = resize_uint8(image, (oh, ow), band_elements=band, whole_elements=0)
    np.testing.assert_array_equal(banded, whole)
    assert banded.flags.c_contiguous
    # Both are bilinear (align_corners=False): within rounding of the float64 oracle, plus the kernel's float32
    # source coordinates ((i + 0.5) * scale - 0.5 at sizes <= 120: off by <= ~2e-5 px per axis, and a pixel step
    # is at most 255, so <= ~0.005 per axis; found by hypothesis: 0.0016 at 100x114 -> 78x56).
    want = np.moveaxis(ref.resize(np.moveaxis(image, 2, 0), oh, ow), 0, 2)
    assert np.abs(banded.astype(np.float64) - want).max() <= 0.5 + 0.01


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_lerp_rows_match_the_reference_weights(out_size: int, in_size: int) -> None:
    i0, i1, w1 = lerp_rows(out_size, in_size)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), i0), 1.0 - w1.astype(np.float64))
    np.add.at(matrix, (np.arange(out_size), i1), w1.astype(np.float64))
    if out_size <= 600 and in_size <= 600:
        np.testing.assert_allclose(matrix, ref.bilinear_matrix(in_size, out_size), atol=1e-3)
    assert (i0 >= 0).all()
    assert (i1 < in_size).all()
    assert ((w1 >= 0) & (w1 <= 1)).all()
