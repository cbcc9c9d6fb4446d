"""The label rule at its boundary: anomalous iff the normalized score is *above* 0.5 (raw: above the threshold).

Expected labels are written out by hand from the rule, not computed by the code
under test; the scores sit exactly on and just around the boundary, where the
mutants ``>`` -> ``>=`` and 0.5 -> 0.45 differ from the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import NormalizationStats, normalize_maps, normalize_with_stats


def _maps(values: list[float]) -> np.ndarray:
    """One 2x2 map per value, every pixel equal to it (the image score is the value)."""
    return np.array([np.full((2, 2), v) for v in values], dtype=np.float32)


def test_min_max_labels_at_and_around_one_half() -> None:
    # Range [0, 8], threshold 4: normalized = (x - 4) / 8 + 0.5 (exact in float32 for these x).
    raw = [4.0, 3.75, 3.5, 3.6, 4.0625, 8.0, 0.0]
    expected_scores = [0.5, 0.46875, 0.4375, 0.45, 0.5078125, 1.0, 0.0]
    expected_labels = [False, False, False, False, True, True, False]
    out = normalize_maps(_maps(raw), pixel_threshold=4.0, image_threshold=4.0, pixel_range=(0.0, 8.0),
                         image_range=(0.0, 8.0))  # fmt: skip
    np.testing.assert_allclose(out.scores, expected_scores, atol=1e-6)
    assert out.labels.tolist() == expected_labels
    assert [bool(m.any()) for m in out.masks] == expected_labels


def test_raw_labels_at_the_threshold() -> None:
    out = normalize_maps(_maps([2.0, 2.0000002, 1.9999999, 7.0]), pixel_threshold=2.0, image_threshold=2.0)
    assert out.labels.tolist() == [False, True, False, True]


@given(offset=st.integers(min_value=-40, max_value=40))
def test_labels_follow_the_rule_near_the_boundary(offset: int) -> None:
    # Scores 0.5 + offset/128 (exact binary fractions in float32), from 0.1875 to 0.8125.
    x = 4.0 + 8.0 * offset / 128
    stats = NormalizationStats("image", 4.0, 4.0, (0.0, 8.0), (0.0, 8.0))
    result = normalize_with_stats(_maps([x]), stats)
    assert result.scores[0] == pytest.approx(0.5 + offset / 128, abs=1e-7)
    assert bool(result.labels[0]) is (offset > 0)
