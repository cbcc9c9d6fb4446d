"""OpenVINO on PaDiM-like fp16 heads (issue #21): the rows stored transposed once, the same products.

Real graphs built with ``onnx.helper``, chunked by the exporter's own rewrite
(:func:`tilead.exporter.compact_heads.chunk_fp16_products`), compiled by the real
OpenVINO CPU plugin and checked against the real ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tilead.exporter.compact_heads import chunk_fp16_products
from tilead.runtime.backends.onnxruntime import load_session
from tilead.runtime.backends.openvino import pretranspose_fp16_products

ov = pytest.importorskip("openvino")


def _head(path: Path, positions: int, r: int, c: int) -> None:
    """``y = x (P, n, r) @ widen(rows fp16 (P, r, c)) + 1``, as the exporter writes PaDiM's Mahalanobis rows."""
    rows = np.random.default_rng(0).standard_normal((positions, r, c)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["rows"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "wide"], ["product"]),
            helper.make_node("Add", ["product", "one"], ["y"]),
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [positions, "n", r])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [positions, "n", c])],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.ones((1,), np.float32), "one")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _layers(compiled: object) -> list[str]:
    runtime = compiled.get_runtime_model()  # type: ignore[attr-defined]
    return [str(op.get_rt_info()["layerType"].astype(str)) for op in runtime.get_ordered_ops()]


@pytest.mark.parametrize(("positions", "r", "c", "chunk_bytes"), [(37, 3, 5, 60), (64, 8, 16, 4 << 20), (9, 1, 4, 1)])
def test_pretransposed_rows_give_onnxruntimes_products_without_per_call_transposes(
    tmp_path: Path, positions: int, r: int, c: int, chunk_bytes: int
) -> None:
    path = tmp_path / "head.onnx"
    _head(path, positions, r, c)
    chunks = chunk_fp16_products(path, chunk_bytes)
    assert chunks == 1
    model = path.read_bytes()
    x = np.random.default_rng(1).standard_normal((positions, 3, r)).astype(np.float32)
    want = load_session(ort, model, ["CPUExecutionProvider"], 1).run(["y"], {"x": x})[0]

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    plain = core.read_model(model=model)
    graph = core.read_model(model=model)
    products = sum(1 for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul")
    assert pretranspose_fp16_products(graph) == products > 0
    assert pretranspose_fp16_products(graph) == 0  # rewritten products are left alone
    before, after = core.compile_model(plain, "CPU", config), core.compile_model(graph, "CPU", config)
    got = np.asarray(after.create_infer_request().infer([x])[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(before.create_infer_request().infer([x])[0]), want, rtol=1e-5, atol=1e-5)
    # The plugin transposed the widened rows at each call; after the rewrite it has nothing to transpose.
    assert _layers(after).count("Transpose") == 0
    assert _layers(before).count("Transpose") >= (1 if r > 1 else 0)


def test_graphs_without_fp16_rows_are_left_alone(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "rows"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "n", 5])],
        [numpy_helper.from_array(np.ones((4, 3, 5), np.float32), "rows")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert pretranspose_fp16_products(ov.Core().read_model(model=model.SerializeToString())) == 0
