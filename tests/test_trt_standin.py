"""The native TensorRT backend against the CPU stand-in of its DevicePipeline, on small factory bundles (issue #18).

Fast: the bundles are tests/bundle_factory.py's ONNX graphs, the "engines" are
those graphs run by ONNX Runtime (tests/fake_tensorrt.py). What is checked
here: every engine address is 256-byte aligned at every batch size for the
bottle and demo geometries (the stand-in pads like the C++ pipeline, with the
same rule from the extension); a False from ``set_input_shape``,
``set_tensor_address`` or ``execute_async_v3`` is a clear error; engines that
do not fit the pipeline (profile, shapes, dtype) are refused at load, before any
launch; the upload boundary check; and shift, pad and resize bundles agree with
ONNX Runtime on the CPU (the stand-in's crop resizes like the real pipeline).
The CUDA pipeline itself is not run here (no GPU): its strides are compiled by
nvcc, and tilead-doctor checks them on a GPU.
"""

from __future__ import annotations

import itertools
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fake_tensorrt
import numpy as np
import pytest
from bundle_factory import GRID, make_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead import _kernels
from tilead.exporter.engines import add_engine_set
from tilead.runtime import BundleError, Predictor, cuda_status
from tilead.runtime.backends import tensorrt as backend
from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError
from tilead.runtime.bundle import read_manifest, sha256_file
from tilead.runtime.engines import EngineFile, EngineSet, engine_key

GPU, CC, VERSION = "Fake GPU", "9.0", "11.4.0.106"
EDGE_GRIDS = {
    "shift": GRID,
    # 60 px with 40 px tiles at stride 24: a 64 px canvas, so pad crops and resize resizes.
    "pad": {"image_size": [60, 60], "tile_size": [40, 40], "stride": [24, 24], "edge": "pad"},
    "resize": {"image_size": [60, 60], "tile_size": [40, 40], "stride": [24, 24], "edge": "resize"},
}


def engine_bundle(
    root: Path, grid_data: dict[str, Any], batch: tuple[int, int, int] = (1, 4, 4), *, compatible: bool = True
) -> Path:
    """A factory bundle with a "TensorRT" engine set whose plans are its ONNX models."""
    make_bundle(root, grid_data=grid_data)
    manifest = read_manifest(root)
    key = engine_key(GPU, CC, VERSION, "fp32", batch[2], [loc.sha256 for loc in manifest.locations])
    files = []
    for loc in manifest.locations:
        target = root / "engines" / key / f"{loc.name}.engine"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / loc.file, target)
        files.append(
            EngineFile(loc.name, target.relative_to(root).as_posix(), sha256_file(target), target.stat().st_size)
        )
    add_engine_set(root, EngineSet(key, GPU, CC, VERSION, "fp32", batch, 256, compatible, None, tuple(files)))
    return root


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Route the backend to the stand-in; call it with make_module's keywords to change the fake runtime."""

    def use(**kwargs: Any) -> None:
        monkeypatch.setattr(backend, "import_runtime", lambda: fake_tensorrt.make_module(**kwargs))

    use()
    monkeypatch.setattr(backend, "require_gpu", lambda: (GPU, CC))
    cuda = types.SimpleNamespace(DevicePipeline=fake_tensorrt.FakePipeline)
    monkeypatch.setattr(backend, "_kernels", types.SimpleNamespace(cuda=cuda))
    return use


def _images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


# -- #18.1: 256-byte aligned engine I/O -----------------------------------------------------------


