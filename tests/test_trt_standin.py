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
from tilead.runtime import BundleError, Predictor, cuda_status
from tilead.runtime.backends import tensorrt as backend
from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError
from tilead.runtime.bundle import read_manifest, write_manifest

GPU, CC, VERSION = fake_tensorrt.GPU, fake_tensorrt.CC, fake_tensorrt.VERSION
EDGE_GRIDS = {
    "shift": GRID,
    # 60 px with 40 px tiles at stride 24: a 64 px canvas, so pad crops and resize resizes.
    "pad": {"image_size": [60, 60], "tile_size": [40, 40], "stride": [24, 24], "edge": "pad"},
    "resize": {"image_size": [60, 60], "tile_size": [40, 40], "stride": [24, 24], "edge": "resize"},
}


def engine_bundle(
    root: Path,
    grid_data: dict[str, Any],
    batch: tuple[int, int, int] = (1, 4, 4),
    *,
    compatible: bool = True,
    detector: bool = False,
) -> Path:
    """A factory bundle with a "TensorRT" engine set whose plans are its ONNX models."""
    make_bundle(root, grid_data=grid_data, detector=detector)
    fake_tensorrt.add_engine_copies(root, batch, compatible=compatible)
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


def _post(seam: Any, mode: int) -> Any:
    """A PostSpec: uniform blending, no per-location normalization, ``seam``, thresholds 0.5 on the range [0, 1]."""
    norm = _kernels.NormSpec(mode, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0)
    return _kernels.PostSpec(_kernels.BLEND_UNIFORM, [], [], seam, norm)


def _pipeline(image: int, tile: int, stride: int, map_size: int, max_batch: int) -> fake_tensorrt.FakePipeline:
    grid = _kernels.Grid(image, image, tile, tile, stride, stride, _kernels.EDGE_SHIFT)
    post = _post(_kernels.SeamSpec.off(), _kernels.NORM_NONE)
    return fake_tensorrt.FakePipeline(grid, max_batch, 3, 3, [1.0] * 3, [0.0] * 3, map_size, map_size, post)


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


@pytest.mark.parametrize("seam", [{"sigma": 2.0, "width": 0.2}, {"sigma": 0.0, "width": 0.2}, None])
def test_the_device_pipeline_gets_the_bundles_post_spec(
    standin: Callable[..., None], tmp_path: Path, seam: dict[str, float] | None
) -> None:
    """#15.2: the pipeline is built from the PostProcessor's one spec; seams on (or off) as on ONNX Runtime."""
    import json

    bundle = engine_bundle(tmp_path / "b", GRID)
    data = json.loads((bundle / "manifest.json").read_text())
    data["postprocess"] = {**data["postprocess"], "weights": "uniform", "seam": seam}
    write_manifest(bundle, data)
    images = _images(2, 64, 64, seed=4)
    with Predictor(bundle, max_batch=4) as cpu:
        want = cpu.predict(images)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(images)
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        assert inner.pipeline.post == trt.post.native()
        assert inner.pipeline.seam.enabled == (seam is not None and seam["sigma"] > 0)
    assert isinstance(want, list)
    assert isinstance(got, list)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=1e-5)
        np.testing.assert_array_equal(g.mask, w.mask)


# -- #18.6: one context-memory block for every engine ---------------------------------------------


def test_every_context_uses_one_shared_block_of_the_largest_size(standin: Callable[..., None], tmp_path: Path) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        sizes = [int(e.device_memory_size_v2) for e in inner._engines]
        assert len(set(sizes)) > 1  # the stand-in's engines differ, so "the largest" is a real choice
        memories = {ctx.memory for ctx in inner._contexts}
        assert all(ctx.strategy == "USER_MANAGED" for ctx in inner._contexts)
        assert memories == {(inner.pipeline.bases["context"], max(sizes))}
        assert inner.pipeline.context_requests == [max(sizes)]
        # The figure the backend reports holds the one shared block, not one block per engine.
        assert trt.device_memory_bytes == inner.pipeline.device_bytes
        assert inner.pipeline.context.nbytes >= max(sizes)
        assert trt.device_memory_bytes < inner.pipeline.tiles.nbytes + inner.pipeline.maps.nbytes + sum(sizes)
        trt.predict(_images(2, 64, 64))  # a context without memory set would refuse to enqueue


# -- #18.7: CUDA graphs, captured once per batch size and channel order, replayed -------------------


_assert_same = fake_tensorrt.assert_same_predictions


