"""The GPU path where there is no GPU: TensorRT's API as installed, engine sets, clear errors, the self-check.

These machines have no GPU and cannot install TensorRT's builder. What is
checked here: every TensorRT class member and enum member tilead uses exists
in the installed lean runtime (tensorrt-lean-cu13, a dev dependency), engine
keys and manifest sections, the FP16 ONNX conversion (on ONNX Runtime), that a
missing TensorRT, builder or GPU is one clear error, and that tilead-doctor
reports its GPU checks as skipped. The GPU comparisons themselves are
``gpu``-marked and skip without a usable device; nothing here claims to have
run on a GPU.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tilead.exporter import engines as builder
from tilead.runtime import cuda_status
from tilead.runtime.backends import tensorrt_modules as modules
from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError
from tilead.runtime.bundle import parse_manifest
from tilead.runtime.engines import EngineFile, EngineSet, engine_key, parse_engine_sets, runs_on, select_engine_set

ROOT = Path(__file__).resolve().parents[1]
STATUS = cuda_status()
LOCATIONS = ["r0c0", "r0c1"]

# -- TensorRT's API as installed --------------------------------------------------------------------


def test_lean_runtime_has_every_member_the_backend_uses() -> None:
    trt = pytest.importorskip("tensorrt_lean") if sys.platform != "linux" else __import__("tensorrt_lean")
    assert modules.major_version(trt) == 11
    assert modules.missing_api(trt, modules.RUNTIME_API) == []


def test_lean_module_carries_the_builder_enums_of_its_version_but_no_builder() -> None:
    trt = __import__("tensorrt_lean")
    assert modules.missing_api(trt, builder.BUILDER_ENUMS[11]) == []
    # TensorRT 11 is strongly typed only: no FP16 builder flag nor precision constraints (FP16 means an FP16 ONNX) ...
    assert not hasattr(trt.BuilderFlag, "FP16")
    # ... which is why the TensorRT 10 list, which sets it, must not be used with 11.
    assert modules.missing_api(trt, builder.BUILDER_ENUMS[10]) == [
        "BuilderFlag.FP16",
        "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
    ]
    # The lean runtime cannot build.
    assert "Builder.create_network" in modules.missing_api(trt, builder.BUILDER_API)


def test_missing_api_names_what_is_missing() -> None:
    import types

    fake = types.ModuleType("fake_tensorrt")
    fake.Runtime = type("Runtime", (), {"deserialize_cuda_engine": None})  # type: ignore[attr-defined]
    missing = modules.missing_api(fake, (("Runtime", "deserialize_cuda_engine"), ("Runtime", "x"), ("Nope", "y")))
    assert missing == ["Runtime.x", "Nope.y"]


# -- one clear error where something is missing ---------------------------------------------------


def test_no_tensorrt_at_all_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt-lean-cu13"):
        modules.import_runtime()
    with pytest.raises(TensorRTUnavailableError, match="the lean runtime cannot build"):
        builder.import_builder()


def test_import_runtime_prefers_the_full_package_then_the_lean_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    if "tensorrt" not in sys.modules:  # these machines: the lean runtime only
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        assert modules.import_runtime() is __import__("tensorrt_lean")
    full = types.ModuleType("tensorrt")
    for cls, member in modules.RUNTIME_API:
        owner = getattr(full, cls, None) or type(cls, (), {})
        setattr(owner, member, None)
        setattr(full, cls, owner)
    monkeypatch.setitem(sys.modules, "tensorrt", full)
    assert modules.import_runtime() is full
    partial = types.ModuleType("tensorrt")
    partial.__version__ = "9.3.0"  # type: ignore[attr-defined]
    partial.Logger = type("Logger", (), {"WARNING": 1})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", partial)
    rest = ", ".join(f"{c}.{m}" for c, m in modules.RUNTIME_API[1:])
    message = f"tensorrt 9.3.0 lacks {rest}, which the TensorRT backend uses; tilead supports TensorRT 10 and 11"
    with pytest.raises(TensorRTUnavailableError, match="^" + re.escape(message) + "$"):
        modules.import_runtime()
    del partial.__version__
    with pytest.raises(TensorRTUnavailableError, match=r"^tensorrt \? lacks Runtime\.deserialize_cuda_engine, "):
        modules.import_runtime()


def test_no_tensorrt_at_all_names_both_imports_and_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    message = (
        "backend='tensorrt' needs TensorRT (tensorrt: import of tensorrt halted; None in sys.modules; "
        "tensorrt_lean: import of tensorrt_lean halted; None in sys.modules): install the TensorRT runtime: "
        "pip install tensorrt-lean-cu13 (CUDA 13; tensorrt-lean-cu12 for CUDA 12), or the full tensorrt package; "
        "on Jetson it comes with JetPack (python3-libnvinfer)"
    )
    with pytest.raises(TensorRTUnavailableError, match="^" + re.escape(message) + "$"):
        modules.import_runtime()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("NVIDIA H100 80GB HBM3 (sm_90)", ("NVIDIA H100 80GB HBM3", "9.0")),
        ("NVIDIA GeForce RTX 5090 (sm_120)", ("NVIDIA GeForce RTX 5090", "12.0")),
        ("Orin (sm_87)", ("Orin", "8.7")),
        ("A (sm_x) (sm_75)", ("A (sm_x)", "7.5")),
    ],
)
def test_parse_device_name(text: str, want: tuple[str, str]) -> None:
    assert modules.parse_device_name(text) == want


@pytest.mark.parametrize(
    "text", ["NVIDIA H100", "NVIDIA H100 (sm_9)", "NVIDIA H100 (sm_9a)", "NVIDIA H100 (sm_)", "X(sm_90)"]
)
def test_parse_device_name_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"device name {text!r}: expected 'NAME (sm_XY)'") + "$"):
        modules.parse_device_name(text)


def test_major_version() -> None:
    import types

    fake = types.ModuleType("t")
    fake.__version__ = "10.13.2.6"  # type: ignore[attr-defined]
    assert modules.major_version(fake) == 10


# -- ONNX Runtime's providers and its TensorRT engine cache (outside the bundle) ------------------------------


def test_ort_trt_cache_lies_outside_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from bundle_factory import make_bundle

    from tilead.runtime.backends.onnxruntime import ort_trt_cache
    from tilead.runtime.bundle import read_manifest

    manifest = read_manifest(make_bundle(tmp_path / "b"))
    digest = hashlib.sha256("".join(loc.sha256 for loc in manifest.locations).encode()).hexdigest()[:12]
    monkeypatch.setenv("TILEAD_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ort_trt_cache(manifest) == tmp_path / "tc" / "onnxruntime-trt" / digest
    monkeypatch.setenv("TILEAD_CACHE", "")
    assert ort_trt_cache(manifest) == tmp_path / "xdg" / "tilead" / "onnxruntime-trt" / digest
    monkeypatch.delenv("TILEAD_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ort_trt_cache(manifest) == tmp_path / "home" / ".cache" / "tilead" / "onnxruntime-trt" / digest


def test_session_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import onnxruntime as ort
    from bundle_factory import make_bundle

    from tilead.runtime.backends.onnxruntime import session_providers
    from tilead.runtime.bundle import read_manifest

    manifest = read_manifest(make_bundle(tmp_path / "b"))
    assert session_providers("cpu", manifest) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"^device: expected 'cpu' or 'cuda', got 'tpu'$"):
        session_providers("tpu", manifest)
    # What an onnxruntime-gpu build reports (these machines have the CPU build only).
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    message = (
        "device='cuda': this onnxruntime has no CUDAExecutionProvider (available: AzureExecutionProvider, "
        "CPUExecutionProvider); install onnxruntime-gpu on a machine with an NVIDIA GPU"
    )
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + "$"):
        session_providers("cuda", manifest)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session_providers("cuda", manifest) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("TILEAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    trt, cuda, cpu = session_providers("cuda", manifest)
    digest = hashlib.sha256("".join(loc.sha256 for loc in manifest.locations).encode()).hexdigest()[:12]
    name, options = trt
    assert name == "TensorrtExecutionProvider"
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    folder = str(tmp_path / "cache" / "onnxruntime-trt" / digest)
    assert options == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": folder,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": folder,
        # Batch 1 to max_batch (1 here) of the bundle's 3x40x40 tiles: one engine profile, no rebuilds (#18.5).
        "trt_profile_min_shapes": "tiles:1x3x40x40",
        "trt_profile_opt_shapes": "tiles:1x3x40x40",
        "trt_profile_max_shapes": "tiles:1x3x40x40",
    }


@pytest.mark.skipif(STATUS.usable, reason="a CUDA device is usable here")
def test_no_gpu_is_one_clear_error() -> None:
    with pytest.raises(TensorRTUnavailableError, match=r"no CUDA device is usable on this machine|built without CUDA"):
        modules.require_gpu()


@pytest.mark.skipif(STATUS.usable or not STATUS.built, reason="needs a CUDA build without a usable device")
def test_device_pipeline_without_a_gpu_raises_the_cuda_error() -> None:
    from tilead import _kernels
    from tilead.runtime import TileGrid

    grid = TileGrid(64, 32, 24)
    post = _kernels.PostSpec(0, [], [], _kernels.SeamSpec.off(), _kernels.NormSpec(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(RuntimeError, match="CUDA error in cudaSetDevice"):
        _kernels.cuda.DevicePipeline(grid.native, 1, 3, 3, [1.0] * 3, [0.0] * 3, 4, 4, post)


def test_predictor_tensorrt_needs_cuda_device(tmp_path: Path) -> None:
    from tilead.runtime import Predictor

    with pytest.raises(ValueError, match="backend='tensorrt' runs on device='cuda'"):
        Predictor(tmp_path, backend="tensorrt")


def test_export_trt_fails_fast_without_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilead.cli.export import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, [str(run), "-o", str(out), "--trt"])
    assert result.exit_code == 1
    assert "--trt needs the TensorRT builder" in result.output
    assert not out.exists()  # failed before exporting anything


def test_export_cli_argument_errors(tmp_path: Path) -> None:
    from tilead.cli.export import main

    runner = CliRunner()
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert "pass --trt" in runner.invoke(main, [str(bundle)]).output
    assert "pass -o/--output" in runner.invoke(main, [str(tmp_path)]).output
    bad = runner.invoke(main, [str(bundle), "--trt", "--opt-batch", "8", "--max-batch", "4"])
    assert bad.exit_code == 2
    assert "exceeds --max-batch" in bad.output


# -- engine sets in the manifest --------------------------------------------------------------------


def _set(**kw: Any) -> EngineSet:
    base: dict[str, Any] = {
        "key": "k", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "11.4.0.106",
        "precision": "fp32", "batch": (1, 2, 8), "workspace_mib": 1024, "version_compatible": True,
        "timing_cache": "engines/k/timing.cache",
        "files": tuple(EngineFile(n, f"engines/k/{n}.engine", "0" * 64, 10) for n in LOCATIONS),
    }  # fmt: skip
    base.update(kw)
    return EngineSet(**base)


def test_engine_key_names_gpu_capability_version_precision_batch_and_onnx() -> None:
    key = engine_key("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106", "fp16", 8, ["a" * 64, "b" * 64])
    assert re.fullmatch(r"nvidia-h100-80gb-hbm3-sm90-trt11\.4\.0-fp16-b8-[0-9a-f]{12}", key)
    assert key != engine_key("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106", "fp16", 8, ["a" * 64, "c" * 64])
    assert key != engine_key("NVIDIA H100 80GB HBM3", "9.0", "11.5.0", "fp16", 8, ["a" * 64, "b" * 64])
    with pytest.raises(ValueError, match="precision"):
        engine_key("x", "9.0", "11.4", "int8", 8, [])
    with pytest.raises(ValueError, match="compute_capability"):
        engine_key("x", "sm90", "11.4", "fp32", 8, [])


def test_engine_sets_round_trip_and_validate() -> None:
    s = _set()
    assert parse_engine_sets([s.to_dict()], LOCATIONS) == (s,)
    assert parse_engine_sets(None, LOCATIONS) == ()
    bad_batch = s.to_dict() | {"batch": {"min": 1, "opt": 9, "max": 8}}
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        parse_engine_sets([bad_batch], LOCATIONS)
    with pytest.raises(ValueError, match=r"one engine per model \['r0c0'\]"):
        parse_engine_sets([s.to_dict()], ["r0c0"])
    with pytest.raises(ValueError, match=r"unknown key|unexpected"):
        parse_engine_sets([s.to_dict() | {"color": "red"}], LOCATIONS)
    assert "thumbnail" not in s.to_dict()  # older readers never see the key


def test_an_engine_set_of_a_thumbnail_bundle_needs_exactly_its_thumbnail_engine() -> None:
    small = EngineFile("thumbnail", "engines/k/thumbnail.engine", "1" * 64, 12)
    s = _set(thumbnail=small)
    assert parse_engine_sets([s.to_dict()], LOCATIONS, thumbnail=True) == (s,)
    with pytest.raises(ValueError, match=r"engines\[0\]\.thumbnail: the bundle has a thumbnail branch.*--rebuild"):
        parse_engine_sets([_set().to_dict()], LOCATIONS, thumbnail=True)
    with pytest.raises(ValueError, match=r"engines\[0\]\.thumbnail: an engine for a thumbnail branch the bundle"):
        parse_engine_sets([s.to_dict()], LOCATIONS)
    moved = s.to_dict() | {"thumbnail": {**small.to_dict(), "file": "engines/k/r0c0.engine"}}
    with pytest.raises(ValueError, match=r"engines\[0\]\.thumbnail\.file"):
        parse_engine_sets([moved], LOCATIONS, thumbnail=True)


def test_engines_excluding_the_lean_runtime_run_only_on_their_own_tensorrt_version() -> None:
    """#18.4: plans built with EXCLUDE_LEAN_RUNTIME need the lean runtime of the version that built them."""
    s = _set()
    here: dict[str, Any] = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert runs_on(s, runtime_version="11.4.0.106", **here)
    assert runs_on(s, runtime_version="11.4.0.107", **here)  # same major.minor.patch, another build
    assert not runs_on(s, runtime_version="11.5.0.1", **here)  # a later minor: its lean library is not 11.4's
    assert not runs_on(s, runtime_version="11.4.1", **here)  # a later patch
    assert not runs_on(s, runtime_version="11.3.0", **here)  # older runtime
    assert not runs_on(s, runtime_version="12.0.0", **here)  # next major
    assert not runs_on(_set(version_compatible=False), runtime_version="11.5.0", **here)
    assert not runs_on(s, gpu="NVIDIA A100", compute_capability="8.0", runtime_version="11.4.0.106")
    later = _set(key="later", tensorrt="11.5.0.2")
    assert select_engine_set([s, later], runtime_version="11.5.0.2", **here) == later
    assert select_engine_set([s], runtime_version="11.5.0.2", **here) is None  # an 11.4 set is not picked for 11.5
    same_build = _set(key="build", tensorrt="11.4.0.107")
    assert select_engine_set([s, same_build], runtime_version="11.4.0.106", **here) == s  # the exact build first
    assert select_engine_set([s, same_build], runtime_version="11.4.0.107", **here) == same_build
    fp16 = _set(key="half", precision="fp16")
    assert select_engine_set([s, fp16], runtime_version="11.4.0.106", precision="fp16", **here) == fp16
    assert select_engine_set([s], runtime_version="11.4.0.106", batch=16, **here) is None  # profile max is 8


