"""Head graphs that keep their fp16 state in fp16 in memory, at the speed of fp32 state (issue #21).

A PaDiM head stores its per-position block rows in fp16 and widens them with a
``Cast`` before each batched ``MatMul`` (``(P, n, r) x (P, r, c)``). ONNX
Runtime folds such a ``Cast`` of a constant at load: every head then holds an
fp32 copy, twice its file size (1.6 GB for 16 heads at 2048x2048 in 4x4 tiles
of 512). Loaded without constant folding it keeps the fp16 rows, but then
widens a whole row (up to 41 MB) on every call and reads it back from memory,
which is slower than reading the folded fp32 row.

:func:`chunk_fp16_products` rewrites each such product into chunks of
positions: ``Split`` the left operand along the positions, and per chunk
``Cast`` its slice of the fp16 rows (a separate initializer of at most
:data:`CHUNK_BYTES` once widened, small enough to stay in cache) and
``MatMul``; ``Concat`` the chunks. The products are per position, so the
result is the same to the bit. The graph is marked with the metadata
:data:`~tilead.runtime.backends.onnxruntime.CONSTANT_FOLDING_KEY` ``off``, which
tells the runtime's ONNX Runtime backend to load it without constant folding.
Resident per 2048x2048 head (4096 positions, 100 features): 53 MB instead
of 104 MB. Speed: ``benchmarks/bench_cpu_speed.py`` on a quiet CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tilead.runtime.backends.onnxruntime import CONSTANT_FOLDING_KEY, CONSTANT_FOLDING_OFF

CHUNK_BYTES = 4 << 20
"""Bytes of one chunk of a row once widened to fp32 (the cache-resident working set of one product)."""


def chunk_fp16_products(path: Path, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rewrite ``path`` in place: every ``MatMul`` by a widened fp16 3-D initializer runs in position chunks.

    A product qualifies when its right operand is ``Cast(to=float)`` of an fp16
    initializer of shape ``(P, r, c)`` used by nothing else, and its left
    operand has ``P`` on axis 0 (the per-position products of a PaDiM head).
    Other graphs are left unchanged (nothing written).

    Args:
        path: An ONNX file (no external data).
        chunk_bytes: Most fp32 bytes of one chunk of a row.

    Returns:
        The number of products rewritten; when above 0 the model's metadata
        says ``tilead.constant_folding: off``.

    Raises:
        ValueError: For a chunk size below 1.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected at least 1, got {chunk_bytes}")
    model = onnx.load(str(path))
    if any(p.key == CONSTANT_FOLDING_KEY and p.value == CONSTANT_FOLDING_OFF for p in model.metadata_props):
        return 0  # rewritten already
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    casts = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Cast"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.FLOAT16
        and len(inits[n.input[0]].dims) == 3
        and uses.get(n.input[0]) == 1
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
    }
    products = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in casts}
    # A cast also feeding anything but a MatMul stays whole.
    products = {p for p in products if uses.get(p) == 1}
    if not products:
        return 0
    nodes: list[onnx.NodeProto] = []
    dropped: list[str] = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in products:
            continue
        if node.op_type != "MatMul" or node.input[1] not in products:
            nodes.append(node)
            continue
        cast = casts[node.input[1]]
        source = cast.input[0]
        rows = numpy_helper.to_array(inits[source])
        positions, r, c = rows.shape
        per_chunk = max(1, chunk_bytes // max(1, r * c * 4))
        bounds = [*range(0, positions, per_chunk), positions]
        sizes = f"{source}__chunk_sizes"
        graph.initializer.append(numpy_helper.from_array(np.diff(bounds).astype(np.int64), sizes))
        parts = [f"{node.input[0]}__{source}__part{k}" for k in range(len(bounds) - 1)]
        nodes.append(helper.make_node("Split", [node.input[0], sizes], parts, axis=0))
        outs = []
        for k in range(len(bounds) - 1):
            name = f"{source}__chunk{k}"
            chunk = np.ascontiguousarray(rows[bounds[k] : bounds[k + 1]])
            graph.initializer.append(numpy_helper.from_array(chunk, name))
            nodes.append(helper.make_node("Cast", [name], [f"{name}__f32"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("MatMul", [parts[k], f"{name}__f32"], [f"{name}__product"]))
            outs.append(f"{name}__product")
        nodes.append(helper.make_node("Concat", outs, [node.output[0]], axis=0))
        dropped.append(source)
    for name in dropped:
        graph.initializer.remove(inits[name])
    del graph.node[:]
    graph.node.extend(nodes)
    helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, CONSTANT_FOLDING_KEY: CONSTANT_FOLDING_OFF}
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(dropped)