def test_graphs_are_captured_once_per_batch_size_and_replays_equal_no_graphs(
    standin: Callable[..., None], tmp_path: Path
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    calls = [(2, 0, "BGR"), (2, 1, "BGR"), (1, 2, "BGR"), (2, 3, "BGR"), (1, 4, "BGR"), (2, 5, "RGB"), (2, 6, "RGB")]
    with (
        Predictor(bundle, max_batch=4) as cpu,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as on,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4, cuda_graphs=False) as off,
    ):
        graph, plain = on._backend, off._backend
        assert isinstance(graph, backend.TensorRTBackend)
        assert isinstance(plain, backend.TensorRTBackend)
        for n, seed, order in calls:
            images = _images(n, 64, 64, seed=seed)  # new images every call: a replay must read them
            want = cpu.predict(images, input_order=order)  # type: ignore[arg-type]
            _assert_same(on.predict(images, input_order=order), want)  # type: ignore[arg-type]
            _assert_same(off.predict(images, input_order=order), want)  # type: ignore[arg-type]
        # Keys (2, BGR), (1, BGR), (2, RGB): each captured once, after its first (stage-by-stage) run.
        assert graph.pipeline.captures == graph.graphs_captured == 3
        assert graph.pipeline.launches == len(calls) - 3
        assert graph.graph_error is None
        assert plain.pipeline.captures == plain.pipeline.launches == plain.graphs_captured == 0
        # Before a replay the contexts get that batch size's shapes back (TensorRT keeps shape state in them).
        assert {ctx.shape[0] for ctx in graph._contexts} == {2}
        on.predict(_images(1, 64, 64, seed=8))
        assert {ctx.shape[0] for ctx in graph._contexts} == {1}
        assert graph.pipeline.launches == len(calls) - 3 + 1
        # A replay is one launch between the host copies: no stage of its own on the stream.
        graph.pipeline.calls.clear()
        on.predict(_images(2, 64, 64, seed=7))
        assert graph.pipeline.calls == ["use_device", "stage", "launch", "fetch"]


def test_any_sequence_of_batches_replays_like_no_graphs(standin: Callable[..., None], tmp_path: Path) -> None:
    """Property: any order of batch sizes and channel orders gives the results of no graphs, one capture each."""
    bundle = engine_bundle(tmp_path / "b", GRID)
    seen: set[tuple[int, str]] = set()
    with (
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as on,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4, cuda_graphs=False) as off,
    ):
        inner = on._backend
        assert isinstance(inner, backend.TensorRTBackend)

        @settings(max_examples=25, deadline=None)
        @given(
            st.lists(
                st.tuples(st.integers(1, 4), st.sampled_from(["BGR", "RGB"]), st.integers(0, 1 << 16)),
                min_size=1,
                max_size=6,
            )
        )
        def check(calls: list[tuple[int, str, int]]) -> None:
            for n, order, seed in calls:
                images = _images(n, 64, 64, seed=seed)
                _assert_same(on.predict(images, input_order=order), off.predict(images, input_order=order))  # type: ignore[arg-type]
                seen.add((n, order))
                assert inner.pipeline.captures == len(seen)

        check()


def test_a_replayed_batch_is_one_graph_stage_when_timed(standin: Callable[..., None], tmp_path: Path) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    images = _images(2, 64, 64)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        first, times = trt.predict_timed(images)
        assert {"tile", "inference", "untile", "normalize"} <= set(times.seconds)
        again, times = trt.predict_timed(images)
        assert {"h2d", "graph", "d2h"} <= set(times.seconds)
        assert not {"tile", "inference", "untile"} & set(times.seconds)
    _assert_same(again, first)


@pytest.mark.parametrize("where", ["begin", "end", "engine"])
def test_a_capture_that_fails_is_logged_once_and_the_backend_runs_without_graphs(
    standin: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID)
    if where == "engine":
        standin(refuse=("capture",))  # execute_async_v3 returns False while the stream is captured
    else:
        monkeypatch.setattr(fake_tensorrt.FakePipeline, "fail_capture", where)
    with (
        Predictor(bundle, max_batch=4) as cpu,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt,
        caplog.at_level("WARNING", logger="tilead.runtime.backends.tensorrt"),
    ):
        for n, seed in ((2, 0), (2, 1), (1, 2), (3, 3)):
            images = _images(n, 64, 64, seed=seed)
            _assert_same(trt.predict(images), cpu.predict(images))
        inner = trt._backend
        assert isinstance(inner, backend.TensorRTBackend)
        assert inner.pipeline.capturing is None  # the failed capture was ended: the stream works on
        assert inner.graphs_captured == 0
        assert inner.pipeline.launches == 0
        assert inner.graph_error is not None
        assert inner.graph_error.startswith("batch 2: ")
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1
    expected = {"begin": "cudaStreamBeginCapture", "end": "cudaStreamEndCapture", "engine": "failed to enqueue"}
    assert expected[where] in warnings[0].getMessage()


