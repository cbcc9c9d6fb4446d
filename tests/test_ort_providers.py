"""ONNX Runtime on a GPU (issue #18, item 5): install extras, provider fallback, TensorRT provider profiles.

The fallback is triggered for real: this machine's CPU-only ``onnxruntime``
wheel has no CUDA provider, so a session asked for CUDA runs on the CPU, which
the backend must refuse.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle

from tilead.runtime import Predictor
from tilead.runtime.backends.onnxruntime import (
    OnnxRuntimeBackend,
    check_providers,
    session_providers,
    trt_profile_shapes,
)
from tilead.runtime.bundle import Manifest, read_manifest

ROOT = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime")
CPU_WHEEL = "CUDAExecutionProvider" not in ort.get_available_providers()


def _manifest_and_models(bundle: Path) -> tuple[Manifest, list[bytes]]:
    manifest = read_manifest(bundle)
    return manifest, [(bundle / loc.file).read_bytes() for loc in manifest.locations]


@pytest.mark.skipif(not CPU_WHEEL, reason="needs the CPU-only onnxruntime wheel, where CUDA falls back to the CPU")
def test_a_cuda_session_that_falls_back_to_the_cpu_is_an_error(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest, models = _manifest_and_models(bundle)
    with pytest.raises(RuntimeError, match=r"asked for CUDAExecutionProvider but fell back to CPUExecutionProvider"):
        OnnxRuntimeBackend(
            manifest,
            models,
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            threads=1,
            location_workers=1,
        )
    # The same bundle on the CPU provider loads and runs.
    backend = OnnxRuntimeBackend(manifest, models, ["CPUExecutionProvider"], threads=1, location_workers=1)
    assert backend.providers == ["CPUExecutionProvider"]
    backend.close()


@pytest.mark.skipif(not CPU_WHEEL, reason="needs the CPU-only onnxruntime wheel")
def test_predictor_on_cuda_without_the_gpu_wheel_says_what_to_install(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(RuntimeError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        Predictor(bundle, device="cuda", backend="onnxruntime")
    manifest, _ = _manifest_and_models(bundle)
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        session_providers("cuda", manifest)
    assert session_providers("cpu", manifest) == ["CPUExecutionProvider"]


def test_dropping_tensorrt_while_cuda_runs_is_a_warning_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    requested: list[Any] = [("TensorrtExecutionProvider", {}), "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="tilead.runtime.backends.onnxruntime"):
        check_providers(requested, ["CUDAExecutionProvider", "CPUExecutionProvider"], "r0c0")
    assert "dropped TensorrtExecutionProvider; running on CUDAExecutionProvider" in caplog.text
    with pytest.raises(RuntimeError, match="TensorrtExecutionProvider, CUDAExecutionProvider but fell back"):
        check_providers(requested, ["CPUExecutionProvider"], "r0c0")
    caplog.clear()
    check_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"], "r0c0")  # nothing asked, nothing said
    check_providers(requested, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "x")
    assert caplog.text == ""


def test_tensorrt_provider_profile_covers_batch_one_to_max(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest, _ = _manifest_and_models(bundle)
    shapes = trt_profile_shapes(manifest, 6)
    assert shapes == {
        "trt_profile_min_shapes": "tiles:1x3x40x40",
        "trt_profile_opt_shapes": "tiles:6x3x40x40",
        "trt_profile_max_shapes": "tiles:6x3x40x40",
    }
    # The format ONNX Runtime parses: name:dims joined by x.
    assert all(re.fullmatch(r"tiles:\d+x\d+x\d+x\d+", v) for v in shapes.values())
    with pytest.raises(ValueError, match="max_batch: expected at least 1, got 0"):
        trt_profile_shapes(manifest, 0)


def test_install_extras_never_put_both_onnxruntime_wheels_together() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}

    wheels = {"onnxruntime", "onnxruntime-gpu"}
    assert not names(project["dependencies"]) & wheels  # the base pins neither
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) & wheels == {"onnxruntime"}
    assert names(extras["gpu"]) & wheels == {"onnxruntime-gpu"}
    for extra, requirements in extras.items():
        assert len(names(requirements) & wheels) <= 1, extra
    # Every extra installed with gpu must not bring the CPU wheel back (dev is CI's, installed with cpu).
    for extra in ("train", "tensorrt", "tensorrt-build", "ray", "openvino"):
        assert "onnxruntime" not in names(extras[extra]), extra
    # The Makefile's install (what .ci/run runs) takes the CPU wheel.
    assert re.search(r'-e "\.\[[^\]]*\bcpu\b', (ROOT / "Makefile").read_text())


def test_cpu_session_runs_with_the_profile_free_providers(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with Predictor(bundle, backend="onnxruntime", max_batch=3) as p:
        assert p.providers == ["CPUExecutionProvider"]
        out = p.location_maps(np.zeros((3, 64, 64, 3), np.uint8))
        assert np.all(np.isfinite(out))