def test_builder_and_lean_runtime_are_pinned_to_the_same_version() -> None:
    """The plans exclude the lean runtime: the extras must install a lean runtime of the builder's version."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins: dict[str, set[str]] = {}
    for extra in ("tensorrt", "tensorrt-build", "dev"):
        for line in extras[extra]:
            req = Requirement(line)
            if req.name.startswith("tensorrt"):
                pins.setdefault(req.name, set()).add(str(req.specifier))
    assert set(pins) == {"tensorrt-lean-cu13", "tensorrt-cu13"}
    specs = set().union(*pins.values())
    assert len(specs) == 1, pins  # one version for the builder and the lean runtime, everywhere
    (spec,) = specs
    assert spec.startswith("==")
    assert spec.endswith(".*")
    assert spec.count(".") == 3  # major.minor.patch: what runs_on compares
    lean = __import__("tensorrt_lean")
    assert Requirement(f"x{spec}").specifier.contains(lean.__version__)  # the installed lean runtime fits the pin


def test_manifest_with_engines_parses_and_bad_engines_are_refused() -> None:
    names = ["r0c0", "r0c1", "r1c0", "r1c1"]
    data: dict[str, Any] = {
        "schema_version": 2,
        "grid": {"image_size": [64, 64], "tile_size": [48, 48], "stride": [16, 16]},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3, "color_order": "RGB"},
        "model": {"family": "padim", "map_size": [6, 6]},
        "locations": [{"name": n, "file": f"tiles/{n}.onnx", "sha256": "0" * 64, "bytes": 1} for n in names],
        "postprocess": {"weights": "uniform"},
        "normalization": {"stage": "none", "pixel_threshold": 1.0, "image_threshold": 1.0},
    }
    engines = _set(files=tuple(EngineFile(n, f"engines/k/{n}.engine", "0" * 64, 1) for n in names))
    data["engines"] = [engines.to_dict()]
    assert parse_manifest(data).engine_sets == (engines,)
    data["engines"][0]["precision"] = "int4"
    with pytest.raises(ValueError, match="precision"):
        parse_manifest(data)


# -- FP16 ONNX for TensorRT 11 ----------------------------------------------------------------------


def test_fp16_onnx_keeps_float32_io_and_the_values(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tilead.exporter.engines import fp16_onnx_bytes

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    half = onnx.load_from_string(fp16_onnx_bytes(path))
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in half.graph.initializer} == {TensorProto.FLOAT16}
    x = rng.standard_normal((3, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(half.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


# -- build configuration --------------------------------------------------------------------------


def test_every_cuda_source_is_compiled() -> None:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "cpp_ext").rglob("*.cu"))
    assert sources, "no .cu files found"
    missing = [s for s in sources if s not in cmake]
    assert not missing, f"CUDA sources not listed in CMakeLists.txt (CI would not compile them): {missing}"


# -- tilead-doctor --------------------------------------------------------------------------------


def test_doctor_reports_honestly() -> None:
    from tilead.cli.doctor import main

    runner = CliRunner()
    result = runner.invoke(main, ["--json"])
    report = json.loads(result.output)
    assert report["inventory"]["tensorrt"]["tensorrt_lean"]["missing_runtime_api"] == []
    if STATUS.usable:
        assert report["result"] in ("pass", "fail")
        return
    assert report["result"] == "skipped"
    assert result.exit_code == 0
    assert all(c["status"] == "skipped" and c["max_abs_diff"] is None for c in report["checks"])
    assert all(c["detail"] for c in report["checks"])  # says why
    text = runner.invoke(main, [])
    assert "result: SKIPPED" in text.output
    assert "the GPU checks did not run" in text.output
    assert runner.invoke(main, ["--require-gpu"]).exit_code == 1


@pytest.mark.gpu
@pytest.mark.skipif(not STATUS.usable, reason=f"no usable CUDA device: {STATUS.error or 'not built'}")
def test_gpu_self_checks_pass() -> None:
    from tilead.selfcheck import gpu_checks, summary

    checks = gpu_checks()
    assert summary(checks) == "pass", [c for c in checks if c.status != "pass"]


# -- on a real (tiny) bundle ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(STATUS.usable, reason="a CUDA device is usable here")
def test_tensorrt_backend_on_a_bundle_without_gpu_is_one_clear_error(tiny_trained: tuple[Path, Path]) -> None:
    from tilead.cli.bench import main as bench
    from tilead.runtime import Predictor

    _, bundle = tiny_trained
    with pytest.raises(TensorRTUnavailableError, match=r"no CUDA device is usable on this machine|built without CUDA"):
        Predictor(bundle, device="cuda", backend="tensorrt")
    result = CliRunner().invoke(bench, [str(bundle), "--backend", "tensorrt", "--device", "cuda", "--iterations", "1"])
    assert result.exit_code == 1
    assert "TensorRT needs" in result.output


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.skipif(not STATUS.usable, reason=f"no usable CUDA device: {STATUS.error or 'not built'}")
def test_tensorrt_predictor_matches_onnxruntime_cpu(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    pytest.importorskip("tensorrt", reason="building engines needs the full TensorRT")
    from tilead.selfcheck import gpu_checks, summary

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_trained[1], bundle)
    checks = gpu_checks(bundle, build=True)
    assert summary(checks) == "pass", [c for c in checks if c.status != "pass"]


@pytest.mark.integration
def test_fp16_conversion_of_a_tilead_export_runs_and_stays_close(tiny_trained: tuple[Path, Path]) -> None:
    import warnings

    import onnxruntime as ort

    from tilead.exporter.engines import fp16_onnx_bytes

    path = tiny_trained[1] / "tiles" / "r0c0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about every tiny weight it rounds
        half = fp16_onnx_bytes(path)
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"tiles": x})[0]
    got = ort.InferenceSession(half).run(None, {"tiles": x})[0]
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.01 * np.ptp(want)  # measured 0.2 % of the map range
