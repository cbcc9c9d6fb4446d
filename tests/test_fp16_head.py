"""FP16 conversion for TensorRT 11 keeps the distance head in FP32 (issue #18, item 3).

The converted graph runs in the real ONNX Runtime on the CPU with every
intermediate tensor exposed as an output, so a test sees the values each
FP16-typed tensor takes: none may be non-finite or come near FP16's largest
finite value (65504), which TensorRT's strongly typed engines would overflow.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tilead.exporter.engines import distance_nodes, fp16_onnx_bytes  # noqa: E402

SAFE = 60000.0  # below FP16's largest finite value, 65504


def exposed(model_bytes: bytes) -> tuple[Any, dict[str, int]]:
    """A session over ``model_bytes`` with every float intermediate as an output, and each output's element type."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    made = {o for n in model.graph.node for o in n.output}
    have = {o.name for o in model.graph.output}
    for vi in model.graph.value_info:
        kind = vi.type.tensor_type.elem_type
        if kind in (TensorProto.FLOAT, TensorProto.FLOAT16) and vi.name in made and vi.name not in have:
            model.graph.output.append(vi)
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the graph as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), types


def fp16_extremes(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> tuple[float, str, dict[str, np.ndarray]]:
    """Largest |value| over every FP16-typed tensor (inf when any is non-finite), its tensor, and all outputs."""
    session, types = exposed(model_bytes)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    worst, where = 0.0, ""
    for name, value in values.items():
        if types[name] != TensorProto.FLOAT16 or value.size == 0:
            continue
        top = float(np.max(np.abs(value.astype(np.float64)))) if np.all(np.isfinite(value)) else float("inf")
        if top > worst:
            worst, where = top, name
    return worst, where, values


def mahalanobis_model(dim: int = 8) -> bytes:
    """A PaDiM-shaped graph: a backbone (Conv, Clip, Conv), then ``sqrt(clip(sum((x - mean) @ inv * (x - mean))))``.

    The Clip's lower bound is one initializer shared by the backbone and the head, as in tilead's real exports.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((dim, 3, 1, 1)).astype(np.float32), "embedding.w"),
        numpy_helper.from_array(np.eye(dim, dtype=np.float32).reshape(dim, dim, 1, 1), "embedding.w2"),
        numpy_helper.from_array(np.zeros(1, np.float32).reshape(()), "min_val"),
        numpy_helper.from_array(np.full((1, dim, 1, 1), 0.5, np.float32), "head.mean"),
        numpy_helper.from_array(np.eye(dim, dtype=np.float32) * 40.0, "head.inv"),
        numpy_helper.from_array(np.array([0, 2, 3, 1], np.int64), "perm_shape"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("Conv", ["tiles", "embedding.w"], ["feat"], name="conv"),
        helper.make_node("Clip", ["feat", "min_val"], ["act"], name="relu"),
        helper.make_node("Conv", ["act", "embedding.w2"], ["emb"], name="conv2"),
        helper.make_node("Sub", ["emb", "head.mean"], ["diff"], name="sub"),
        helper.make_node("Transpose", ["diff"], ["diff_t"], perm=[0, 2, 3, 1], name="t"),
        helper.make_node("MatMul", ["diff_t", "head.inv"], ["prod"], name="matmul"),
        helper.make_node("Mul", ["prod", "diff_t"], ["terms"], name="mul"),
        helper.make_node("ReduceSum", ["terms", "axis"], ["sq"], keepdims=0, name="sum"),
        helper.make_node("Clip", ["sq", "min_val"], ["sq_pos"], name="clamp"),
        helper.make_node("Sqrt", ["sq_pos"], ["dist"]),  # unnamed: distance_nodes names it
        helper.make_node("Unsqueeze", ["dist", "one"], ["map"], name="unsq"),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(
        nodes,
        "padim_like",
        [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["n", 1, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def test_distance_nodes_are_the_head_and_everything_after_it() -> None:
    model = onnx.load_from_string(mahalanobis_model())
    names = distance_nodes(model)
    assert names[:6] == ["sub", "t", "matmul", "mul", "sum", "clamp"]
    assert len(names) == 8
    assert names[-1] == "unsq"
    assert names[6].startswith("tilead_node_")  # the unnamed Sqrt got a unique name
    assert not {"conv", "relu", "conv2"} & set(names)


def test_distance_nodes_do_not_rely_on_head_names_alone() -> None:
    # The exporter's constant folding can rename head parameters (seen: "unsqueeze", "_to_copy_1"):
    # everything after the backbone's last layer is the head all the same.
    model = onnx.load_from_string(mahalanobis_model())
    for t in model.graph.initializer:
        t.name = t.name.replace("head.", "folded_")
    for n in model.graph.node:
        n.input[:] = [i.replace("head.", "folded_") for i in n.input]
    assert distance_nodes(model)[:6] == ["sub", "t", "matmul", "mul", "sum", "clamp"]


def test_a_graph_without_embedding_or_head_parameters_keeps_nothing() -> None:
    model = onnx.load_from_string(mahalanobis_model())
    for t in model.graph.initializer:
        t.name = t.name.replace("head.", "student.").replace("embedding.", "teacher.")
    for n in model.graph.node:
        n.input[:] = [i.replace("head.", "student.").replace("embedding.", "teacher.") for i in n.input]
    assert distance_nodes(model) == []


def test_fp16_head_stays_fp32_where_plain_fp16_overflows(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnxconverter_common import float16

    path = tmp_path / "m.onnx"
    path.write_bytes(mahalanobis_model())
    x = np.random.default_rng(1).uniform(-20, 20, (2, 3, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tiles": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()
        kept = fp16_onnx_bytes(path)
    # The test can fail: converted whole, the squared distances (> 65504) overflow to inf in FP16.
    worst_plain, _, _ = fp16_extremes(plain, {"tiles": x})
    assert worst_plain == float("inf")
    worst, where, values = fp16_extremes(kept, {"tiles": x})
    assert worst < SAFE, (worst, where)
    got = values["map"]
    assert got.dtype == np.float32
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-2)
    half = onnx.load_from_string(kept)
    conv_weight = next(t for t in half.graph.initializer if t.name == "embedding.w")
    assert conv_weight.data_type == TensorProto.FLOAT16  # the backbone did become FP16


def _real_tiles(run: Path, bundle: Path) -> np.ndarray:
    """Tiles ``(L, n, C, th, tw)`` of the tiny run's own test images, good and defective."""
    import cv2

    from tilead.runtime import tile_images
    from tilead.runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    paths = sorted((run.parent / "data" / "test").rglob("*.png"))
    assert paths, run.parent / "data" / "test"
    decoded = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    images = np.stack([d for d in decoded if d is not None])
    return tile_images(images, manifest.grid, manifest.preprocessing)


@pytest.mark.integration
def test_fp16_tilead_export_has_no_fp16_tensor_near_overflow_on_real_tiles(tiny_trained: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    run, bundle = tiny_trained
    tiles = _real_tiles(run, bundle)
    for index, path in enumerate(sorted((bundle / "tiles").glob("*.onnx"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the converter warns about every tiny weight it rounds
            half = fp16_onnx_bytes(path)
        x = np.ascontiguousarray(tiles[index], dtype=np.float32)
        worst, where, values = fp16_extremes(half, {"tiles": x})
        assert worst < SAFE, (path.name, worst, where)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tiles": x})[0]
        got = values["map"]
        assert np.all(np.isfinite(got))
        # FP16 backbone features, amplified by the inverse covariance: measured 1.7 % of the map range (r0c0).
        assert np.abs(got - want).max() <= 0.03 * np.ptp(want), path.name
        # The distance head really is FP32 in the converted graph.
        kept = set(distance_nodes(onnx.load(str(path))))
        assert kept
        model = onnx.shape_inference.infer_shapes(onnx.load_from_string(half))
        fp16_outputs = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
        head_outputs = {o for n in model.graph.node if n.name in kept for o in n.output}
        assert not head_outputs & fp16_outputs


def test_fp32_layer_names_for_tensorrt_10_name_the_head_nodes_outputs_and_parameters(tmp_path: Path) -> None:
    from tilead.exporter.engines import fp32_layer_names

    path = tmp_path / "m.onnx"
    path.write_bytes(mahalanobis_model())
    names = fp32_layer_names(path)
    assert {"sub", "matmul", "sum", "clamp", "unsq"} <= names  # nodes
    assert {"diff", "prod", "sq", "sq_pos", "dist", "map"} <= names  # their outputs (the last layer of each node)
    assert {"head.mean", "head.inv", "min_val", "axis", "one"} <= names  # constants the head reads
    assert not {"conv", "relu", "conv2", "feat", "act", "emb", "embedding.w", "embedding.w2"} & names
