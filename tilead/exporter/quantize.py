"""INT8 static quantization of a location's backbone, the detector head kept in FP32 (issue #21).

Each location's FP32 ONNX graph, as the exporter writes it, is quantized with
ONNX Runtime's own tools (:func:`onnxruntime.quantization.quantize_static`):
QDQ format, per-channel INT8 weights, UINT8 activations calibrated (min/max)
on that location's training tiles, cut exactly as the Predictor cuts them.

Only the backbone is quantized. The exporter's graphs keep the PyTorch module
path of every node (the ``pkg.torch.onnx.name_scopes`` metadata); a node whose
scope path runs through a module called ``backbone`` (PaDiM's and PatchCore's
``embedding.backbone``) is a backbone node, every other node (feature
resizing, channel selection, PaDiM's Mahalanobis distance, PatchCore's nearest
neighbours, the blur) is passed to ``nodes_to_exclude`` and stays FP32.

The backbone's first stage also stays FP32: the backbone nodes computed at the
stem's resolution (before the second strided convolution or pooling), except a
trailing 1x1 expansion convolution that feeds that strided op (see
:func:`stem_nodes`). On flat, synthetic 2048x2048 tiles INT8 there moved the
features by 31 % (norm of the difference over the norm of the features,
efficientnet_lite0): weights alone, INT8 per channel, in
``blocks.0.0.conv_dw`` gave 33 %; its per-tensor UINT8 output, feeding the
next 1x1 convolution, gave 85 % with that one convolution kept FP32. MinMax,
Percentile and Entropy calibration all gave 31 % (the ranges were not the
cause). Keeping the stem's resolution FP32 brought it to 9 %. Its pixel
statistics are the raw image's, where a flat background and sharp edges give
per-tensor ranges that one scale cannot serve.

The expansion convolution at the end of that stage (efficientnet_lite0's
``blocks.1.0.conv_pw``, 16 to 96 channels at half the tile's size) reads the
first block's output, not the raw image's statistics; quantizing it moves the
features about as little (docs/cpu_speed.md) while it was the costliest FP32
layer: on OpenVINO (``int8_bf16``) it ran in bf16 and its output was converted
to UINT8 for the strided depthwise convolution after it.
"""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime.bundle import INPUT_NAME, INT8_WEIGHT_BITS, QUANTIZED_PRECISIONS

PRECISIONS = ("fp32", "int8", "bf16", "int8_bf16")
"""``--precision`` of an ONNX export (:data:`tilead.runtime.bundle.PRECISIONS`)."""
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
BACKBONE_MODULE = "backbone"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
STRIDED_OPS = ("Conv", "MaxPool", "AveragePool")
ACTIVATION_OPS = ("Relu", "Clip", "HardSwish", "LeakyRelu")
"""Elementwise activations that may follow the stem stage's expansion convolution (:func:`stem_nodes`)."""
# Max abs INT8-vs-eager difference of the map on real training tiles, relative to the eager map's range
# there (FP32 parity is 1e-5). An INT8 location differs by more than rounding: its backbone's features move
# by several percent and (PaDiM) its Gaussians are refit on them. Measured on bottle: 0.27-0.34 with the
# refit (AUROCs and AUPRO within 0.001 of FP32); 9-13 without it (image AUROC 0.53). 1.0 rejects a graph
# whose map leaves the FP32 map's own range, as a broken quantization does.
INT8_PARITY_TOLERANCE = 1.0
WEIGHT_BITS = INT8_WEIGHT_BITS
"""``--int8-weight-bits`` (:data:`tilead.runtime.bundle.INT8_WEIGHT_BITS`)."""


def default_weight_bits(precision: str) -> int:
    """``--int8-weight-bits`` when not given: 7 for ``int8``, 8 for ``int8_bf16``.

    An ``int8`` bundle's PaDiM heads are refit on the features of the exporting CPU's INT8 arithmetic. With 8-bit
    weights that differs between CPUs with an 8-bit dot product (VNNI, AMX) and AVX2-only ones (saturating sums);
    with 7 bits it does not, so the bundle runs on both (bottle on a Zen 3, the VNNI side emulated by
    ``benchmarks/probe_int8_cross_cpu.py``: 0.9960 / 0.9899 / 0.9680 all four ways, against 0.9968 / 0.9902 /
    0.9683 for 8 bits on the CPU it was refit on and AUPRO 0.48-0.50 on the other). ``int8_bf16`` runs on
    OpenVINO on CPUs with bf16 units, which all have VNNI, and keeps the full range.
    """
    return 7 if precision == "int8" else 8


