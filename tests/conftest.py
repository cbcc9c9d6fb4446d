"""Shared test configuration: hypothesis profiles, devices, data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TILEAD_MUTATION"):  # `make mutation`: import mutmut's mutated copy, not the editable install
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]

import pytest
from hypothesis import HealthCheck, settings

from tilead import _kernels

# "dev" keeps the default run fast; CI selects "ci" (more examples) through
# HYPOTHESIS_PROFILE. Deadlines are off: timings on shared 2-core machines are noise.
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]
_CHECKOUT = ROOT.parent if ROOT.name == "mutants" else ROOT  # `make mutation` runs the tests from mutants/
BOTTLE = _CHECKOUT.parent / "shared" / "data" / "mvtec_bottle"

# Asked of the extension itself, not of tilead.runtime.cuda_status: `make mutation` mutates the runtime, and a
# mutant that raises while this conftest loads would stop pytest before any test ran.
_CUDA_COUNT, _CUDA_ERROR = _kernels.cuda.device_count()
_CUDA_USABLE = bool(_kernels.cuda.is_built()) and int(_CUDA_COUNT) > 0
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _CUDA_USABLE, reason=f"no usable CUDA device: {_CUDA_ERROR or 'not built'}"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each kernel test runs on the CPU twin, and on the CUDA twin where a GPU is visible."""
    return str(request.param)


def train_tiny(tmp: Path) -> tuple[Path, Path]:
    """Train and export a 2x2 PaDiM ensemble on 160x160 synthetic images: ``(run folder, bundle)``.

    A few seconds on CPU; the integration tests share one through :func:`tiny_trained`.
    """
    import yaml

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=3))
    cfg = {
        "name": "tiny",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "postprocess": {"weights": "feather"},
        "validation": {"force": True},  # 5 test images, below min_images
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), tmp / "run", progress=False)
    bundle = export_bundle(result.paths.root, tmp / "bundle", progress=False).bundle
    return result.paths.root, bundle


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run folder, bundle)`` of :func:`train_tiny`, shared by the whole session."""
    return train_tiny(tmp_path_factory.mktemp("tiny"))


def assert_bottle_bundle_parity(run: Path, bundle: Path) -> None:
    """Normalized maps within 1e-4 and identical labels on real bottle test images (defective and good).

    Through the ONNX Runtime backend and the OpenVINO backend.
    """
    import cv2
    import numpy as np

    from tilead.exporter.bundle import export_bundle
    from tilead.runtime import Predictor
    from tilead.trainer.eager import load_eager_ensemble

    export_bundle(run, bundle, progress=False)
    paths = [
        p
        for kind in ("good", "broken_large", "contamination")
        for p in sorted((BOTTLE / "test" / kind).glob("*.png"))[:2]
    ]
    decoded = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    assert all(d is not None for d in decoded)
    images = np.stack(decoded)  # type: ignore[arg-type]
    _, eager = load_eager_ensemble(run).predict(images)
    with Predictor(bundle) as predictor:
        results = predictor.predict(images)
    assert isinstance(results, list)
    got = np.stack([r.anomaly_map for r in results])
    assert np.abs(got - eager.maps).max() <= 1e-4
    assert [r.label for r in results] == eager.labels.tolist()
    np.testing.assert_allclose([r.score for r in results], eager.scores, atol=1e-4)
    assert sum(r.label for r in results) >= 3  # the defective images are found
    # The OpenVINO backend runs the same graphs in float32: the same bound, the same labels.
    with Predictor(bundle, backend="openvino") as predictor:
        ov = predictor.predict(images)
    assert isinstance(ov, list)
    assert np.abs(np.stack([r.anomaly_map for r in ov]) - eager.maps).max() <= 1e-4
    assert [r.label for r in ov] == eager.labels.tolist()