def _pipeline(image: int, tile: int, stride: int, map_size: int, max_batch: int) -> fake_tensorrt.FakePipeline:
    grid = _kernels.Grid(image, image, tile, tile, stride, stride, _kernels.EDGE_SHIFT)
    return fake_tensorrt.FakePipeline(
        grid, max_batch, 3, 3, [1.0] * 3, [0.0] * 3, map_size, map_size, _kernels.BLEND_UNIFORM, [], [],
        0.0, 0.0, _kernels.NORM_NONE, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(("image", "tile", "stride", "map_size"), [(900, 464, 436, 58), (1024, 544, 480, 68)])
def test_every_location_block_is_256_byte_aligned_at_every_batch_size(
    image: int, tile: int, stride: int, map_size: int
) -> None:
    """Bottle (58x58 maps, 464 px tiles) and demo (68x68 maps, 544 px tiles), batches 1 to 8."""
    assert _kernels.TENSOR_ALIGN_BYTES == backend.TENSOR_ALIGN_BYTES == 256
    p = _pipeline(image, tile, stride, map_size, 8)
    assert p.locations == 4
    map_bytes, tile_bytes = 4 * map_size * map_size, 4 * 3 * tile * tile
    # A dense layout would misalign location 1 at batch 1 (the defect of #18.1): 58*58*4 = 13456 = 52*256 + 144.
    assert map_bytes % 256 != 0
    for n in range(1, 9):
        assert p.maps_stride(n) % 256 == 0
        assert p.tiles_stride(n) % 256 == 0
        assert n * map_bytes <= p.maps_stride(n) < n * map_bytes + 256
        assert n * tile_bytes <= p.tiles_stride(n) < n * tile_bytes + 256
        for kind, stride_bytes, block, buffer in (
            ("tiles", p.tiles_stride(n), n * tile_bytes, p.tiles),
            ("maps", p.maps_stride(n), n * map_bytes, p.maps),
        ):
            addresses = [getattr(p, f"{kind}_address")(loc, n) for loc in range(p.locations)]
            assert all(a % 256 == 0 for a in addresses), (kind, n, [a % 256 for a in addresses])
            assert all(b - a == stride_bytes for a, b in itertools.pairwise(addresses))
            assert addresses[-1] - addresses[0] + block <= buffer.nbytes  # the last block fits the allocation


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1 << 40))
def test_aligned_block_floats_rounds_up_to_256_bytes(floats: int) -> None:
    got = _kernels.aligned_block_floats(floats)
    assert got % 64 == 0
    assert floats <= got < floats + 64


def test_aligned_block_floats_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError, match="floats: expected >= 0, got -1"):
        _kernels.aligned_block_floats(-1)


def test_every_batch_size_runs_on_aligned_addresses(standin: Callable[..., None], tmp_path: Path) -> None:
    """Batches 1..4 (the fake context refuses a misaligned address, so a dense layout would fail here)."""
    bundle = engine_bundle(tmp_path / "b", GRID)
    images = _images(4, 64, 64)
    with (
        Predictor(bundle, max_batch=4) as cpu,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt,
    ):
        want = cpu.location_maps(images)
        for n in range(1, 5):
            np.testing.assert_allclose(trt.location_maps(images[:n]), want[:, :n], atol=1e-5)
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        contexts = inner._contexts
        assert all(a % 256 == 0 for ctx in contexts for a in ctx.addresses.values())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("set_input_shape", r"location r0c0: TensorRT refused input shape \(2, 3, 40, 40\) for tensor 'tiles'"),
        ("set_tensor_address", r"location r0c0: TensorRT refused device address 0x[0-9a-f]+ for tensor 'tiles'"),
        ("execute_async_v3", r"location r0c0: TensorRT failed to enqueue"),
    ],
)
def test_a_refused_context_call_is_a_clear_error(
    standin: Callable[..., None], tmp_path: Path, call: str, message: str
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    standin(refuse=(call,))
    with (
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt,
        pytest.raises(RuntimeError, match=message),
    ):
        trt.predict(_images(2, 64, 64))


# -- #18.2: engines checked against the pipeline at load ------------------------------------------


def _reshape(name: str, shape: tuple[int, ...]) -> Callable[[fake_tensorrt.FakeEngine], None]:
    def edit(engine: fake_tensorrt.FakeEngine) -> None:
        engine.shapes[name] = shape

    return edit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": (1, 2, 2)}, r"profile takes batches 1 to 2 \(opt 2\), the pipeline needs 1 to 4 \(max_batch\)"),
        ({"profile": (2, 4, 4)}, r"profile takes batches 2 to 4 \(opt 4\), the pipeline needs 1 to 4"),
        ({"dtype": "HALF"}, r"tensor 'tiles' is HALF, expected float32"),
        (
            {"edit": _reshape("tiles", (-1, 1, 40, 40))},
            r"tensor 'tiles' has shape \(-1, 1, 40, 40\), expected "
            r"\(batch, 3, 40, 40\)",
        ),
        ({"edit": _reshape("tiles", (-1, 3, 48, 48))}, r"tensor 'tiles' has shape \(-1, 3, 48, 48\)"),
        (
            {"edit": _reshape("map", (-1, 1, 6, 5))},
            r"tensor 'map' has shape \(-1, 1, 6, 5\), expected \(batch, 1, 5, 5\)",
        ),
        ({"edit": _reshape("map", (-1, 25))}, r"tensor 'map' has shape \(-1, 25\)"),
    ],
)
def test_an_engine_that_does_not_fit_the_pipeline_is_refused_at_load(
    standin: Callable[..., None], tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    standin(**kwargs)
    with pytest.raises(BundleError, match=r"engine .*r0c0\.engine: " + message):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


def test_a_plan_tensorrt_cannot_deserialize_is_a_clear_error(standin: Callable[..., None], tmp_path: Path) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    standin(refuse=("deserialize_cuda_engine",))
    with pytest.raises(BundleError, match=r"engine .*r0c0\.engine: TensorRT 11\.4\.0\.106 cannot deserialize it"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


def test_a_profile_with_a_larger_max_batch_loads(standin: Callable[..., None], tmp_path: Path) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID, batch=(1, 4, 8))
    standin(profile=(1, 4, 8))
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        assert len(trt.predict(_images(3, 64, 64))) == 3  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 5), h=st.sampled_from([59, 60, 61]), w=st.sampled_from([59, 60, 61]), c=st.sampled_from([1, 3, 4])
)
def test_upload_takes_only_images_of_the_grid(n: int, h: int, w: int, c: int) -> None:
    """The C++ boundary check DevicePipeline.upload runs (the stand-in calls the same function)."""
    grid = _kernels.Grid(60, 60, 40, 40, 24, 24, _kernels.EDGE_PAD)
    images = np.zeros((n, h, w, c), np.uint8)
    if 1 <= n <= 4 and (h, w, c) == (60, 60, 3):
        _kernels.check_pipeline_images(grid, 3, 4, images)
    else:
        with pytest.raises(ValueError, match=r"images: (batch of \d+ images, expected 1 to 4|expected shape)"):
            _kernels.check_pipeline_images(grid, 3, 4, images)