def test_graphs_are_off_for_other_backends_without_complaint(tmp_path: Path) -> None:
    """The keyword is part of the Predictor's signature; ONNX Runtime accepts and ignores it."""
    bundle = make_bundle(tmp_path / "b", grid_data=GRID)
    images = _images(2, 64, 64)
    with Predictor(bundle, cuda_graphs=True) as a, Predictor(bundle, cuda_graphs=False) as b:
        _assert_same(a.predict(images), b.predict(images))


def test_bench_compares_graphs_on_and_off_and_reports_device_memory(
    standin: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tilead-bench --cuda-graphs compare`` on the stand-in: two routes, device memory around the load."""
    import json

    from click.testing import CliRunner

    from tilead.benchmarking import environment
    from tilead.cli.bench import main

    bundle = engine_bundle(tmp_path / "b", GRID)
    readings = iter([1000.0, 900.0, 990.0])  # free MiB: before load, after warm-up, after close (no GPU here)
    monkeypatch.setattr(environment, "cuda_free_memory_mib", lambda index=0: next(readings))
    out = tmp_path / "bench.json"
    args = [str(bundle), "--backend", "tensorrt", "--device", "cuda", "--batch", "1,2", "--iterations", "3"]
    result = CliRunner().invoke(main, [*args, "--cuda-graphs", "compare", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = ["tilead tensorrt (CUDA graphs)", "tilead tensorrt (no CUDA graphs)"]
    assert [t["name"] for t in report["targets"]] == names
    assert [t["info"]["cuda_graphs"] for t in report["targets"]] == ["on", "off"]
    for res in report["results"]:
        assert list(res["targets"]) == names
        assert all(res["targets"][n]["queries"] == 3 for n in names)
    dev = report["memory"]["device"]
    assert (dev["free_before_load_mib"], dev["free_after_warmup_mib"], dev["free_after_close_mib"]) == (1000, 900, 990)
    assert dev["used_by_route_mib"] == 100
    assert dev["backend_reports_mib"] == report["targets"][0]["info"]["device_memory_mib"] > 0
    assert "device memory free 1000 MiB before loading, 900 after warm-up" in result.output
    assert report["settings"]["cuda_graphs"] == "compare"
    # --cuda-graphs compare is for the TensorRT backend only.
    refused = CliRunner().invoke(main, [str(bundle), "--cuda-graphs", "compare"])
    assert refused.exit_code == 2
    assert "--cuda-graphs compare times the TensorRT backend" in refused.output


# -- #18.8: the detector's own image score (second engine output) ---------------------------------


def test_detector_score_bundles_match_onnxruntime_with_and_without_graphs(
    standin: Callable[..., None], tmp_path: Path
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID, detector=True)
    assert read_manifest(bundle).image_score == "detector"
    with (
        Predictor(bundle, max_batch=4) as cpu,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as on,
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4, cuda_graphs=False) as off,
    ):
        assert on._backend is not None
        assert on._backend.capabilities.detector_score
        for n, seed in ((3, 0), (3, 1), (1, 2)):
            images = _images(n, 64, 64, seed=seed)
            want = cpu.predict(images)
            _assert_same(on.predict(images), want)
            _assert_same(off.predict(images), want)
            want_maps, want_scores = cpu.location_outputs(images)
            got_maps, got_scores = on.location_outputs(images)
            assert want_scores is not None
            assert got_scores is not None
            assert got_scores.shape == (4, n)
            np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
            np.testing.assert_allclose(got_maps, want_maps, atol=1e-5)
        inner = on._backend
        assert isinstance(inner, backend.TensorRTBackend)
        assert inner.pipeline.launches > 0  # the scores came through replayed graphs too
        addresses = [inner.pipeline.scores_address(loc, 3) for loc in range(4)]
        assert all(a % 256 == 0 for a in addresses)
        assert all(ctx.addresses["score"] == a for ctx, a in zip(inner._contexts, addresses, strict=True))


def test_the_detector_score_differs_from_the_map_max_and_decides_the_label(
    standin: Callable[..., None], tmp_path: Path
) -> None:
    """The factory's score output is the map max before merging: per image, max over tiles, not the merged map's."""
    bundle = engine_bundle(tmp_path / "b", GRID, detector=True)
    map_only = engine_bundle(tmp_path / "m", GRID)  # the same models without the score output
    images = _images(3, 64, 64, seed=4)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(images)
        _, tile_scores = trt.location_outputs(images)
    with Predictor(map_only, device="cuda", backend="tensorrt", max_batch=4) as trt:
        merged = trt.predict(images)
    assert isinstance(got, list)
    assert isinstance(merged, list)
    assert tile_scores is not None
    raw = np.array([p.raw_score for p in got])
    np.testing.assert_allclose(raw, tile_scores.max(axis=0), rtol=1e-6)
    assert np.all(raw > np.array([p.raw_score for p in merged]) + 1e-3)  # blending lowers the merged map's peak
    for g, m in zip(got, merged, strict=True):
        np.testing.assert_allclose(g.anomaly_map, m.anomaly_map, atol=1e-6)  # the maps are the same
        assert g.label == (g.score > 0.5)


def test_a_non_finite_detector_score_names_its_location(standin: Callable[..., None], tmp_path: Path) -> None:
    """The non-finite rule (#16) for the second output: anomalous, raw score NaN, the location and output named."""
    bundle = engine_bundle(tmp_path / "b", GRID, detector=True)
    made: list[fake_tensorrt.FakeEngine] = []

    class NanScore:
        def __init__(self, session: Any) -> None:
            self.session = session

        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = self.session.run(names, feeds)
            return [out[0], np.full_like(out[1], np.nan)]

    def poison_second(engine: fake_tensorrt.FakeEngine) -> None:
        made.append(engine)
        if len(made) == 2:  # r0c1
            engine.session = NanScore(engine.session)

    standin(edit=poison_second)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4) as trt:
        got = trt.predict(_images(2, 64, 64))
    assert isinstance(got, list)
    for p in got:
        assert p.label
        assert np.isnan(p.raw_score)
        assert p.error == "non-finite model output (NaN or infinity) at location r0c1 (score)"


def _drop_score(engine: fake_tensorrt.FakeEngine) -> None:
    engine.names = engine.names[:2]
    engine.num_io_tensors = 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_score, r"expected one input and the output\(s\) \['map', 'score'\].*got inputs \['tiles'\] and "
                      r"outputs \['map'\]"),
        (_reshape("score", (-1, 1)), r"tensor 'score' has shape \(-1, 1\), expected \(batch,\): one score per tile"),
    ],
)  # fmt: skip
def test_a_detector_engine_without_a_fitting_score_output_is_refused_at_load(
    standin: Callable[..., None], tmp_path: Path, edit: Callable[[fake_tensorrt.FakeEngine], None], message: str
) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID, detector=True)
    standin(edit=edit)
    with pytest.raises(BundleError, match=r"engine .*r0c0\.engine: " + message):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


