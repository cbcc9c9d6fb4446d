"""uint8 tiles into OpenVINO's backbone (issue #21 item 3): the kernel, the compiled normalization, the bundles.

The tile kernel's uint8 twin (:func:`tilead.runtime.preprocess.tile_images_u8`) against its NumPy oracle
(:func:`reference.tile_u8`) and against the float kernel (normalizing its tiles gives the float tiles bit for
bit); OpenVINO's backbone compiled for uint8 tiles (:func:`tilead.runtime.backends.openvino.compile_backbone`)
against the float graph; the manifest's ``model.backbone_input`` (new bf16 bundles take uint8 tiles, older
ones keep float tiles) through the Predictor on the ``hybrid`` and ``openvino`` backends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference as ref
from bundle_factory import FEATURES, GRID, MAP_SIZE, make_shared_bundle
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GridCase, grids

from tilead import _kernels
from tilead.runtime import Predictor, Preprocessing, TileGrid, tile_images
from tilead.runtime.bundle import parse_manifest, write_manifest
from tilead.runtime.devices import thread_budget
from tilead.runtime.preprocess import tile_images_u8, uint8_tiles_fit


def _cpu_has_bf16() -> bool:
    import openvino as ov

    from tilead.runtime.backends.openvino import has_bf16_units

    return has_bf16_units([str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")])


BF16 = _cpu_has_bf16()
NO_BF16_UNITS = "this CPU has no bfloat16 units: bf16 bundles are refused here (tests/test_bf16.py)"


# -- the kernel -------------------------------------------------------------------------------------------------


@st.composite
def u8_cases(draw: st.DrawFn) -> tuple[GridCase, int, int, str, str, np.ndarray, int]:
    case = draw(grids(max_size=40, edges=("shift", "pad")))
    n = draw(st.integers(1, 3))
    in_c = draw(st.sampled_from([1, 3]))
    out_c = 3 if in_c == 3 else draw(st.sampled_from([1, 3]))
    in_order = draw(st.sampled_from(["BGR", "RGB"]))
    model_order = draw(st.sampled_from(["BGR", "RGB"]))
    seed = draw(st.integers(0, 2**32 - 1))
    images = np.random.default_rng(seed).integers(0, 256, (n, *case.image, in_c), dtype=np.uint8)
    threads = draw(st.integers(1, 3))
    return case, in_c, out_c, in_order, model_order, images, threads


def _prep(out_c: int, order: str) -> Preprocessing:
    return Preprocessing((0.485, 0.456, 0.406)[:out_c], (0.229, 0.224, 0.225)[:out_c], out_c, order)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(u8_cases())
def test_uint8_tiles_match_the_reference(args: tuple[GridCase, int, int, str, str, np.ndarray, int]) -> None:
    """Every direct grid, channel count and order, thread count: the oracle's tiles, byte for byte."""
    case, in_c, out_c, in_order, model_order, images, threads = args
    grid = TileGrid(case.image, case.tile, case.stride, case.edge)
    with thread_budget(threads):
        got = tile_images_u8(images, grid, _prep(out_c, model_order), input_order=in_order)  # type: ignore[arg-type]
    want = ref.tile_u8(images, case.tile, case.stride, case.edge, out_c, in_c == 3 and in_order != model_order)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@settings(max_examples=80, deadline=None)
@given(u8_cases())
def test_a_list_of_images_gives_the_stacked_batchs_tiles(
    args: tuple[GridCase, int, int, str, str, np.ndarray, int],
) -> None:
    """The images of a batch tiled where they are (separate arrays, never stacked): the same bytes."""
    case, in_c, out_c, in_order, model_order, images, threads = args
    grid = TileGrid(case.image, case.tile, case.stride, case.edge)
    separate = [np.array(image[..., 0] if in_c == 1 and k % 2 else image) for k, image in enumerate(images)]
    with thread_budget(threads):
        got = tile_images_u8(separate, grid, _prep(out_c, model_order), input_order=in_order)  # type: ignore[arg-type]
    want = ref.tile_u8(images, case.tile, case.stride, case.edge, out_c, in_c == 3 and in_order != model_order)
    np.testing.assert_array_equal(got, want)


