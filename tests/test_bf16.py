"""The bf16 precision (issue #21): export refit on OpenVINO's bf16 features, the hybrid backend, the refusals.

A bf16 bundle is a ``shared_backbone`` bundle of FP32 graphs whose PaDiM heads were refit on the
features OpenVINO computes from ``backbone.onnx`` in bfloat16. Runtime tests use the synthetic shared
bundle of :mod:`bundle_factory` marked ``bf16`` (its graphs are what the runtime runs; the refit only
changes head weights); the export tests use the session's tiny trained PaDiM run. Where the CPU has
no bf16 units (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` without ``BF16``) the tests that would run
bf16 check the refusal instead: bf16 is never emulated.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle, make_shared_bundle
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilead.runtime import BundleError, Predictor
from tilead.runtime.bundle import PRECISIONS, parse_manifest, refit_on_openvino, write_manifest


def _cpu_has_bf16() -> bool:
    import openvino as ov

    from tilead.runtime.backends.openvino import has_bf16_units

    return has_bf16_units([str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")])


BF16 = _cpu_has_bf16()
NO_BF16_UNITS = "this CPU has no bfloat16 units (OpenVINO lists no BF16): the refusal is tested instead"


def _mark(bundle: Path, precision: str = "bf16") -> Path:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    data["model"]["precision"] = precision
    write_manifest(bundle, data)
    return bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(per_location fp32, shared_backbone marked bf16)`` synthetic bundles."""
    root = tmp_path_factory.mktemp("bf16")
    return make_bundle(root / "per_location"), _mark(make_shared_bundle(root / "shared"))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# -- the runtime ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
@pytest.mark.parametrize(("threads", "workers", "max_batch"), [(1, 1, 8), (2, 2, 1), (2, 2, 8)])
def test_auto_runs_a_bf16_bundle_on_the_hybrid_backend(
    bundles: tuple[Path, Path], threads: int, workers: int, max_batch: int
) -> None:
    """Backbone on OpenVINO in bf16, heads on ONNX Runtime: the maps of OpenVINO's bf16 backbone with f32 heads."""
    images = _images(5)
    with (
        Predictor(bundles[1], threads=threads, location_workers=workers, max_batch=max_batch) as hybrid,
        Predictor(bundles[1], backend="openvino", threads=1) as reference,
    ):
        assert hybrid.backend == "hybrid"
        assert (hybrid.threads, hybrid.location_workers) == (threads, workers)
        assert hybrid.providers[0].endswith("CPU, backbone bf16")
        assert "ONNX Runtime" in hybrid.providers[1]
        backend: Any = hybrid._backend
        hint = backend._backbone.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        assert hint == "bf16"
        assert backend._backbone.compiled.get_property("INFERENCE_NUM_THREADS") == threads
        assert backend._backbone.compiled.get_property("NUM_STREAMS") == workers  # the workers' calls side by side
        assert reference.providers[0].endswith("CPU, backbone bf16")  # OpenVINO runs a bf16 bundle's backbone in bf16
        got, want = hybrid.location_maps(images), reference.location_maps(images)
        # The same bf16 backbone, heads f32 on either runtime: only summation order differs.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # Batches and single images agree (the backbone's bf16 result does not depend on the batch).
        single = np.concatenate([hybrid.location_maps(images[i : i + 1]) for i in range(len(images))], axis=1)
        np.testing.assert_allclose(single, got, rtol=1e-5, atol=1e-6)
        results = hybrid.predict(images[:2])
        assert isinstance(results, list)
        assert all(np.isfinite(r.anomaly_map).all() for r in results)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_hybrid_features_are_leased_from_the_predictors_pool(bundles: tuple[Path, Path]) -> None:
    """The backbone's features come from the Predictor's output pool, so the next call's maps reuse them."""
    from tilead.runtime.backends.onnxruntime import LeasedBuffers

    with Predictor(bundles[1], threads=1, max_batch=4) as p:
        backend: Any = p._backend
        assert isinstance(backend._buffers, LeasedBuffers)
        first = p.predict(_images(4, seed=2))
        assert isinstance(first, list)
        maps = [r.anomaly_map.copy() for r in first]
        del first
        gc.collect()
        assert backend._buffers.idle_bytes == 0  # the backend keeps no buffer of its own
        assert p.manifest.features is not None
        features = 4 * len(p.manifest.locations) * int(np.prod(p.manifest.features)) * 4
        assert p._outputs.idle_bytes >= features
        again = p.predict(_images(4, seed=2))  # reused memory gives the same maps
        assert isinstance(again, list)
        for a, b in zip(maps, again, strict=True):
            np.testing.assert_array_equal(b.anomaly_map, a)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
