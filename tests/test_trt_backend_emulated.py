"""The TensorRT backend's orchestration, run end to end on the CPU through a stand-in (tests/fake_tensorrt.py).

The stand-in replaces the extension's DevicePipeline by the CPU twins of the
same kernels and a TensorRT engine by its ONNX model on ONNX Runtime, keyed by
fake device addresses. So this checks what the backend itself decides: which
engine set it takes, that each location's engine reads that location's tile
block and writes its map block for the batch size at hand, the channel-order
flag, the normalization parameters, labels, per-stage timing and the errors.
It does not check CUDA or TensorRT (tilead-doctor does, on a GPU).
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import fake_tensorrt
import numpy as np
import pytest

from tilead.exporter.engines import add_engine_set
from tilead.runtime import BundleError, Predictor
from tilead.runtime.backends import PipelineBackend
from tilead.runtime.backends import tensorrt as backend
from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError
from tilead.runtime.bundle import read_manifest, sha256_file

pytestmark = pytest.mark.integration

GPU, CC, VERSION = fake_tensorrt.GPU, fake_tensorrt.CC, fake_tensorrt.VERSION


@pytest.fixture
def bundle(tiny_trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny bundle with a "TensorRT" engine set whose plans are the ONNX models."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_trained[1], root)
    fake_tensorrt.add_engine_copies(root, (1, 2, 4))
    monkeypatch.setattr(backend, "import_runtime", fake_tensorrt.make_module)
    monkeypatch.setattr(backend, "require_gpu", lambda: (GPU, CC))
    cuda = types.SimpleNamespace(DevicePipeline=fake_tensorrt.FakePipeline)
    monkeypatch.setattr(backend, "_kernels", types.SimpleNamespace(cuda=cuda))
    return root


def _images(tiny_trained: tuple[Path, Path]) -> list[np.ndarray]:
    import cv2

    paths = sorted((tiny_trained[0].parent / "data").rglob("test/*/*.png"))
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths[:3]]
    assert all(im is not None for im in images)
    return [np.asarray(im) for im in images]


def test_tensorrt_backend_matches_onnxruntime(bundle: Path, tiny_trained: tuple[Path, Path]) -> None:
    images = _images(tiny_trained)
    with Predictor(bundle, max_batch=4) as cpu:
        want = cpu.predict(images)
        want_maps = cpu.location_maps(images)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        assert trt.providers[0].startswith(f"TensorRT {VERSION} (native, engines fake-gpu-sm90-trt11.4.0-fp32-b4-")
        assert trt.device_memory_bytes is not None
        got = trt.predict(images)
        got_maps = trt.location_maps(images)
        rgb = trt.predict([np.ascontiguousarray(im[..., ::-1]) for im in images], input_order="RGB")
        one = trt.predict(images[0])
        timed, times = trt.predict_timed(images[:2])
    assert isinstance(want, list)
    assert isinstance(got, list)
    assert isinstance(rgb, list)
    np.testing.assert_allclose(got_maps, want_maps, atol=1e-5)
    for g, w, r in zip(got, want, rgb, strict=True):
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=1e-5)
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.label == w.label
        assert g.score == pytest.approx(w.score, abs=1e-5)
        np.testing.assert_allclose(r.anomaly_map, w.anomaly_map, atol=1e-5)  # RGB input swaps channels back
    assert not isinstance(one, list)
    np.testing.assert_allclose(one.anomaly_map, want[0].anomaly_map, atol=1e-5)
    np.testing.assert_allclose(timed[1].anomaly_map, want[1].anomaly_map, atol=1e-5)
    stages = set(times.seconds)
    assert {"h2d", "tile", "inference", "untile", "seam", "crop", "normalize", "d2h"} <= stages
    assert {f"location:r{r}c{c}" for r in (0, 1) for c in (0, 1)} <= stages


def test_the_native_backend_is_a_full_pipeline_backend_that_does_not_build(bundle: Path) -> None:
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        inner = trt._backend
        assert isinstance(inner, PipelineBackend)
        assert inner.capabilities.full_pipeline
        assert inner.capabilities.detector_score
        assert (trt.threads, trt.location_workers) == (1, 1)
    with pytest.raises(RuntimeError, match="closed"):
        _ = trt.providers
    with pytest.raises(ValueError, match=r"build_on_load: the runtime does not build TensorRT engines.*--trt"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4, build_on_load=True)


def test_engine_selection_and_integrity_errors(bundle: Path) -> None:
    with pytest.raises(TensorRTUnavailableError, match=r"no TensorRT engines for Fake GPU .*precision fp16"):
        Predictor(bundle, device="cuda", backend="tensorrt", precision="fp16")
    with pytest.raises(TensorRTUnavailableError, match=r"batch 8 .*tilead-export .* --trt"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=8)  # the profile's max is 4
    engine = next((bundle / "engines").rglob("r1c0.engine"))
    engine.write_bytes(engine.read_bytes()[:-1] + b"x")
    with pytest.raises(BundleError, match=r"location r1c0: sha256 of .*r1c0\.engine is"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


def test_tensorrt_backend_never_passes_a_nan_location(
    bundle: Path, tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """The device pipeline's kernels follow the non-finite rule too (issue #16): r1c1's engine outputs NaN."""
    from dataclasses import replace

    from test_nonfinite import _poison_location

    poisoned = _poison_location(tiny_trained[1], tmp_path / "poisoned", "r1c1")
    engines = read_manifest(bundle).engine_sets[0]
    files = []
    for f in engines.files:
        if f.name == "r1c1":
            shutil.copy(poisoned / "tiles" / "r1c1.onnx", bundle / f.file)
            f = replace(f, sha256=sha256_file(bundle / f.file), bytes=(bundle / f.file).stat().st_size)
        files.append(f)
    add_engine_set(bundle, replace(engines, files=tuple(files)))
    images = _images(tiny_trained)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(images)
    assert isinstance(got, list)
    for p in got:
        assert p.label
        assert p.score == 1.0
        assert np.isnan(p.raw_score)
        assert p.error == "non-finite model output (NaN or infinity) at location r1c1 (map)"
