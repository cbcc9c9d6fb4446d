"""The int8_bf16 precision (issue #21): the INT8 QDQ backbone on OpenVINO with the bf16 hint, heads refit on it.

A ``shared_backbone`` PaDiM bundle whose ``backbone.onnx`` is quantized as ``--precision int8`` quantizes
it and whose heads were refit on the features OpenVINO computes from that graph with
``INFERENCE_PRECISION_HINT`` ``bf16``. The runtime treats it as a bf16 bundle
(:attr:`tilead.runtime.bundle.Manifest.openvino_refit`): ``auto`` picks ``hybrid``, ONNX Runtime refuses it.
Runtime tests use the synthetic shared bundle of :mod:`bundle_factory` marked ``int8_bf16`` (the runtime runs
whatever graph the bundle holds); the export tests use the session's tiny trained PaDiM run (integration).
Where the CPU has no bf16 units the refusal is tested instead, as in ``tests/test_bf16.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_shared_bundle
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from test_bf16 import BF16, NO_BF16_UNITS

from tilead.runtime import BundleError, Predictor
from tilead.runtime.bundle import (
    OPENVINO_REFIT_PRECISIONS,
    PRECISIONS,
    parse_manifest,
    refit_on_openvino,
    write_manifest,
)


def _mark(bundle: Path, precision: str = "int8_bf16", **model: Any) -> Path:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    data["model"]["precision"] = precision
    data["model"].update(model)
    write_manifest(bundle, data)
    return bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic shared bundle marked ``int8_bf16``."""
    return _mark(make_shared_bundle(tmp_path_factory.mktemp("int8_bf16") / "shared"))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# -- the predicate and the manifest --------------------------------------------------------------------------------


@given(st.sampled_from(PRECISIONS) | st.text(max_size=10))
def test_only_bf16_and_int8_bf16_have_heads_refit_on_openvino(precision: str) -> None:
    assert refit_on_openvino(precision) == (precision in ("bf16", "int8_bf16"))