def check_weight_bits(bits: int) -> int:
    """Validate an ``int8_weight_bits`` value.

    Raises:
        ValueError: If it is not one of :data:`WEIGHT_BITS`.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise ValueError(f"int8_weight_bits: expected 7 or 8, got {bits!r}")
    return bits


def weights_fact(bits: int) -> str:
    """The manifest's ``quantization.weights`` text for weights quantized to ``bits``."""
    return "int8 per-channel" + (", 7-bit range (reduce_range)" if bits == 7 else "")


def check_precision(precision: str) -> str:
    """Validate a ``precision`` value.

    Raises:
        ValueError: If it is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def quantizes_backbone(precision: str) -> bool:
    """Whether an export of this precision quantizes the backbone graph to INT8 QDQ.

    ``int8``, and ``int8_bf16``, whose heads are then refit on the features OpenVINO computes from that graph with
    the bf16 hint (:mod:`tilead.exporter.bf16`).
    """
    return precision in QUANTIZED_PRECISIONS


def node_scopes(node: Any) -> list[str]:
    """The PyTorch module path of an exported ONNX node (``[]`` when the exporter recorded none)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, list) else []
    return []


def is_backbone_node(node: Any) -> bool:
    """Whether the node comes from a module named ``backbone`` (at any depth)."""
    return any(scope.split(".")[-1] == BACKBONE_MODULE for scope in node_scopes(node))


def _strided(node: Any) -> bool:
    if node.op_type not in STRIDED_OPS:
        return False
    for attr in node.attribute:
        if attr.name == "strides":
            return any(int(v) > 1 for v in attr.ints)
    return False  # ONNX's default strides are 1 (Conv and pooling alike)


def stem_nodes(model: Any, backbone: Sequence[str], *, expansion: bool = False) -> list[str]:
    """The backbone nodes kept FP32: those computed at the stem's resolution, but its trailing expansion.

    The exporter writes nodes in topological order; the first strided
    convolution (or pooling) is the stem's, every node up to the second
    strided one works at half the input's resolution or finer. Of those, a
    trailing 1x1 convolution (and an elementwise activation after it) whose
    output is the second strided op's input, an inverted residual block's
    expansion, is left out of the list (it is quantized) unless ``expansion``.

    Args:
        model: An ``onnx.ModelProto`` written by the exporter.
        backbone: Names of its backbone nodes (:func:`split_nodes`).
        expansion: Keep that expansion convolution FP32 too (every node at the stem's resolution: the rule of
            bundles exported before; ``benchmarks/probe_int8_features.py`` compares the two).

    Returns:
        Those of ``backbone`` that run before the second strided Conv/pooling
        node (that node itself excluded), in graph order, without the trailing
        expansion unless ``expansion``.
    """
    names = set(backbone)
    early: list[Any] = []
    second: Any = None
    strided = 0
    for node in model.graph.node:
        if node.name not in names:
            continue
        if _strided(node):
            strided += 1
            if strided > 1:
                second = node
                break
        early.append(node)
    if not expansion and second is not None:
        early = early[: len(early) - _expansion_length(early, second)]
    return [node.name for node in early]


def _expansion_length(early: Sequence[Any], strided: Any) -> int:
    """How many of ``early``'s last nodes are a 1x1 convolution (and its activation) feeding ``strided``: 0, 1 or 2."""
    if not early or not strided.input:
        return 0
    last = early[-1]
    conv, size = last, 1
    if last.op_type in ACTIVATION_OPS and len(early) > 1:
        conv, size = early[-2], 2
        if not conv.output or last.input[:1] != conv.output[:1]:
            return 0
    if conv.op_type != "Conv" or _strided(conv) or not _pointwise(conv) or last.output[:1] != strided.input[:1]:
        return 0
    return size


