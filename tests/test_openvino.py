"""The OpenVINO backend against ONNX Runtime on real trained bundles, its errors, closing and concurrency.

Both backends run the same exported ONNX graphs on the CPU in float32
(OpenVINO with ``INFERENCE_PRECISION_HINT`` f32), with different kernels, so
maps agree to rounding, not bit for bit; labels must be identical.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_bundle, reference_location_maps, reference_outputs

from tilead.runtime import BundleError, Prediction, Predictor, read_manifest
from tilead.runtime.backends import REGISTRY, BackendRequest, BackendSpec, InferenceBackend
from tilead.runtime.backends.onnxruntime import OnnxRuntimeBackend
from tilead.runtime.backends.openvino import OpenVinoBackend, OpenVinoUnavailableError

# Maps of the tiny bundles reach about 1e2 before normalization; both backends compute in float32.
MAP_ATOL = 1e-4


def _test_images(root: Path, count: int = 5) -> list[np.ndarray]:
    import cv2

    paths = sorted((root / "data").rglob("test/*/*.png"))[:count]
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    assert len(images) == count
    assert all(im is not None for im in images)
    return [np.asarray(im) for im in images]


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2 PatchCore bundle that deploys the reweighted score (graphs ``map`` + ``score``)."""
    import yaml

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    tmp = tmp_path_factory.mktemp("patchcore")
    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=5))
    cfg = {
        "name": "tiny_patchcore",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"family": "patchcore", "coreset_ratio": 0.25, "blur_sigma": 1.0},
        "postprocess": {"weights": "feather", "image_score": "detector"},
        "validation": {"force": True},  # 5 test images, below min_images
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), tmp / "run", progress=False)
    bundle = export_bundle(result.paths.root, tmp / "bundle", progress=False).bundle
    assert read_manifest(bundle).image_score == "detector"
    return bundle


def _assert_same(got: list[Prediction], want: list[Prediction]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=MAP_ATOL, rtol=1e-5)
        assert g.label == w.label
        assert g.raw_score == pytest.approx(w.raw_score, rel=1e-5, abs=MAP_ATOL)
        assert g.score == pytest.approx(w.score, rel=1e-5, abs=MAP_ATOL)
        # Masks can differ only where a pixel sits on the threshold within rounding.
        assert np.mean(g.mask != w.mask) < 1e-3