def test_a_map_only_bundle_refuses_an_engine_with_a_score_output(standin: Callable[..., None], tmp_path: Path) -> None:
    bundle = engine_bundle(tmp_path / "b", GRID, detector=True)
    data = dict(read_manifest(bundle).raw)
    data["postprocess"] = {**data["postprocess"], "image_score": "max"}
    data["model"] = {k: v for k, v in data["model"].items() if k != "score_output"}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=r"expected one input and the output\(s\) \['map'\]"):
        Predictor(bundle, device="cuda", backend="tensorrt", max_batch=4)


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
    fake_tensorrt.add_engine_copies(root)
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
    post = _post(_kernels.SeamSpec.off(), _kernels.NORM_NONE)
    pipe = _kernels.cuda.DevicePipeline(grid, 3, 3, 3, [1.0] * 3, [0.0] * 3, 58, 58, post)
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


def _real_pipeline(location_scores: bool = False) -> tuple[Any, Any]:
    grid = _kernels.Grid(200, 200, 100, 100, 100, 100, _kernels.EDGE_SHIFT)
    post = _post(_kernels.SeamSpec(1.5, 0.1), _kernels.NORM_MINMAX)
    return grid, _kernels.cuda.DevicePipeline(grid, 3, 3, 3, [1.0] * 3, [0.0] * 3, 58, 58, post, 0, location_scores)