def _pointwise(node: Any) -> bool:
    """Whether a Conv node's ``kernel_shape`` attribute says 1x1 (a node without the attribute is not taken as one)."""
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return len(attr.ints) > 0 and all(int(v) == 1 for v in attr.ints)
    return False


def split_nodes(model: Any) -> tuple[list[str], list[str]]:
    """Names of the backbone nodes and of every other node of an exported location graph.

    Args:
        model: An ``onnx.ModelProto`` written by the exporter.

    Returns:
        ``(backbone, rest)`` node names.

    Raises:
        ValueError: If no node is marked as a backbone node, or node names are
            missing or repeated (the exclusion list could then not be exact).
    """
    backbone: list[str] = []
    rest: list[str] = []
    for node in model.graph.node:
        (backbone if is_backbone_node(node) else rest).append(node.name)
    names = backbone + rest
    if "" in names or len(set(names)) != len(names):
        raise ValueError("the graph's node names are missing or repeated: cannot exclude the head exactly")
    if not backbone:
        raise ValueError(
            f"no node of the graph carries a '{BACKBONE_MODULE}' module scope ({SCOPES_KEY} metadata): "
            "only graphs written by tilead's exporter (torch.onnx dynamo) can be quantized"
        )
    return backbone, rest


class TileReader:
    """A :class:`onnxruntime.quantization.CalibrationDataReader` over batches of tiles.

    Args:
        batches: float32 ``(n, C, th, tw)`` tile batches, as the graph's input.
    """

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{input name: batch}``, or None when the batches are used up."""
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


@dataclass(frozen=True)
class QuantizeInfo:
    """What :func:`quantize_location` did.

    Attributes:
        backbone_nodes: Nodes quantized (QDQ inserted around them).
        fp32_nodes: Nodes kept in FP32 (the head, the glue around the backbone and the backbone's stem stage).
        calibration_tiles: Tiles the activation ranges were calibrated on.
    """

    backbone_nodes: int
    fp32_nodes: int
    calibration_tiles: int


def quantize_location(fp32: Path, out: Path, batches: Sequence[np.ndarray], *, weight_bits: int = 8) -> QuantizeInfo:
    """Quantize the backbone of one location's FP32 graph to INT8 (QDQ), the rest kept FP32.

    Args:
        fp32: The exporter's FP32 ``.onnx`` of the location.
        out: Target ``.onnx`` (may be ``fp32`` itself: the file is replaced).
        batches: Calibration batches, float32 ``(n, C, th, tw)``: the
            location's training tiles, preprocessed as the Predictor does.
        weight_bits: 8, or 7 (ONNX Runtime's ``reduce_range``: no saturation on CPUs without VNNI, coarser
            weights; :data:`WEIGHT_BITS`).

    Returns:
        Node counts and the number of calibration tiles.

    Raises:
        ValueError: If there are no calibration tiles, the graph has no
            recognizable backbone, or ``weight_bits`` is not 7 or 8.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    check_weight_bits(weight_bits)
    tiles = sum(int(b.shape[0]) for b in batches)
    if tiles == 0:
        raise ValueError(f"{fp32}: no calibration tiles")
    proto = onnx.load(str(fp32))
    backbone, rest = split_nodes(proto)
    keep = stem_nodes(proto, backbone)
    del proto
    backbone = [n for n in backbone if n not in set(keep)]
    rest = rest + keep
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tilead-int8-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        quantize_static(
            str(fp32),
            str(staged),
            TileReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_quantize=backbone,
            nodes_to_exclude=rest,
            reduce_range=weight_bits == 7,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        staged.replace(out)
    return QuantizeInfo(len(backbone), len(rest), tiles)


def compare_int8(model: Any, path: Path, batch: np.ndarray) -> float:
    """Max abs difference of the map, ONNX Runtime (CPU) vs the eager model, on real tiles.

    Args:
        model: The eager reference (``torch.nn.Module``; a ``MapAndScore`` compares its score too).
        path: The INT8 ``.onnx``.
        batch: float32 ``(n, C, th, tw)`` real tiles (random tiles would lie outside the calibrated ranges).

    Returns:
        The largest max abs difference of any output relative to the eager
        map's range (the score's magnitude) on these tiles.
    """
    from tilead.exporter.onnx_export import compare_outputs

    return compare_outputs(model, path, batch)


def _is_head_node(node: Any) -> bool:
    return any(scope.split(".")[-1] == "head" for scope in node_scopes(node))


def embedding_output(model: Any) -> str:
    """The tensor the detector head reads: produced outside the head, consumed by a head node.

    Args:
        model: An ``onnx.ModelProto`` written by the exporter (quantized or not).

    Raises:
        ValueError: Unless there is exactly one such tensor (shape computations aside).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {
        name
        for node in model.graph.node
        if _is_head_node(node)
        for name in node.input
        if name in producers and not _is_head_node(producers[name]) and producers[name].op_type != "Shape"
    }
    if len(found) != 1:
        raise ValueError(f"expected one tensor from the embedding into the head, found {sorted(found)}")
    return str(found.pop())


def refit_padim_head(path: Path, head: Any, batches: Iterable[np.ndarray], eps: float) -> int:
    """Refit a PaDiM location's Gaussians on the INT8 backbone's own features, in place.

    INT8 rounding moves the backbone's features by a few percent, and the
    Mahalanobis distance of a Gaussian fitted on FP32 features amplifies that
    along its low-variance directions (on bottle the INT8 map of a good tile
    rose far above the FP32 map of a defect). Fitting the mean and covariance
    on the features the deployed INT8 backbone produces (the same training
    tiles, the same estimator and ``eps``) removes that bias; the head itself
    stays FP32 (its weights in the run's storage dtype).

    Args:
        path: The location's INT8 ``.onnx``; its head initializers are replaced.
        head: The exported eager head (a ``BlockRowPadimHead``) whose weights the graph holds.
        batches: The location's training tiles, float32 ``(n, C, th, tw)``.
        eps: The run's covariance regularization.

    Returns:
        The number of tiles the Gaussians were fitted on.

    Raises:
        ValueError: If a weight of ``head`` is not found in the graph (by its exact value).
    """
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from tilead.trainer.detectors.padim.model import BlockRowPadimHead, PadimAccumulator

    proto = onnx.load(str(path))
    name = embedding_output(proto)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    del probe
    h, w = head.size
    acc = PadimAccumulator(h * w, int(head.mean.shape[1]))
    for batch in batches:
        acc.update(torch.from_numpy(session.run([name], {INPUT_NAME: np.ascontiguousarray(batch)})[0]))
    mean, inv_cov = acc.finalize(eps)
    storage = head.row0.dtype
    blocks = len(head.bounds) - 1
    refit = BlockRowPadimHead(mean, inv_cov.to(storage), (h, w), head.blur_sigma, blocks=blocks)
    new = {k: v for k, v in refit.state_dict().items() if k == "mean" or k.startswith("row")}
    old = {k: v for k, v in head.state_dict().items() if k in new}
    # The exporter keeps large tensors as named initializers and may inline small ones as Constant
    # nodes, rename or reshape them: find each of the head's tensors by its exact values.
    tensors = list(proto.graph.initializer) + [
        attr.t
        for node in proto.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    for key, value in new.items():
        before = old[key].detach().contiguous().numpy()
        flat = before.ravel()  # the exporter may have folded a reshape in (the mean unsqueezed): compare values
        hits = [
            t
            for t in tensors
            if int(np.prod(t.dims)) == flat.size and np.array_equal(numpy_helper.to_array(t).ravel(), flat)
        ]
        if not hits:
            raise ValueError(f"{path}: the exported head's {key!r} is not among the graph's tensors")
        refit_value = value.detach().numpy()
        for t in hits:
            # The exporter may also have folded the head's widening Cast (fp16 row to fp32) in: exact either way.
            cast = refit_value.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            if not np.array_equal(cast.astype(refit_value.dtype), refit_value):
                raise ValueError(f"{path}: the refit {key!r} does not fit the dtype of the graph's {t.name!r}")
            t.CopyFrom(numpy_helper.from_array(cast.reshape(tuple(t.dims)), t.name))
    onnx.save(proto, str(path))
    return acc.count