@pytest.mark.parametrize("group", [1, 2, 5])
def test_hybrid_streamed_tiles_give_the_maps_of_the_whole_batch(bundles: tuple[Path, Path], group: int) -> None:
    """Tiles made ``group`` images at a time (what the Predictor does) give ``infer``'s maps on all tiles at once."""
    from tilead.runtime.backends.base import TileStream
    from tilead.runtime.preprocess import tile_images

    images = _images(5, seed=4)
    with Predictor(bundles[1], threads=2, location_workers=2) as p:
        backend: Any = p._backend
        assert backend.streams_tiles
        m = p.manifest
        whole = np.array(backend.infer(tile_images(images, m.grid, m.preprocessing))[0])

        def fill(lo: int, hi: int) -> np.ndarray:
            return np.ascontiguousarray(tile_images(images[lo:hi], m.grid, m.preprocessing))

        streamed = np.array(backend.infer_stream(TileStream(len(images), group, fill))[0])
        np.testing.assert_array_equal(streamed, whole)
        np.testing.assert_array_equal(p.location_maps(images), whole)  # the Predictor's own (streamed) path


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_hybrid_maps_stay_within_bf16_rounding_of_fp32(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """The synthetic graphs' FP32 maps (ONNX Runtime, the bundle marked fp32) vs the hybrid's: bf16 keeps 8 bits."""
    fp32 = _mark(Path(shutil.copytree(bundles[1], tmp_path / "fp32")), "fp32")
    images = _images(3, seed=1)
    with Predictor(bundles[1], threads=1) as hybrid, Predictor(fp32, threads=1) as exact:
        got, want = hybrid.location_maps(images), exact.location_maps(images)
    # (The synthetic backbone has no convolution, which OpenVINO would run in bf16: the maps may be equal.)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)


def test_onnxruntime_refuses_a_bf16_bundle(bundles: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"backend='onnxruntime' does not run bf16 bundles.*wrong statistics"):
        Predictor(bundles[1], backend="onnxruntime", threads=1)


def test_hybrid_refuses_bundles_that_are_not_bf16(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    fp32 = _mark(Path(shutil.copytree(bundles[1], tmp_path / "fp32")), "fp32")
    int8 = _mark(Path(shutil.copytree(bundles[1], tmp_path / "int8")), "int8")
    for bundle, name in ((fp32, "FP32"), (int8, "INT8")):
        with pytest.raises(ValueError, match=rf"backend='hybrid' runs bf16 bundles only.*fitted on {name} features"):
            Predictor(bundle, backend="hybrid", threads=1)
    with pytest.raises(ValueError, match=r"backend='hybrid' runs on device='cpu'"):
        Predictor(bundles[1], device="cuda", backend="hybrid")
    with Predictor(fp32, threads=1) as predictor:  # auto: a non-bf16 bundle stays on ONNX Runtime
        assert predictor.backend == "onnxruntime"


@pytest.mark.skipif(BF16, reason="this CPU has bfloat16 units: the runs are tested instead")
def test_a_cpu_without_bf16_units_refuses_a_bf16_bundle(bundles: tuple[Path, Path]) -> None:
    for backend in ("auto", "hybrid", "openvino"):
        with pytest.raises(RuntimeError, match=r"a bf16 bundle needs a CPU with bfloat16 units"):
            Predictor(bundles[1], backend=backend, threads=1)


def test_the_bf16_refusal_names_the_cpu_and_what_to_do() -> None:
    """require_bf16 against a Core-like object (the real plugin's answer is what the tests above use)."""
    from tilead.runtime.backends.openvino import require_bf16

    class NoBf16:
        def get_property(self, device: str, name: str) -> Any:
            assert device == "CPU"
            return ["FP32", "INT8"] if name == "OPTIMIZATION_CAPABILITIES" else "Old CPU"

    with pytest.raises(RuntimeError, match=r"a bf16 bundle needs .* 'Old CPU' with FP32, INT8; it runs only where"):
        require_bf16(NoBf16(), "a bf16 bundle")
    with pytest.raises(RuntimeError, match=r"precision bf16 needs .*; export fp32 or int8 instead"):
        require_bf16(NoBf16(), "precision bf16")


# -- the manifest -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_data(bundles: tuple[Path, Path]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundles[1] / "manifest.json").read_text())
    return data


@pytest.fixture(scope="module")
def per_location_data(bundles: tuple[Path, Path]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundles[0] / "manifest.json").read_text())
    return data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    precision=st.sampled_from(PRECISIONS)
    | st.text(max_size=8)
    | st.none()
    | st.integers()
    | st.sampled_from(["BF16", "bfloat16", "fp16", " bf16"]),
    shared=st.booleans(),
)
def test_manifest_precision_parses_known_values_only(
    shared_data: dict[str, Any], per_location_data: dict[str, Any], precision: object, shared: bool
) -> None:
    """fp32 and int8 in any layout, bf16 and int8_bf16 in shared_backbone only; anything else refused, naming it."""
    data = json.loads(json.dumps(shared_data if shared else per_location_data))
    data["model"]["precision"] = precision
    if precision in PRECISIONS and (not refit_on_openvino(str(precision)) or shared):
        assert parse_manifest(data).model["precision"] == precision
        return
    expected = (
        rf"model.precision '{precision}': expected layout 'shared_backbone'"
        if precision in PRECISIONS
        else r"model.precision: expected one of 'fp32', 'int8', 'bf16', 'int8_bf16'"
    )
    with pytest.raises(BundleError, match=expected):
        parse_manifest(data)