def test_a_list_of_images_is_checked_image_by_image() -> None:
    grid = TileGrid.from_dict(GRID)
    good = np.zeros((64, 64, 3), dtype=np.uint8)
    out = np.empty((grid.num_locations, 2, 40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least one image"):
        tile_images_u8([], grid, Preprocessing())
    with pytest.raises(ValueError, match=r"one channel count for the whole list, got \[1, 3\]"):
        tile_images_u8([good, np.zeros((64, 64), np.uint8)], grid, Preprocessing())
    with pytest.raises(ValueError, match="height x width 64 x 64"):
        tile_images_u8([good, good[:60]], grid, Preprocessing())
    # the binding checks each image too: its shape, dtype, and that it does not overlap the output
    with pytest.raises(ValueError, match=r"images\[1\]: expected shape \(64, 64, 3\)"):
        _kernels.tile_images_u8([good, np.zeros((64, 63, 3), np.uint8)], grid.native, out)
    with pytest.raises(ValueError, match=r"images\[1\]: expected dtype uint8"):
        _kernels.tile_images_u8([good, np.zeros((64, 64, 3), np.float32)], grid.native, out)
    with pytest.raises(ValueError, match=r"images\[0\]: expected 3 dimensions"):
        _kernels.tile_images_u8([good[None], good], grid.native, out)
    with pytest.raises(ValueError, match="out: expected"):
        _kernels.tile_images_u8([good], grid.native, out)  # one image, a two-image buffer
    alias = np.zeros(grid.num_locations * 2 * 40 * 40 * 3, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\] and out must not share memory"):
        _kernels.tile_images_u8(
            [good, alias[: 64 * 64 * 3].reshape(64, 64, 3)],
            grid.native,
            alias.reshape(grid.num_locations, 2, 40, 40, 3),
        )


@settings(max_examples=100, deadline=None)
@given(u8_cases())
def test_normalized_uint8_tiles_are_the_float_tiles_bit_for_bit(
    args: tuple[GridCase, int, int, str, str, np.ndarray, int],
) -> None:
    """``pixel * scale + bias`` of the uint8 tiles (float32, channels first) is what the float kernel writes."""
    case, _in_c, out_c, in_order, model_order, images, _threads = args
    grid = TileGrid(case.image, case.tile, case.stride, case.edge)
    prep = _prep(out_c, model_order)
    pixels = tile_images_u8(images, grid, prep, input_order=in_order)  # type: ignore[arg-type]
    floats = tile_images(images, grid, prep, input_order=in_order)  # type: ignore[arg-type]
    scale = np.asarray(prep.scale, dtype=np.float32)[:, None, None]
    bias = np.asarray(prep.bias, dtype=np.float32)[:, None, None]
    np.testing.assert_array_equal(np.moveaxis(pixels, 4, 2).astype(np.float32) * scale + bias, floats)


@pytest.mark.parametrize("edge", ["shift", "pad"])
def test_uint8_tiles_of_long_rows_match_the_reference(edge: str) -> None:
    """Rows far longer than the vector steps (16 bytes, 5 pixels) and tails of every length, channels swapped."""
    images = np.random.default_rng(9).integers(0, 256, (2, 61, 317, 3), dtype=np.uint8)
    grid = TileGrid((61, 317), (29, 113), (20, 97), edge)
    got = tile_images_u8(images, grid, Preprocessing(), input_order="BGR")
    np.testing.assert_array_equal(got, ref.tile_u8(images, (29, 113), (20, 97), edge, 3, True))


def test_uint8_tiles_write_into_a_given_buffer_and_reuse_it() -> None:
    grid = TileGrid.from_dict(GRID)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = np.full((grid.num_locations, 2, 40, 40, 3), 7, dtype=np.uint8)
    got = tile_images_u8(images, grid, Preprocessing(), input_order="RGB", out=out)
    assert got is out
    np.testing.assert_array_equal(out, ref.tile_u8(images, (40, 40), (24, 24), "shift", 3, False))


def test_uint8_tiles_refuse_resize_grids_and_bad_buffers() -> None:
    resize = TileGrid((50, 50), (20, 20), (20, 20), "resize")
    assert not uint8_tiles_fit(resize)
    assert uint8_tiles_fit(TileGrid((50, 50), (20, 20), (20, 20), "pad"))
    images = np.zeros((1, 50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="resize"):
        tile_images_u8(images, resize, Preprocessing())
    out = np.empty((resize.num_locations, 1, 20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="resize"):  # the binding refuses it too
        _kernels.tile_images_u8(images, resize.native, out)
    grid = TileGrid.from_dict(GRID)
    images = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="out"):
        tile_images_u8(images, grid, Preprocessing(), out=np.empty((4, 1, 40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="out"):
        tile_images_u8(images, grid, Preprocessing(), out=np.empty((4, 1, 3, 40, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 channel"):
        tile_images_u8(images, grid, Preprocessing(mean=(0.5,), std=(0.5,), channels=1))
    with pytest.raises(ValueError, match="GRAY"):
        tile_images_u8(images, grid, Preprocessing(), input_order="GRAY")


# -- the export's inverse ---------------------------------------------------------------------------------------


def test_pixels_of_recovers_the_uint8_tiles_and_refuses_other_values() -> None:
    from tilead.exporter.bf16 import pixels_of

    grid = TileGrid.from_dict(GRID)
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prep = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    floats = tile_images(images, grid, prep, input_order="BGR")
    pixels = tile_images_u8(images, grid, prep, input_order="BGR")
    for loc in range(grid.num_locations):
        np.testing.assert_array_equal(pixels_of(floats[loc], prep), pixels[loc])
    shifted = floats[0].copy()
    shifted[0, 0, 0, 0] += 0.25 * prep.scale[0]  # between two levels: not a pixel
    with pytest.raises(ValueError, match="not normalized uint8 pixels"):
        pixels_of(shifted, prep)


# -- the manifest -----------------------------------------------------------------------------------------------


def _mark(bundle: Path, backbone_input: str | None, precision: str = "bf16") -> Path:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    data.pop("manifest_sha256", None)
    data["model"]["precision"] = precision
    data["model"].pop("backbone_input", None)
    if backbone_input is not None:
        data["model"]["backbone_input"] = backbone_input
    write_manifest(bundle, data)
    return bundle


def conv_backbone() -> bytes:
    """A channel-sensitive backbone for :func:`bundle_factory.make_shared_bundle`.

    A 3x3 convolution with zero padding (3 -> FEATURES channels, each input channel its own weight), then
    average pooling to the map size.
    """
    import onnx
    from onnx import TensorProto, helper

    th, tw = TileGrid.from_dict(GRID).tile_size
    k = [th // MAP_SIZE[0], tw // MAP_SIZE[1]]
    weights = np.random.default_rng(5).uniform(-1, 1, (FEATURES, 3, 3, 3)).astype(np.float32)
    weights[:, 0] *= 3.0  # red and blue weigh differently: a channel swap shows
    nodes = [
        helper.make_node("Conv", ["tiles", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["conv"], ["features"], kernel_shape=k, strides=k),
    ]
    graph = helper.make_graph(
        nodes,
        "backbone",
        [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["n", 3, th, tw])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", FEATURES, *MAP_SIZE])],
        initializer=[onnx.numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(bf16 float tiles, bf16 uint8 tiles)``: the same synthetic shared bundle with a convolution backbone."""
    root = tmp_path_factory.mktemp("u8")
    old = _mark(make_shared_bundle(root / "float", backbone=conv_backbone()), None)
    new = _mark(Path(shutil.copytree(old, root / "uint8")), "uint8")
    return old, new


def test_manifest_backbone_input_is_checked(bundles: tuple[Path, Path]) -> None:
    old, new = bundles
    data = json.loads((new / "manifest.json").read_text())
    assert parse_manifest(data).backbone_input == "uint8"
    assert parse_manifest(json.loads((old / "manifest.json").read_text())).backbone_input == "float32"
    for value, match in (("uint16", "backbone_input"), (8, "backbone_input")):
        bad = json.loads(json.dumps(data))
        bad["model"]["backbone_input"] = value
        with pytest.raises(ValueError, match=match):
            parse_manifest(bad)
    fp32 = json.loads(json.dumps(data))
    fp32["model"]["precision"] = "fp32"
    with pytest.raises(ValueError, match="only bf16 bundles"):
        parse_manifest(fp32)
    resized = json.loads(json.dumps(data))
    resized["grid"]["edge"] = "resize"
    with pytest.raises(ValueError, match="resize"):
        parse_manifest(resized)


# -- OpenVINO ---------------------------------------------------------------------------------------------------


def test_compiled_normalization_matches_the_float_graph_in_f32() -> None:
    """In f32, the backbone on uint8 tiles (normalized in the model) gives the float graph's features on float tiles."""
    import openvino as ov

    from tilead.runtime.backends.openvino import compile_backbone

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    grid = TileGrid.from_dict(GRID)
    prep = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    core = ov.Core()
    onnx = conv_backbone()
    floats = compile_backbone(core, onnx, config, prep, grid.tile_size, False)
    pixels = compile_backbone(core, onnx, config, prep, grid.tile_size, True)
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tiles = tile_images(images, grid, prep, input_order="BGR")[:, 0]
    want = floats.run(np.ascontiguousarray(tiles))[0]
    got = pixels.run(tile_images_u8(images, grid, prep, input_order="BGR")[:, 0])[0]
    span = float(want.max() - want.min())
    assert float(np.abs(got - want).max()) <= 1e-5 * span
    swapped = pixels.run(tile_images_u8(images, grid, prep, input_order="RGB")[:, 0])[0]
    assert float(np.abs(swapped - want).max()) > 1e-3 * span  # the channel order reaches the features


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
@pytest.mark.parametrize("backend", ["hybrid", "openvino"])
def test_uint8_bundles_take_uint8_tiles_and_older_ones_float_tiles(bundles: tuple[Path, Path], backend: str) -> None:
    """Both paths through the Predictor: the backend says which tiles it takes; maps agree within bf16 rounding."""
    old, new = bundles
    images = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with Predictor(old, backend=backend, threads=2) as before, Predictor(new, backend=backend, threads=2) as after:
        assert not before._open().uint8_tiles  # type: ignore[attr-defined]
        assert after._open().uint8_tiles  # type: ignore[attr-defined]
        want, got = before.location_maps(images), after.location_maps(images)
        one_by_one = np.concatenate([after.location_maps(images[i : i + 1]) for i in range(3)], axis=1)
        separate = after.location_maps([image.copy() for image in images])  # a list: tiled where each image is
        results = after.predict(images)
    span = float(want.max() - want.min())
    assert float(np.abs(got - want).max()) <= 2e-2 * span  # bf16 keeps 8 bits; the two round differently
    np.testing.assert_array_equal(one_by_one, got)  # stacked, streamed or one image: the same features
    np.testing.assert_array_equal(separate, got)
    assert isinstance(results, list)
    assert len(results) == 3


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_hybrid_uint8_stream_equals_the_whole_batch(bundles: tuple[Path, Path]) -> None:
    """Tiles made a few images at a time give ``infer``'s maps on all the uint8 tiles at once."""
    from tilead.runtime.backends.base import TileStream

    images = np.random.default_rng(4).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    with Predictor(bundles[1], threads=2, location_workers=2) as p:
        backend: Any = p._open()
        m = p.manifest
        whole = np.array(backend.infer(tile_images_u8(images, m.grid, m.preprocessing))[0])

        def fill(lo: int, hi: int) -> np.ndarray:
            return tile_images_u8(images[lo:hi], m.grid, m.preprocessing)

        streamed = np.array(backend.infer_stream(TileStream(len(images), 2, fill))[0])
    np.testing.assert_array_equal(streamed, whole)


@pytest.mark.skipif(not BF16, reason=NO_BF16_UNITS)
def test_a_uint8_backbone_refuses_float_tiles_and_the_other_way_round(bundles: tuple[Path, Path]) -> None:
    """Tiles of the wrong kind are a clear error, not a silent conversion."""
    images = np.random.default_rng(6).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    with Predictor(bundles[0], threads=1) as before, Predictor(bundles[1], threads=1) as after:
        m = after.manifest
        floats = tile_images(images, m.grid, m.preprocessing)
        pixels = tile_images_u8(images, m.grid, m.preprocessing)
        with pytest.raises(ValueError, match=r"expected uint8 \(n, 40, 40, 3\), got float32"):
            after._open().infer(floats)  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match=r"expected float32 \(n, 3, 40, 40\), got uint8"):
            before._open().infer(pixels)  # type: ignore[attr-defined]