def test_the_manifest_says_whether_its_heads_were_refit_on_openvino(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    for precision in PRECISIONS:
        data["model"]["precision"] = precision
        manifest = parse_manifest(data)
        assert manifest.precision == precision
        assert manifest.openvino_refit == (precision in OPENVINO_REFIT_PRECISIONS)
    data["model"].pop("precision")
    assert parse_manifest(data).precision == "fp32"
    assert not parse_manifest(data).openvino_refit


def test_an_int8_bf16_manifest_needs_the_shared_layout_and_may_take_uint8_tiles(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    data["model"]["backbone_input"] = "uint8"
    assert parse_manifest(data).uint8_backbone  # as bf16 bundles do
    per_location = json.loads(json.dumps(data))
    per_location["layout"] = "per_location"
    per_location.pop("backbone")
    with pytest.raises(BundleError, match=r"model.precision 'int8_bf16': expected layout 'shared_backbone'"):
        parse_manifest(per_location)
    int8 = json.loads(json.dumps(data))
    int8["model"]["precision"] = "int8"
    with pytest.raises(BundleError, match=r"only bf16 bundles take uint8 tiles \(precision bf16 or int8_bf16\)"):
        parse_manifest(int8)
    data["model"]["precision"] = "INT8_BF16"
    with pytest.raises(BundleError, match=r"model.precision: expected one of 'fp32', 'int8', 'bf16', 'int8_bf16'"):
        parse_manifest(data)


def test_native_heads_are_allowed_in_int8_bf16_bundles_only_among_the_quantized(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    data["native_heads"] = [
        {"name": m["name"], "file": m["file"].replace(".onnx", ".padim.npz"), "sha256": "0" * 64, "bytes": 1}
        for m in data["locations"]
    ]
    assert len(parse_manifest(data).native_heads) == len(data["locations"])
    data["model"]["precision"] = "int8"
    with pytest.raises(BundleError, match=r"only bf16 bundles carry native heads.*precision is 'int8'"):
        parse_manifest(data)


# -- the runtime ---------------------------------------------------------------------------------------------------


def test_onnxruntime_refuses_an_int8_bf16_bundle_naming_it(bundle: Path) -> None:
    with pytest.raises(ValueError, match=r"backend='onnxruntime' does not run bf16 bundles \(precision int8_bf16\)"):
        Predictor(bundle, backend="onnxruntime", threads=1)


@pytest.mark.skipif(BF16, reason="this CPU has bfloat16 units: the runs are tested instead")
def test_a_cpu_without_bf16_units_refuses_an_int8_bf16_bundle(bundle: Path) -> None:
    for backend in ("auto", "hybrid", "openvino"):
        with pytest.raises(RuntimeError, match=r"a bf16 bundle needs a CPU with bfloat16 units"):
            Predictor(bundle, backend=backend, threads=1)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_auto_runs_an_int8_bf16_bundle_on_the_hybrid_backend(bundle: Path) -> None:
    """Auto picks hybrid; the backbone compiled with the bf16 hint; the maps of OpenVINO's bf16 backbone."""
    images = _images(4)
    with (
        Predictor(bundle, threads=2, location_workers=2) as hybrid,
        Predictor(bundle, backend="openvino", threads=1) as reference,
    ):
        assert hybrid.backend == "hybrid"
        assert hybrid.providers[0].endswith("CPU, INT8 graph, backbone bf16")
        backend: Any = hybrid._backend
        assert backend._backbone.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        assert reference.providers[0].endswith("CPU, backbone bf16")  # openvino runs it as a bf16 bundle
        np.testing.assert_allclose(hybrid.location_maps(images), reference.location_maps(images), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_hybrid_takes_int8_bf16_but_not_int8(bundle: Path, tmp_path: Path) -> None:
    int8 = _mark(Path(shutil.copytree(bundle, tmp_path / "int8")), "int8")
    with pytest.raises(ValueError, match=r"backend='hybrid' runs bf16 bundles only.*fitted on INT8 features"):
        Predictor(int8, backend="hybrid", threads=1)
    with Predictor(int8, threads=1) as predictor:  # auto: an INT8 bundle stays on ONNX Runtime
        assert predictor.backend == "onnxruntime"


# -- the CLI -------------------------------------------------------------------------------------------------------


def test_the_export_cli_offers_int8_bf16_and_refuses_it_with_trt(bundle: Path, tmp_path: Path) -> None:
    from tilead.cli.export import main

    runner = CliRunner()
    assert "int8_bf16" in runner.invoke(main, ["--help"]).output
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "int8_bf16", "--trt"])
    assert result.exit_code == 2
    assert "int8_bf16 refits a run's heads" in result.output
    result = runner.invoke(main, [str(bundle), "--precision", "int8_bf16", "--trt"])
    assert result.exit_code == 2
    result = runner.invoke(main, [str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "int8_bf16x"])
    assert result.exit_code == 2
    assert not (tmp_path / "b").exists()


def test_int8_bf16_export_refusals() -> None:
    from tilead.exporter.bf16 import check_bf16_export
    from tilead.exporter.quantize import check_precision, quantizes_backbone

    assert check_precision("int8_bf16") == "int8_bf16"
    assert [p for p in PRECISIONS if quantizes_backbone(p)] == ["int8", "int8_bf16"]
    assert check_bf16_export("padim", None, False, "int8_bf16") == "shared_backbone"
    with pytest.raises(ValueError, match=r"precision int8_bf16: implemented for padim runs.*'patchcore'"):
        check_bf16_export("patchcore", None, False, "int8_bf16")
    with pytest.raises(ValueError, match=r"precision int8_bf16: needs layout shared_backbone"):
        check_bf16_export("padim", "per_location", False, "int8_bf16")


# -- the export (the tiny trained run) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bf16_export(tiny_trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_quantize import TINY_TOLERANCE

    from tilead.exporter.bundle import export_bundle

    if not BF16:
        pytest.skip(NO_BF16_UNITS)
    # The tiny run's nearly singular Gaussians (6 tiles) amplify any feature change: INT8's tiny-run tolerance.
    return export_bundle(
        tiny_trained[0], tmp_path_factory.mktemp("int8bf16x") / "bundle", progress=False, precision="int8_bf16",
        calibration_images=4, int8_tolerance=TINY_TOLERANCE,
    )  # fmt: skip


def _fit_tiles(run: Path, location: int) -> np.ndarray:
    """The tiles a location's Gaussians are fitted on (the exporter's refit tiles), float32 ``(n, C, th, tw)``."""
    from tilead.trainer.data import discover
    from tilead.trainer.run import Run
    from tilead.trainer.splits import holdout_split, make_splits
    from tilead.trainer.tiles import LocationTiles

    opened = Run.open(run)
    cfg = opened.config
    fit = holdout_split(make_splits(cfg, discover(cfg.data)).fit, opened.detector.holdout_fraction, cfg.seed)[0]
    name = opened.grid.location_names()[location]
    tiles = LocationTiles(cfg, fit, opened.grid, opened.preprocessing, (location,), name)
    return np.concatenate([np.ascontiguousarray(t.numpy()) for t in tiles])


@pytest.mark.integration
def test_int8_bf16_export_refits_on_openvinos_features_of_the_int8_graph(
    int8_bf16_export: Any, tiny_trained: tuple[Path, Path]
) -> None:
    """QDQ backbone, uint8 input, native heads; each head's mean is the mean of OpenVINO's INT8/bf16 features."""
    import onnx
    import onnxruntime as ort

    from tilead.exporter.bf16 import Bf16Backbone
    from tilead.runtime import read_manifest
    from tilead.runtime.bundle import FEATURES_NAME, INPUT_NAME
    from tilead.runtime.native_heads import NativeHead

    bundle = int8_bf16_export.bundle
    manifest = read_manifest(bundle)
    assert manifest.precision == "int8_bf16"
    assert manifest.openvino_refit
    assert manifest.layout == "shared_backbone"
    assert manifest.model["backbone_input"] == "uint8"
    assert len(manifest.native_heads) == len(manifest.models)
    quant = int8_bf16_export.manifest["source"]["quantization"]
    assert quant["quantized_nodes"] > 0
    assert quant["calibration_images"] == 4
    assert quant["head_refit_tiles"] > 0
    assert "INT8 QDQ backbone graph" in quant["format"]
    ops = {n.op_type for n in onnx.load(str(bundle / "backbone.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # quantized as --precision int8 does
    # The refit read OpenVINO's features of the INT8 graph (bf16 hint, uint8 tiles), not ONNX Runtime's.
    tiles = _fit_tiles(tiny_trained[0], 0)
    openvino = Bf16Backbone(bundle / "backbone.onnx", manifest.preprocessing, manifest.grid.tile_size, uint8=True)
    ov_mean = openvino.run([FEATURES_NAME], {INPUT_NAME: tiles})[0].mean(axis=0)  # (d, fh, fw)
    session = ort.InferenceSession(str(bundle / "backbone.onnx"), providers=["CPUExecutionProvider"])
    ort_mean = session.run([FEATURES_NAME], {INPUT_NAME: tiles})[0].mean(axis=0)
    head = NativeHead.from_bytes((bundle / manifest.native_heads[0].file).read_bytes(), "r0c0")
    mean = head.mean.reshape(*ov_mean.shape[1:], -1).transpose(2, 0, 1)  # (P, d) -> (d, fh, fw)
    span = float(np.abs(ov_mean).max())
    ov_error = float(np.abs(mean - ov_mean).max()) / span
    ort_error = float(np.abs(mean - ort_mean).max()) / span
    assert ov_error <= 1e-4  # the same features, summed in another order
    assert ort_error > 10 * ov_error  # the runtimes' INT8 features differ (this is why the heads are refit)


@pytest.mark.integration
def test_int8_bf16_bundle_maps_stay_near_the_fp32_bundles(
    int8_bf16_export: Any, tiny_trained: tuple[Path, Path]
) -> None:
    """Auto picks hybrid; on the run's test images its maps stay near the FP32 bundle's.

    Within the export's parity tolerance relative to the FP32 maps' range, as the export checks on training tiles.
    """
    import cv2
    from test_quantize import TINY_TOLERANCE

    from tilead.trainer.run import Run

    bundle = int8_bf16_export.bundle
    fp32 = tiny_trained[1]
    paths = sorted(Path(Run.open(tiny_trained[0]).config.data.root, "test").rglob("*.png"))[:4]
    images = np.stack([np.asarray(cv2.imread(str(path), cv2.IMREAD_COLOR)) for path in paths])
    with Predictor(bundle, threads=2) as hybrid, Predictor(fp32, threads=1) as exact:
        assert hybrid.backend == "hybrid"
        assert exact.backend == "onnxruntime"
        got, want = hybrid.location_maps(images), exact.location_maps(images)
        results = hybrid.predict(images)
    assert got.shape == want.shape
    span = float(want.max() - want.min())
    assert float(np.abs(got - want).max()) <= TINY_TOLERANCE * span
    assert isinstance(results, list)
    assert all(np.isfinite(r.score) for r in results)
    with pytest.raises(ValueError, match=r"does not run bf16 bundles \(precision int8_bf16\)"):
        Predictor(bundle, backend="onnxruntime")