def test_upload_check_names_dtype_layout_and_rank() -> None:
    grid = _kernels.Grid(60, 60, 40, 40, 24, 24, _kernels.EDGE_PAD)
    with pytest.raises(ValueError, match="images: expected dtype uint8, got float32"):
        _kernels.check_pipeline_images(grid, 3, 4, np.zeros((1, 60, 60, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _kernels.check_pipeline_images(grid, 1, 4, np.zeros((1, 60, 60, 2), np.uint8)[..., :1])
    with pytest.raises(ValueError, match=r"images: expected \(n, height, width, channels\) uint8, got \(60, 60, 3\)"):
        _kernels.check_pipeline_images(grid, 3, 4, np.zeros((60, 60, 3), np.uint8))


# -- #18.4: lean runtime and version compatibility ------------------------------------------------


@pytest.mark.parametrize("compatible", [True, False])
def test_host_code_is_allowed_for_version_compatible_plans_only(
    standin: Callable[..., None], tmp_path: Path, compatible: bool
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID, compatible=compatible)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        assert inner._runtime.engine_host_code_allowed is compatible


def test_an_engine_set_of_another_tensorrt_version_is_not_selected(
    standin: Callable[..., None], tmp_path: Path
) -> None:
    """A set built by 11.4 is refused by an 11.5 lean runtime (the plans exclude the lean runtime)."""
    bundle = engine_bundle(tmp_path / "b", GRID)
    standin(version="11.5.0.1")
    with pytest.raises(TensorRTUnavailableError, match=r"no TensorRT engines for Fake GPU .*TensorRT 11\.5\.0\.1"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


# -- stand-in fidelity: shift, pad and resize bundles; a builder that fails -----------------------


@pytest.mark.parametrize("edge", ["shift", "pad", "resize"])
def test_shift_pad_and_resize_bundles_match_onnxruntime(
    standin: Callable[..., None], tmp_path: Path, edge: str
) -> None:
    grid_data = EDGE_GRIDS[edge]
    size = 64 if edge == "shift" else 60
    bundle = engine_bundle(tmp_path / edge, grid_data)
    images = _images(3, size, size, seed=1)
    with Predictor(bundle, max_batch=4) as cpu:
        want = cpu.predict(images)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(images)
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        calls = inner.pipeline.calls
    assert ("resize" in calls) == (edge == "resize")
    assert isinstance(want, list)
    assert isinstance(got, list)
    for g, w in zip(got, want, strict=True):
        assert g.anomaly_map.shape == (size, size)
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=1e-5)
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.score == pytest.approx(w.score, abs=1e-5)


def test_stage_times_input_order_and_location_maps_through_the_standin(
    standin: Callable[..., None], tmp_path: Path
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    images = _images(3, 64, 64, seed=4)
    rgb = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    with Predictor(bundle, max_batch=4) as cpu:
        want = cpu.predict(images)
        want_maps = cpu.location_maps(images)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        timed, times = trt.predict_timed(images)
        swapped = trt.predict(rgb, input_order="RGB")
        maps = trt.location_maps(images)
        rgb_maps = trt.location_maps(rgb, input_order="RGB")
        as_bgr = trt.location_maps(rgb)  # the same pixels read as BGR: other maps
    assert isinstance(want, list)
    assert isinstance(swapped, list)
    for t, s, w in zip(timed, swapped, want, strict=True):
        np.testing.assert_allclose(t.anomaly_map, w.anomaly_map, atol=1e-5)
        np.testing.assert_allclose(s.anomaly_map, w.anomaly_map, atol=1e-5)
    np.testing.assert_allclose(maps, want_maps, atol=1e-5)
    np.testing.assert_allclose(rgb_maps, want_maps, atol=1e-5)
    assert np.abs(as_bgr - want_maps).max() > 1e-3
    stages = set(times.seconds)
    assert {"input", "h2d", "tile", "inference", "untile", "seam", "crop", "normalize", "d2h"} <= stages
    assert {"location:r0c0", "location:r0c1", "location:r1c0", "location:r1c1"} <= stages
    assert all(v >= 0.0 for v in times.seconds.values())


def test_a_nan_location_is_named_through_the_standin(standin: Callable[..., None], tmp_path: Path) -> None:
    from bundle_factory import manifest_data, onnx_model

    from tilead.runtime.bundle import write_manifest

    root = tmp_path / "nan"
    make_bundle(root)
    (root / "tiles" / "r0c1.onnx").write_bytes(onnx_model(float("nan")))  # every map value of r0c1 is NaN
    write_manifest(root, manifest_data(root))
    manifest = read_manifest(root)
    key = engine_key(GPU, CC, VERSION, "fp32", 4, [loc.sha256 for loc in manifest.locations])
    files = []
    for loc in manifest.locations:
        target = root / "engines" / key / f"{loc.name}.engine"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / loc.file, target)
        files.append(
            EngineFile(loc.name, f"engines/{key}/{loc.name}.engine", sha256_file(target), target.stat().st_size)
        )
    add_engine_set(root, EngineSet(key, GPU, CC, VERSION, "fp32", (1, 4, 4), 256, True, None, tuple(files)))
    with Predictor(root, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(_images(2, 64, 64, seed=3))
    assert isinstance(got, list)
    for p in got:
        assert p.error == "non-finite model output (NaN or infinity) at location r0c1 (map)"
        assert p.label is True
        assert p.score == 1.0
        assert np.isnan(p.raw_score)


# -- the real DevicePipeline (CUDA): skipped without a usable GPU, run by the first GPU session ---------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_status().usable, reason="no usable CUDA device (the stand-in tests above ran instead)")
def test_cuda_pipeline_blocks_are_aligned_and_untile_reads_the_padded_stride() -> None:
    """58x58 maps (13456 bytes, not a multiple of 256): the padded layout must still untile like the CPU twin."""
    grid = _kernels.Grid(200, 200, 100, 100, 100, 100, _kernels.EDGE_SHIFT)
    pipe = _kernels.cuda.DevicePipeline(
        grid, 3, 3, 3, [1.0] * 3, [0.0] * 3, 58, 58, _kernels.BLEND_UNIFORM, [], [], 0.0, 0.0, _kernels.NORM_NONE,
        0.5, 0.0, 1.0, 0.5, 0.0, 1.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        assert pipe.tiles_stride(n) % 256 == 0
        assert pipe.maps_stride(n) % 256 == 0
        assert all(pipe.tiles_address(loc, n) % 256 == 0 for loc in range(4))
        assert all(pipe.maps_address(loc, n) % 256 == 0 for loc in range(4))
        maps = rng.random((4, n, 58, 58), dtype=np.float32)
        pipe.upload_location_maps(maps)
        np.testing.assert_array_equal(pipe.download_location_maps(n), maps)
        for stage in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.normalize):
            stage(n)
        got = pipe.download(n)[0]
        want = np.empty((n, 200, 200), np.float32)
        _kernels.untile_maps(maps, grid, want, _kernels.BLEND_UNIFORM, None, None)
        np.testing.assert_allclose(got, want, atol=1e-5)