def test_old_manifests_without_a_precision_are_fp32(per_location_data: dict[str, Any]) -> None:
    data = json.loads(json.dumps(per_location_data))
    data["model"].pop("precision", None)
    assert parse_manifest(data).model.get("precision", "fp32") == "fp32"


# -- the export -------------------------------------------------------------------------------------------------


def test_bf16_export_refusals() -> None:
    from tilead.exporter.bf16 import check_bf16_export

    assert check_bf16_export("padim", None, False) == "shared_backbone"
    assert check_bf16_export("padim", "shared_backbone", False) == "shared_backbone"
    with pytest.raises(ValueError, match=r"precision bf16: implemented for padim runs.*model is 'patchcore'"):
        check_bf16_export("patchcore", "shared_backbone", False)
    with pytest.raises(ValueError, match=r"precision bf16: needs layout shared_backbone.*got layout 'per_location'"):
        check_bf16_export("padim", "per_location", False)
    with pytest.raises(ValueError, match=r"precision bf16: not implemented for runs with a thumbnail branch"):
        check_bf16_export("padim", None, True)


def test_cli_refuses_bf16_with_trt_or_for_a_bundle(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    from tilead.cli.export import main

    runner = CliRunner()
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "bf16", "--trt"])
    assert result.exit_code == 2
    assert "TensorRT engines take fp32 or fp16" in result.output
    result = runner.invoke(main, [str(bundles[1]), "--precision", "bf16", "--trt"])
    assert result.exit_code == 2
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--parity-tolerance", "2"])
    assert result.exit_code == 2
    assert "applies to --precision int8, bf16 or int8_bf16" in result.output
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "bf16",
                                  "--parity-tolerance", "0"])  # fmt: skip
    assert result.exit_code == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.integration