def _parity(bundle: Path, images: list[np.ndarray]) -> None:
    with Predictor(bundle, max_batch=4) as ort_p, Predictor(bundle, backend="openvino", max_batch=4) as ov_p:
        assert ov_p.backend == "openvino"
        assert ov_p.providers[0].startswith("OpenVINO ")
        assert ov_p.device_memory_bytes is None
        want = ort_p.predict(images)
        got = ov_p.predict(images)
        want_maps, want_scores = ort_p.location_outputs(images)
        got_maps, got_scores = ov_p.location_outputs(images)
    assert isinstance(want, list)
    assert isinstance(got, list)
    _assert_same(got, want)
    np.testing.assert_allclose(got_maps, want_maps, atol=MAP_ATOL, rtol=1e-5)
    if want_scores is None:
        assert got_scores is None
    else:
        assert got_scores is not None
        np.testing.assert_allclose(got_scores, want_scores, atol=MAP_ATOL, rtol=1e-5)


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_openvino_matches_onnxruntime_on_the_tiny_padim_bundle(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    _parity(bundle, _test_images(run.parent))


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_openvino_matches_onnxruntime_with_the_detector_score(detector_bundle: Path) -> None:
    images = _test_images(detector_bundle.parent)
    _parity(detector_bundle, images)
    with Predictor(detector_bundle, backend="openvino") as ov_p:
        _, scores = ov_p.location_outputs(images)
    assert scores is not None
    assert scores.shape == (4, len(images))
    assert np.all(np.isfinite(scores))


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_batches_and_single_images_agree(tiny_trained: tuple[Path, Path]) -> None:
    """Dynamic batch: one compiled model per location serves batches of 1, 3 and 5 with the same results."""
    run, bundle = tiny_trained
    images = _test_images(run.parent, 5)
    with Predictor(bundle, backend="openvino", max_batch=3) as p:
        batched = p.predict(images)
        stacked = p.predict(np.stack(images))
        singles = [p.predict(im) for im in images]
    assert isinstance(batched, list)
    assert isinstance(stacked, list)
    for b, s, one in zip(batched, stacked, singles, strict=True):
        assert isinstance(one, Prediction)
        np.testing.assert_allclose(b.anomaly_map, one.anomaly_map, atol=MAP_ATOL, rtol=1e-5)
        np.testing.assert_array_equal(b.anomaly_map, s.anomaly_map)


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_concurrent_predict_equals_serial(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    images = _test_images(run.parent)
    with Predictor(bundle, backend="openvino", threads=2) as p:
        serial = [p.predict(im) for im in images]
        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(p.predict, images * 4))
    for i, got in enumerate(concurrent):
        want = serial[i % len(images)]
        assert isinstance(got, Prediction)
        assert isinstance(want, Prediction)
        np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)
        assert got.label == want.label


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_threads_and_location_workers(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    images = _test_images(run.parent, 3)
    with Predictor(bundle, backend="openvino", threads=1, location_workers=1) as one:
        assert (one.threads, one.location_workers) == (1, 1)
        want = one.predict(images)
    with Predictor(bundle, backend="openvino", threads=4, location_workers=9) as many:
        assert (many.threads, many.location_workers) == (4, 4)  # at most one worker per location
        got = many.predict(images)
    assert isinstance(want, list)
    assert isinstance(got, list)
    _assert_same(got, want)


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_closing(tiny_trained: tuple[Path, Path]) -> None:
    run, bundle = tiny_trained
    image = _test_images(run.parent, 1)[0]
    p = Predictor(bundle, backend="openvino")
    p.predict(image)
    p.close()
    p.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        p.predict(image)
    with pytest.raises(RuntimeError, match="closed"):
        _ = p.providers
    with Predictor(bundle, backend="openvino") as q:
        q.predict(image)
    with pytest.raises(RuntimeError, match="closed"):
        q.location_maps(image)


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_bad_arguments_and_inputs(tiny_trained: tuple[Path, Path]) -> None:
    _, bundle = tiny_trained
    with pytest.raises(ValueError, match=r"backend='openvino' runs on device='cpu', got device='cuda'"):
        Predictor(bundle, backend="openvino", device="cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of 'auto', 'onnxruntime', 'openvino', 'tensorrt'"):
        Predictor(bundle, backend="openvin0")
    with Predictor(bundle, backend="openvino") as p:
        h, w = p.image_size
        with pytest.raises(ValueError, match="expected dtype uint8"):
            p.predict(np.zeros((h, w, 3), dtype=np.float32))
        with pytest.raises(ValueError, match=f"expected image size {h}x{w}"):
            p.predict(np.zeros((h + 1, w, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="the list is empty"):
            p.predict([])


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_a_model_openvino_cannot_read_is_a_bundle_error(tiny_trained: tuple[Path, Path]) -> None:
    _, bundle = tiny_trained
    manifest = read_manifest(bundle)
    models = [(bundle / loc.file).read_bytes() for loc in manifest.locations]
    models[2] = b"not an onnx model"
    with pytest.raises(BundleError, match=r"location r1c0: OpenVINO cannot load tiles/r1c0\.onnx"):
        OpenVinoBackend(manifest, models, threads=1, location_workers=1)


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_a_missing_openvino_is_one_clear_error(
    tiny_trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bundle = tiny_trained
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(OpenVinoUnavailableError, match=r"backend='openvino' needs OpenVINO .*tilead\[openvino\]"):
        Predictor(bundle, backend="openvino")


@pytest.mark.integration  # trains the tiny bundle (tests/conftest.py)
def test_backends_follow_the_protocol_and_a_registered_backend_needs_no_predictor_edit(
    tiny_trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, bundle = tiny_trained
    manifest = read_manifest(bundle)
    models = tuple((bundle / loc.file).read_bytes() for loc in manifest.locations)
    request = BackendRequest(bundle, manifest, models, "cpu", threads=1, location_workers=1, max_batch=2)
    for name in ("onnxruntime", "openvino"):
        backend = REGISTRY[name].create(request)
        assert isinstance(backend, InferenceBackend)
        assert not backend.capabilities.full_pipeline
        assert backend.capabilities.detector_score
        backend.close()
    # A new backend is a module with create(request) plus one registry entry: this test module is one.
    monkeypatch.setitem(REGISTRY, "recording", BackendSpec("recording", __name__, ("cpu",)))
    CALLS.clear()
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = _test_images(run.parent, 1)[0]
    with Predictor(copy, backend="recording") as p, Predictor(copy) as reference:
        got, want = p.predict(image), reference.predict(image)
    assert isinstance(got, Prediction)
    assert isinstance(want, Prediction)
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-6)  # other thread counts: rounding
    assert CALLS == [(4, 1)]  # one infer call: four locations, one image


CALLS: list[tuple[int, int]] = []


class _Recording(OnnxRuntimeBackend):
    def infer(self, tiles: np.ndarray, timer: object = None) -> tuple[np.ndarray, np.ndarray | None]:
        CALLS.append((tiles.shape[0], tiles.shape[1]))
        return super().infer(tiles)


def create(request: BackendRequest) -> _Recording:
    """Registry factory of the test's ``recording`` backend: ONNX Runtime that records its calls."""
    return _Recording(request.manifest, request.models, ["CPUExecutionProvider"], threads=1, location_workers=1)


# -- fast: the small ONNX bundles of tests/bundle_factory.py (no training) --------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("ov") / "b")


def test_openvino_matches_the_numpy_reference(small_bundle: Path) -> None:
    images = np.random.default_rng(11).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    images[2, 5:25, 30:60] = 255
    want_maps, want_raw, want_scores = reference_outputs(images, swap_rb=True)
    with Predictor(small_bundle, backend="openvino", threads=2, location_workers=2, max_batch=2) as p:
        assert p.backend == "openvino"
        import openvino

        assert p.providers == [f"OpenVINO {openvino.__version__} CPU"]
        assert p.device_memory_bytes is None
        assert (p.threads, p.location_workers) == (2, 2)
        got = p.predict(list(images))
        assert isinstance(got, list)
        for i, r in enumerate(got):
            np.testing.assert_allclose(r.anomaly_map, want_maps[i], atol=1e-4)
            assert r.raw_score == pytest.approx(want_raw[i], abs=1e-4)
            assert r.score == pytest.approx(want_scores[i], abs=1e-4)
            assert r.label is bool(want_scores[i] > 0.5)
        maps = p.location_maps(images)
        np.testing.assert_allclose(maps, reference_location_maps(images, swap_rb=True), atol=1e-4)
        _, times = p.predict_timed(images[:2])
        assert {"location:r0c0", "location:r0c1", "location:r1c0", "location:r1c1", "inference"} <= set(times.seconds)
        pool = getattr(p._backend, "_pool", None)
        assert pool is not None
        assert pool._max_workers == 2
        assert pool._thread_name_prefix == "tilead-openvino"
        again = p.predict(images[0])  # a request reused: its result was copied, not aliased
        assert isinstance(again, Prediction)
        np.testing.assert_array_equal(again.anomaly_map, got[0].anomaly_map)
        np.testing.assert_array_equal(got[1].anomaly_map, p.predict(images[1]).anomaly_map)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        p.predict(images[0])


def test_openvino_compiles_with_the_documented_settings(small_bundle: Path) -> None:
    manifest = read_manifest(small_bundle)
    models = [(small_bundle / loc.file).read_bytes() for loc in manifest.locations]
    backend = OpenVinoBackend(manifest, models, threads=4, location_workers=2)
    try:
        assert (backend.threads, backend.location_workers) == (4, 2)
        assert backend._locations is not None
        compiled = backend._locations[0].compiled
        assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2  # 4 threads over 2 location workers
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        assert compiled.get_property("ENABLE_CPU_PINNING") is False
        assert backend._pool is not None
    finally:
        backend.close()
    assert backend._locations is None
    assert backend._pool is None
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        _ = backend.providers
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        backend.infer(np.zeros((4, 1, 3, 40, 40), np.float32))
    one = OpenVinoBackend(manifest, models, threads=3, location_workers=9)  # at most one worker per location
    try:
        assert (one.threads, one.location_workers) == (3, 4)
        assert one._locations is not None
        assert int(one._locations[0].compiled.get_property("INFERENCE_NUM_THREADS")) == 1  # never 0
    finally:
        one.close()
    single = OpenVinoBackend(manifest, models, threads=1, location_workers=0)
    try:
        assert single.location_workers == 1
        assert single._pool is None  # one worker: locations run on the calling thread
    finally:
        single.close()


def test_openvino_outputs_the_detector_score(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "det", detector=True)
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    want = reference_location_maps(images, swap_rb=True)
    with Predictor(bundle, backend="openvino", threads=1) as p:
        maps, scores = p.location_outputs(images)
    assert scores is not None
    np.testing.assert_allclose(maps, want, atol=1e-4)
    np.testing.assert_allclose(scores, want.max(axis=(2, 3)), atol=1e-4)  # the models' score: the map's max


def test_openvino_factory_defaults_and_errors(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    with Predictor(small_bundle, backend="openvino") as p:
        assert p.threads == (os.cpu_count() or 1)
        assert p.location_workers == min(4, p.threads)
    manifest = read_manifest(small_bundle)
    models = [(small_bundle / loc.file).read_bytes() for loc in manifest.locations]
    models[3] = b"not an onnx model"
    with pytest.raises(BundleError, match=r"^location r1c1: OpenVINO cannot load tiles/r1c1\.onnx: "):
        OpenVinoBackend(manifest, models, threads=1, location_workers=1)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(
        OpenVinoUnavailableError,
        match=r"^backend='openvino' needs OpenVINO \(.*\): "
        r"pip install 'tilead\[openvino\]' \(or pip install openvino\)$",
    ):
        Predictor(small_bundle, backend="openvino")
