"""benchmarks/study_assignment.py: the 8 square symmetries it aligns tile locations with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

ROOT = Path(__file__).resolve().parents[1]


def _study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study_assignment", ROOT / "benchmarks" / "study_assignment.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_assignment"] = module
    spec.loader.exec_module(module)
    return module


STUDY = _study()


def test_the_eight_transforms_are_the_square_symmetries() -> None:
    x = np.arange(9).reshape(3, 3)
    # NumPy reference, written out: rotations counter-clockwise, then the left-right mirror before them.
    want = [
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
        [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
        [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
        [[2, 1, 0], [5, 4, 3], [8, 7, 6]],
        [[0, 3, 6], [1, 4, 7], [2, 5, 8]],
        [[6, 7, 8], [3, 4, 5], [0, 1, 2]],
        [[8, 5, 2], [7, 4, 1], [6, 3, 0]],
    ]
    for t, ref in enumerate(want):
        np.testing.assert_array_equal(STUDY.transform(x, t), ref, err_msg=f"t={t}")


@settings(max_examples=50, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)).filter(
        lambda a: a.shape[-1] == a.shape[-2]
    ),
    t=st.integers(0, 7),
)
def test_inverse_undoes_transform_on_the_last_two_axes(x: np.ndarray, t: int) -> None:
    np.testing.assert_array_equal(STUDY.inverse(STUDY.transform(x, t), t), x)
    np.testing.assert_array_equal(STUDY.transform(STUDY.inverse(x, t), t), x)