def test_bf16_export_of_a_per_location_layout_is_refused_before_any_work(
    tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from tilead.cli.export import main

    result = CliRunner().invoke(
        main,
        [str(tiny_trained[0]), "-o", str(tmp_path / "b"), "--precision", "bf16", "--layout", "per_location"],
    )
    assert result.exit_code == 1
    assert "precision bf16: needs layout shared_backbone" in result.output
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.*"))


@pytest.fixture(scope="module")
def bf16_export(tiny_trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tilead.exporter.bundle import export_bundle

    if not BF16:
        pytest.skip(NO_BF16_UNITS)
    from test_quantize import TINY_TOLERANCE

    # The tiny run's nearly singular Gaussians (6 tiles) amplify any feature change: INT8's tiny-run tolerance.
    return export_bundle(
        tiny_trained[0], tmp_path_factory.mktemp("bf16x") / "bundle", progress=False, precision="bf16",
        int8_tolerance=TINY_TOLERANCE,
    )  # fmt: skip


@pytest.mark.integration
def test_bf16_export_refits_the_heads_on_openvino_bf16_features(
    bf16_export: Any, tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """A tiny run: FP32 graphs, refit heads (they differ from FP32's), parity recorded, hybrid predictions."""
    import onnx
    from test_quantize import TINY_TOLERANCE

    from tilead.exporter.bf16 import BF16_HEAD_TOLERANCE
    from tilead.exporter.bundle import export_bundle
    from tilead.runtime import read_manifest

    bundle = bf16_export.bundle
    manifest = read_manifest(bundle)
    assert manifest.model["precision"] == "bf16"
    assert manifest.layout == "shared_backbone"
    quant = bf16_export.manifest["source"]["quantization"]
    assert quant["head_refit_tiles"] > 0
    assert 0 <= quant["head_parity"] <= BF16_HEAD_TOLERANCE
    assert quant["parity_tolerance"] == TINY_TOLERANCE
    chain = bf16_export.manifest["source"]["parity_onnxruntime_vs_torch"]
    assert all(0 < v <= TINY_TOLERANCE for v in chain.values())  # bf16 moves the map, within the bound
    ops = {n.op_type for n in onnx.load(str(bundle / "backbone.onnx")).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}  # the backbone graph stays FP32
    # The same run exported FP32: same backbone graph, other head weights (refit on bf16 features).
    fp32 = export_bundle(tiny_trained[0], tmp_path / "fp32", progress=False, layout="shared_backbone").bundle
    # (The exporter's bytes are not deterministic across exports: compare operators and weights.)
    ours, theirs = onnx.load(str(bundle / "backbone.onnx")).graph, onnx.load(str(fp32 / "backbone.onnx")).graph
    assert [n.op_type for n in ours.node] == [n.op_type for n in theirs.node]
    weights = sorted(onnx.numpy_helper.to_array(t).tobytes() for t in ours.initializer)
    assert weights == sorted(onnx.numpy_helper.to_array(t).tobytes() for t in theirs.initializer)
    loc = manifest.locations[0]
    assert (bundle / loc.file).read_bytes() != (fp32 / loc.file).read_bytes()
    images = np.random.default_rng(3).integers(0, 256, (2, *manifest.grid.image_size, 3), dtype=np.uint8)
    with Predictor(bundle, threads=2) as hybrid:
        assert hybrid.backend == "hybrid"
        maps = hybrid.location_maps(images)
        results = hybrid.predict(images)
    assert isinstance(results, list)
    assert np.isfinite(maps).all()
    assert all(np.isfinite(r.score) for r in results)
    with pytest.raises(ValueError, match=r"does not run bf16 bundles"):
        Predictor(bundle, backend="onnxruntime")


@pytest.mark.integration
def test_bf16_export_refits_through_the_runtimes_uint8_backbone(
    bf16_export: Any, tiny_trained: tuple[Path, Path]
) -> None:
    """The export writes ``backbone_input: uint8`` and its refit backbone gives the hybrid backend's features."""
    from tilead.exporter.bf16 import Bf16Backbone
    from tilead.runtime import read_manifest
    from tilead.runtime.bundle import FEATURES_NAME, INPUT_NAME
    from tilead.runtime.preprocess import tile_images, tile_images_u8

    bundle = bf16_export.bundle
    manifest = read_manifest(bundle)
    assert manifest.model["backbone_input"] == "uint8"
    grid, prep = manifest.grid, manifest.preprocessing
    images = np.random.default_rng(7).integers(0, 256, (2, *grid.image_size, 3), dtype=np.uint8)
    refit = Bf16Backbone(bundle / "backbone.onnx", prep, grid.tile_size, uint8=True)
    floats = tile_images(images, grid, prep, input_order="RGB")
    exported = refit.run([FEATURES_NAME], {INPUT_NAME: floats.reshape(-1, *floats.shape[2:])})[0]
    with Predictor(bundle, threads=1) as hybrid:
        backend: Any = hybrid._open()
        assert backend.uint8_tiles
        pixels = tile_images_u8(images, grid, prep, input_order="RGB")
        flat = pixels.reshape(-1, *pixels.shape[2:])
        runtime = np.empty_like(exported)
        for i in range(len(flat)):
            backend._run_features(flat[i : i + 1], runtime[i : i + 1])
    span = float(exported.max() - exported.min())
    assert float(np.abs(runtime - exported).max()) <= 1e-3 * span  # the same compiled path (bf16 may vary by threads)
