"""Threshold rules for synthetic validation (#17): the good-score bound and the bounded image threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.thresholds import good_bound_threshold
from tilead.trainer.validation import bounded_image_threshold

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(scores=st.lists(finite, min_size=1, max_size=60), rate=st.floats(0.001, 0.999))
def test_good_bound_is_the_conformal_order_statistic(scores: list[float], rate: float) -> None:
    s = np.array(scores, dtype=np.float64)
    n = s.size
    t, bound = good_bound_threshold(s, rate)
    assert t in s  # a value of the data
    k = int((s <= t).sum())  # rank of t from below, counting ties
    # The guaranteed rate: at most (n + 1 - k') / (n + 1) new good parts above the k'-th smallest (k' <= k).
    assert 1 / (n + 1) - 1e-12 <= bound <= 1.0
    assert int((s > t).sum()) <= round(bound * (n + 1)) - 1
    if (1 - rate) * (n + 1) <= n:
        assert bound <= rate + 1e-12  # enough images: the target is met
    else:
        assert t == s.max()  # too few images for the rate: the largest score, bound 1 / (n + 1)
        assert math.isclose(bound, 1 / (n + 1))
    del k


def test_good_bound_examples() -> None:
    s = np.arange(1.0, 22.0)  # 21 held-out scores 1..21
    assert good_bound_threshold(s, 0.05) == (21.0, 1 / 22)  # ceil(0.95 * 22) = 21: the largest
    assert good_bound_threshold(s, 0.10) == (20.0, 2 / 22)  # ceil(0.90 * 22) = 20
    assert good_bound_threshold(np.arange(1.0, 20.0), 0.05) == (19.0, 1 / 20)  # 0.95 * 20 = 19 exactly


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, float("nan")])
def test_good_bound_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate: expected a false-alarm rate in"):
        good_bound_threshold([1.0, 2.0], rate)


def test_good_bound_rejects_empty_and_nonfinite_scores() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        good_bound_threshold([], 0.1)
    with pytest.raises(ValueError, match="must be finite"):
        good_bound_threshold([1.0, np.inf], 0.1)


def test_image_threshold_never_below_the_good_bound() -> None:
    # Faint synthetic defects score among the good images: F1 alone cuts into the good scores.
    good = np.linspace(10.0, 14.0, 21)
    bad = np.r_[np.linspace(11.0, 13.5, 20), np.linspace(20.0, 40.0, 10)]
    scores = np.r_[good, bad].astype(np.float32)
    labels = np.r_[np.zeros(good.size, bool), np.ones(bad.size, bool)]
    plain, rule = bounded_image_threshold(scores, labels, 0.99, None)
    assert rule["rule"] == "f1_adaptive"
    assert (good > plain).any()  # the plain F1 threshold raises false alarms on held-out good images
    t, rule = bounded_image_threshold(scores, labels, 0.99, 0.05)
    assert t == pytest.approx(14.0)
    assert not (good > t).any()
    assert rule["binding"] == "good bound"
    assert rule["false_alarm_bound"] == pytest.approx(1 / 22)
    assert rule["f1_adaptive"] == plain


def test_image_threshold_keeps_f1_when_it_is_higher() -> None:
    good = np.linspace(10.0, 14.0, 21)
    bad = np.linspace(30.0, 40.0, 20)
    scores = np.r_[good, bad]
    labels = np.r_[np.zeros(good.size, bool), np.ones(bad.size, bool)]
    t, rule = bounded_image_threshold(scores, labels, 0.99, 0.05)
    assert 14.0 < t < 30.0
    assert rule["binding"] == "f1_adaptive"


def test_image_threshold_without_anomalies_keeps_the_quantile_rule() -> None:
    scores = np.linspace(0.0, 1.0, 11)
    t, rule = bounded_image_threshold(scores, np.zeros(11, bool), 0.5, 0.05)
    assert t == pytest.approx(0.5)
    assert rule["rule"].startswith("quantile")