def _cpu_result(maps: np.ndarray, grid: Any) -> tuple[np.ndarray, np.ndarray]:
    n = maps.shape[1]
    canvas = np.empty((n, 200, 200), np.float32)
    _kernels.untile_maps(maps, grid, canvas, _kernels.BLEND_UNIFORM, None, None)
    _kernels.smooth_seams(canvas, grid, _kernels.SeamSpec(1.5, 0.1))
    mask = np.empty((n, 200, 200), np.uint8)
    raw, scores = np.empty(n, np.float32), np.empty(n, np.float32)
    _kernels.normalize_maps(
        canvas, canvas, mask, raw, scores, _kernels.NormSpec(_kernels.NORM_MINMAX, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0)
    )
    return canvas, raw


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_status().usable, reason="no usable CUDA device (the stand-in tests above ran instead)")
def test_cuda_graph_replay_equals_the_stage_by_stage_run_and_reads_new_inputs() -> None:
    """#18.7 on the real pipeline: capture untile..download once, replay on new maps, compare with the CPU twins."""
    grid, pipe = _real_pipeline()
    rng = np.random.default_rng(1)
    first = rng.random((4, 2, 58, 58), dtype=np.float32)
    pipe.upload_location_maps(first)
    for stage in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.normalize):
        stage(2)
    eager = pipe.download(2)
    pipe.begin_capture()
    for stage in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.normalize, pipe.enqueue_download):
        stage(2)
    pipe.end_capture(7)
    assert pipe.has_graph(7)
    assert not pipe.has_graph(4)
    assert pipe.graph_count == 1
    pipe.launch(7)
    replay = pipe.fetch(2)
    for a, b in zip(eager, replay, strict=True):
        np.testing.assert_array_equal(a, b)
    second = rng.random((4, 2, 58, 58), dtype=np.float32)
    pipe.upload_location_maps(second)
    pipe.launch(7)
    maps, _, raw, _ = pipe.fetch(2)
    want_maps, want_raw = _cpu_result(second, grid)
    np.testing.assert_allclose(maps, want_maps, atol=1e-5)
    np.testing.assert_allclose(raw, want_raw, atol=1e-5)
    with pytest.raises(IndexError, match="no graph captured under key 3"):
        pipe.launch(3)
    pipe.abort_capture()  # none running: nothing happens
    pipe.begin_capture()
    with pytest.raises(RuntimeError, match="cudaStreamSynchronize"):
        pipe.synchronize()  # a host wait inside a capture fails (and invalidates it) ...
    pipe.abort_capture()  # ... and the stream works again once the capture is ended
    pipe.launch(7)
    np.testing.assert_allclose(pipe.fetch(2)[0], want_maps, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_status().usable, reason="no usable CUDA device (the stand-in tests above ran instead)")
def test_cuda_context_memory_score_blocks_and_memory_info() -> None:
    """#18.6 and #18.8 on the real pipeline: one aligned context block, aligned score blocks, cudaMemGetInfo."""
    free, total = _kernels.cuda.memory_info(0)
    assert 0 < free <= total
    _, pipe = _real_pipeline(location_scores=True)
    before = pipe.device_bytes
    address = pipe.context_memory(3 << 20)
    assert address % 256 == 0
    assert pipe.device_bytes == before + (3 << 20)
    assert pipe.context_memory(1 << 20) == address  # smaller requests reuse the block
    for n in (1, 2, 3):
        assert all(pipe.scores_address(loc, n) % 256 == 0 for loc in range(4))
    assert pipe.download_location_scores(3).shape == (4, 3)
    _, plain = _real_pipeline()
    with pytest.raises(RuntimeError, match="location_scores"):
        plain.scores_address(0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_status().usable, reason="no usable CUDA device (the stand-in tests above ran instead)")
def test_cuda_normalize_takes_more_images_than_grid_dim_y_allows() -> None:
    """#18.6: 70000 images (gridDim.y is at most 65535): the kernel loops over the rest, like the CPU twin."""
    n = 70_000
    maps = np.random.default_rng(2).random((n, 2, 3), dtype=np.float32)
    norm = _kernels.NormSpec(_kernels.NORM_MINMAX, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0)
    out, want_out = np.empty((n, 2, 3), np.float32), np.empty((n, 2, 3), np.float32)
    mask, want_mask = np.empty((n, 2, 3), np.uint8), np.empty((n, 2, 3), np.uint8)
    raw, want_raw = np.empty(n, np.float32), np.empty(n, np.float32)
    scores, want_scores = np.empty(n, np.float32), np.empty(n, np.float32)
    _kernels.cuda.normalize_maps(maps, out, mask, raw, scores, norm)
    _kernels.normalize_maps(maps, want_out, want_mask, want_raw, want_scores, norm)
    np.testing.assert_allclose(raw, want_raw)  # every image's score, the ones past 65535 too
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    np.testing.assert_allclose(out, want_out, atol=1e-6)
    np.testing.assert_array_equal(mask, want_mask)
