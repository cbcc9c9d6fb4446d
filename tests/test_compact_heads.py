"""fp16 head state kept fp16 in memory (issue #21): the chunked rewrite, its marker and how the runtime loads it.

Real ONNX graphs built with ``onnx.helper`` and run through the real ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tilead.exporter.compact_heads import chunk_fp16_products
from tilead.runtime.backends.onnxruntime import (
    CONSTANT_FOLDING_KEY,
    folds_constants,
    load_session,
    model_metadata,
    session_options,
)


def _head(path: Path, positions: int = 37, r: int = 3, c: int = 5, dtype: int = TensorProto.FLOAT16) -> np.ndarray:
    """A PaDiM-like product: ``x (P, n, r)`` times the widened rows ``(P, r, c)``, then ``+ 1``; returns the rows."""
    rows = np.random.default_rng(0).standard_normal((positions, r, c)).astype(np.float16)
    init = numpy_helper.from_array(rows if dtype == TensorProto.FLOAT16 else rows.astype(np.float32), "rows")
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    nodes = [helper.make_node("MatMul", ["x", "rows"], ["product"])]
    if dtype == TensorProto.FLOAT16:
        nodes = [
            helper.make_node("Cast", ["rows"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "wide"], ["product"]),
        ]
    nodes.append(helper.make_node("Add", ["product", "one"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [positions, "n", r])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [positions, "n", c])],
        [init, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return rows


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = load_session(ort, model, ["CPUExecutionProvider"], 1)
    return np.asarray(session.run(["y"], {"x": x})[0])


@pytest.mark.parametrize("chunk_bytes", [1, 60, 4 << 20])
def test_chunked_products_give_the_same_bits_and_are_marked(tmp_path: Path, chunk_bytes: int) -> None:
    path = tmp_path / "head.onnx"
    rows = _head(path)
    before = path.read_bytes()
    x = np.random.default_rng(1).standard_normal((37, 4, 3)).astype(np.float32)
    want = _run(before, x)
    np.testing.assert_allclose(want, x @ rows.astype(np.float32) + 1, rtol=1e-5, atol=1e-5)
    assert folds_constants(before)
    assert chunk_fp16_products(path, chunk_bytes) == 1
    after = path.read_bytes()
    assert not folds_constants(after)
    assert model_metadata(after) == {CONSTANT_FOLDING_KEY: "off"}
    np.testing.assert_array_equal(_run(after, x), want)
    model = onnx.load(str(path))
    per_chunk = max(1, chunk_bytes // (3 * 5 * 4))
    chunks = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(chunks) == -(-37 // per_chunk)
    assert sum(i.dims[0] for i in chunks) == 37
    # Once marked, a second pass leaves the file alone.
    assert chunk_fp16_products(path, chunk_bytes) == 0
    assert path.read_bytes() == after


def test_graphs_without_widened_fp16_rows_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "fp32.onnx"
    _head(path, dtype=TensorProto.FLOAT)
    before = path.read_bytes()
    assert chunk_fp16_products(path) == 0
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunk_fp16_products(path, 0)


def test_an_unfolded_session_keeps_the_casts_a_folded_one_drops(tmp_path: Path) -> None:
    path = tmp_path / "head.onnx"
    _head(path)
    chunk_fp16_products(path, 60)
    kept = {}
    for fold in (True, False):
        options = session_options(ort, 1, cpu_only=False, fold=fold)
        options.optimized_model_filepath = str(tmp_path / f"optimized_{fold}.onnx")
        extra = {} if fold else {"disabled_optimizers": ["ConstantFolding"]}
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"], **extra)
        optimized = onnx.load(str(tmp_path / f"optimized_{fold}.onnx"))
        kept[fold] = sum(n.op_type == "Cast" for n in optimized.graph.node)
    assert kept == {True: 0, False: 37}  # 37 positions in chunks of 1: the fp16 rows stay fp16 in memory


_text = st.text(st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=60, deadline=None)
@given(props=st.dictionaries(_text, _text, max_size=4), doc=_text)
def test_model_metadata_reads_what_onnx_wrote(props: dict[str, str], doc: str) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    model = helper.make_model(graph, doc_string=doc)
    helper.set_model_props(model, props)
    assert model_metadata(model.SerializeToString()) == props


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_model_metadata_of_any_bytes_is_a_dict_never_an_exception(data: bytes) -> None:
    out = model_metadata(data)
    assert isinstance(out, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())
    assert folds_constants(data) == (out.get(CONSTANT_FOLDING_KEY) != "off")
