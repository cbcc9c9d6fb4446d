"""Shared test configuration: hypothesis profiles, devices, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tilead.runtime import cuda_status

# "dev" keeps the default run fast; CI selects "ci" (more examples) through
# HYPOTHESIS_PROFILE. Deadlines are off: timings on shared 2-core machines are noise.
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_bottle"

_CUDA = cuda_status()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _CUDA.usable, reason=f"no usable CUDA device: {_CUDA.error or 'not built'}"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each kernel test runs on the CPU twin, and on the CUDA twin where a GPU is visible."""
    return str(request.param)
