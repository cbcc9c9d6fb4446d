"""The ``bf16`` precision: an FP32 backbone graph run by OpenVINO in bfloat16, PaDiM heads refit on its features (#21).

``tilead-export RUN --precision bf16`` (PaDiM, ``shared_backbone`` layout) writes
the same graphs as an FP32 shared bundle, with one difference: each location's
Gaussians are fitted again on the features OpenVINO's CPU plugin computes from
``backbone.onnx`` with ``INFERENCE_PRECISION_HINT`` ``bf16``, the features the
``hybrid`` backend (:mod:`tilead.runtime.backends.hybrid`) gives its heads.
bf16 moves the backbone's features by about 6.5 % on bottle tiles; heads fitted
on FP32 features then lose most of their pixel quality (bottle AUPRO 0.466
instead of 0.967), heads refit on the bf16 features keep it (the INT8 path's
refit, :func:`tilead.exporter.shared_backbone.refit_padim`; docs/cpu_speed.md).

``tilead-export RUN --precision int8_bf16`` does the same on the INT8 backbone graph: ``backbone.onnx``
quantized exactly as ``--precision int8`` quantizes it (:func:`tilead.exporter.quantize.quantize_location`:
QDQ, calibration on training tiles, the stem FP32), then the heads refit on the features OpenVINO computes
from that graph with the bf16 hint (its int8 layers on OpenVINO's int8 kernels, the rest in bf16). Heads refit
on ONNX Runtime's INT8 features collapse on OpenVINO's (bottle image AUROC 0.5952, docs/cpu_speed.md); refit on
OpenVINO's own features they belong to the numerics they run on, as bf16's do. Both are
:func:`tilead.runtime.bundle.refit_on_openvino` precisions, run by the ``hybrid`` backend.

Export needs what the runtime needs: the ``openvino`` package and a CPU whose
OpenVINO plugin lists ``BF16`` (AVX-512 BF16 or AMX); elsewhere it is refused,
never emulated (emulated bf16 would give other features than the deployed CPU's).

Parity, per location on a few of its training tiles (:func:`bf16_parity`):

* the head graph (ONNX Runtime) on the bf16 features against the refit eager
  head on the same features: rounding only, within :data:`BF16_HEAD_TOLERANCE`;
* the deployed chain (OpenVINO bf16 backbone, ONNX Runtime refit head) against
  the run's FP32 eager location model (as INT8's check does): how far the
  deployed map is from the FP32 one, within :data:`BF16_PARITY_TOLERANCE`, recorded.
  (Against the FP32 embedding with the refit head instead, bottle's r0c0 differed
  by 1.24 of the map range: Gaussians fitted on bf16 features see FP32 features
  as shifted, the mirror of the problem the refit solves; that pairing is never deployed.)

Native heads: next to each ``heads/<name>.onnx`` the export writes ``heads/<name>.padim.npz``
(:func:`native_head`; :mod:`tilead.runtime.native_heads`), the same Gaussians for the ``hybrid``
backend's C++ kernel, listed in the manifest's ``native_heads``; per location the native head is checked
against the head graph on the same bf16 features (:func:`native_parity`, within
:data:`NATIVE_HEAD_TOLERANCE`; the largest is recorded as ``native_head_parity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilead.runtime.bundle import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME
from tilead.runtime.native_heads import NativeHead
from tilead.runtime.preprocess import Preprocessing

BF16_HEAD_TOLERANCE = 1e-2
"""Largest head-graph vs eager-head difference on the same bf16 features, relative to the map's range.

The head computes in float32 on both sides (its fp16 rows widened exactly), so only summation
order differs. Measured on real training tiles: bottle (209 fit tiles per location) 8.9e-7; runs
fitted on a handful of tiles, whose nearly singular Gaussians amplify the rounding, far more: the
tiny test run (6 tiles) 1.3e-4, the 2048² demo run (5 fit images) 1.17e-3. A wrong or stale head
weight moves the map by a large share of its range."""
BF16_PARITY_TOLERANCE = 1.0
"""Largest deployed-chain vs FP32-eager-model difference on training tiles, relative to the FP32 map's range.

Like INT8's tolerance (:data:`tilead.exporter.quantize.INT8_PARITY_TOLERANCE`), it rejects a
map that leaves the FP32 map's own range, as a broken backbone compile does; quality is judged
by evaluation. Measured on bottle: see docs/cpu_speed.md ("bf16 precision")."""
CHUNK = 8
"""Tiles per OpenVINO call while refitting (bounds the activations)."""


class Bf16Backbone:
    """``backbone.onnx`` compiled by OpenVINO with ``INFERENCE_PRECISION_HINT`` ``bf16``, with ONNX Runtime's ``run``.

    Compiled by the runtime's own :func:`tilead.runtime.backends.openvino.compile_backbone` with the hybrid
    backend's configuration (:func:`tilead.runtime.backends.hybrid.bf16_config`), so the refit sees the
    features the runtime will compute. With ``uint8`` (what the export writes as the manifest's
    ``model.backbone_input``) the compiled backbone takes uint8 channels-last tiles and normalizes them
    itself, as the runtime's does; :meth:`run` still takes the trainer's float tiles and turns them back
    into their pixels (:func:`pixels_of`, exact: checked).

    Args:
        path: The FP32 ``backbone.onnx``.
        preprocessing: The run's preprocessing (the float tiles' mean and std).
        tile: ``(tile_h, tile_w)``.
        uint8: Compile for uint8 tiles (grids whose edge policy is ``shift`` or ``pad``).

    Raises:
        RuntimeError: Without OpenVINO, or on a CPU without bfloat16 units (the message says which).
    """

    def __init__(self, path: Path, preprocessing: Preprocessing, tile: Sequence[int], uint8: bool) -> None:
        from tilead.runtime.backends.hybrid import bf16_config
        from tilead.runtime.backends.openvino import compile_backbone, import_openvino, require_bf16

        ov = import_openvino()
        core = ov.Core()
        require_bf16(core, "precision bf16")
        self.preprocessing = preprocessing
        self.uint8 = uint8
        compiled = compile_backbone(core, str(path), bf16_config(1), preprocessing, tile, uint8).compiled
        self.output = compiled.output(FEATURES_NAME)
        self.request = compiled.create_infer_request()

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Features of the float32 ``(n, C, th, tw)`` tiles in ``feeds`` (its one input), float32 ``(n, d, fh, fw)``.

        In calls of :data:`CHUNK` tiles; as uint8 tiles (:func:`pixels_of`) where the backbone takes them.
        """
        del names
        tiles = np.ascontiguousarray(next(iter(feeds.values())), dtype=np.float32)
        inputs = pixels_of(tiles, self.preprocessing) if self.uint8 else tiles
        parts = [
            np.array(self.request.infer([inputs[i : i + CHUNK]])[self.output], dtype=np.float32, copy=True)
            for i in range(0, len(tiles), CHUNK)
        ]
        return [np.concatenate(parts)]


def pixels_of(tiles: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The uint8 channels-last tiles whose normalization gave these float tiles, checked bit for bit.

    The tile kernel computes ``pixel * scale[c] + bias[c]`` in float32
    (:class:`~tilead.runtime.preprocess.Preprocessing`); its levels lie ``scale[c]`` apart, far more than
    the rounding, so rounding ``(value - bias) / scale`` recovers the pixel. The result is checked by
    normalizing it again, so tiles that did not come from integer pixels are refused rather than rounded.

    Args:
        tiles: float32 ``(n, C, th, tw)``, from :func:`tilead.runtime.preprocess.tile_images`.
        preprocessing: The preprocessing that made them.

    Returns:
        uint8 ``(n, th, tw, C)``, as :func:`tilead.runtime.preprocess.tile_images_u8` cuts them.

    Raises:
        ValueError: If some value is not a normalized uint8 pixel.
    """
    scale = np.asarray(preprocessing.scale, dtype=np.float32)[:, None, None]
    bias = np.asarray(preprocessing.bias, dtype=np.float32)[:, None, None]
    levels = np.rint((tiles.astype(np.float64) - bias) / scale)
    pixels = np.clip(levels, 0, 255).astype(np.uint8)
    if not np.array_equal(pixels.astype(np.float32) * scale + bias, tiles):
        raise ValueError("tiles: not normalized uint8 pixels (a resampled grid?); they cannot become uint8 tiles")
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def bf16_parity(
    backbone: Bf16Backbone, head_path: Path, model: nn.Module, head: nn.Module, tiles: np.ndarray
) -> tuple[float, float]:
    """The two parity figures of a bf16 location (see the module docstring).

    Args:
        backbone: The OpenVINO bf16 backbone.
        head_path: The location's head graph.
        model: The run's eager FP32 location model (tiles to map).
        head: The refit eager head (features to map).
        tiles: A few training tiles, float32 ``(n, C, th, tw)``.

    Returns:
        ``(head, chain)``: the head graph vs the refit eager head on the same bf16 features, and the deployed
        chain vs the FP32 eager model; both max abs differences relative to the reference map's range.

    Raises:
        RuntimeError: If the map shapes differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    features = backbone.run([FEATURES_NAME], {INPUT_NAME: tiles})[0]
    got = np.asarray(session.run([OUTPUT_NAME], {FEATURES_NAME: features})[0])
    with torch.inference_mode():
        same = head.eval()(torch.from_numpy(features)).numpy()
        fp32 = model.eval()(torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))).numpy()
    if got.shape != fp32.shape:
        raise RuntimeError(f"{head_path}: map shape {got.shape} differs from the eager model's {fp32.shape}")

    def relative(a: np.ndarray, ref: np.ndarray) -> float:
        return float(np.abs(a - ref).max()) / (float(ref.max() - ref.min()) or 1.0)

    return relative(got, same), relative(got, fp32)


def check_bf16_export(family: str, layout: str | None, has_thumbnail: bool, precision: str = "bf16") -> str:
    """The layout a bf16 or int8_bf16 export writes (``shared_backbone``), or a clear refusal.

    Args:
        family: The run's detector family.
        layout: The layout asked for (None: the default, ``shared_backbone`` for these precisions).
        has_thumbnail: The run has a thumbnail branch.
        precision: ``bf16`` or ``int8_bf16`` (for the messages).

    Raises:
        ValueError: For a family other than padim, a per_location layout or a thumbnail branch.
    """
    if family != "padim":
        raise ValueError(
            f"precision {precision}: implemented for padim runs (its Gaussians are refit on the bf16 backbone's "
            f"features); this run's model is {family!r}, whose FP32-fitted head would not match: export fp32"
        )
    if layout not in (None, "shared_backbone"):
        raise ValueError(
            f"precision {precision}: needs layout shared_backbone (OpenVINO runs the one backbone graph in bf16, ONNX "
            f"Runtime the heads); got layout {layout!r}"
        )
    if has_thumbnail:
        raise ValueError(
            f"precision {precision}: not implemented for runs with a thumbnail branch (model.thumbnail); export fp32"
        )
    return "shared_backbone"


def require_bf16_cpu(precision: str = "bf16") -> None:
    """Refuse a bf16 or int8_bf16 export without OpenVINO or on a CPU without bfloat16 units.

    Raises:
        RuntimeError: Saying what is missing (:class:`~tilead.runtime.backends.openvino.OpenVinoUnavailableError`
            without OpenVINO).
    """
    from tilead.runtime.backends.openvino import import_openvino, require_bf16

    require_bf16(import_openvino().Core(), f"precision {precision}")


def bf16_facts(precision: str = "bf16") -> dict[str, Any]:
    """The manifest's ``source.quantization`` facts of a bf16 or int8_bf16 export (the CPU and OpenVINO that refit).

    Args:
        precision: ``bf16`` (FP32 graphs) or ``int8_bf16`` (the INT8 QDQ backbone graph).
    """
    from tilead.runtime.backends.openvino import import_openvino

    ov = import_openvino()
    core = ov.Core()
    graphs = "the INT8 QDQ backbone graph, FP32 heads" if precision == "int8_bf16" else "FP32 graphs"
    return {
        "format": f"bf16 backbone (OpenVINO INFERENCE_PRECISION_HINT bf16), {graphs}",
        "openvino": str(ov.__version__),
        "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
        "scope": "the shared backbone runs on OpenVINO with the bf16 hint; heads FP32 (ONNX Runtime or native), "
        "refit on those features",
        "normalization": "the FP32 run's statistics (not recomputed on bf16 maps)",
    }


NATIVE_HEAD_TOLERANCE = 1e-3
"""Largest native-head vs exact (float64) map difference accepted outright on the same bf16 features.

Relative to the exact map's range. The kernel and the head graph both compute in float32 from the same fp16
values (the packed upper triangle, the block rows), so they differ from the exact map by rounding only;
nearly singular Gaussians (runs fitted on a handful of tiles) amplify it: on the 2048² demo run (5 fit
images) native vs graph reached 4.61e-3 and 1.04e-2. Beyond this tolerance the native head is still
accepted when it is at most :data:`NATIVE_VS_GRAPH_ERROR` times as far from the exact map as the graph is,
or when float32 rounding bounds every pixel's difference (:func:`rounding_bound`; :func:`native_parity`): on an
Intel Xeon with AMX the 2048² demo run's bf16 features gave one location 1.17e-3 against its graph's 5.43e-4,
which the first two rules refused. A wrong packing or blur moves the map by a large share of its range,
far beyond all three."""
NATIVE_VS_GRAPH_ERROR = 2.0
"""How much farther from the exact map than the head graph the native head may be (beyond the tolerance)."""

ROUNDING_TERMS_SLACK = 16
"""Added to ``d`` in the float32 rounding bound's term count (:func:`rounding_bound`): the kernel's sums run over at
most ``d`` terms per row plus its row folds and the blur's taps."""

ROUNDING_LAMBDA = 2.0
"""The probabilistic rounding bound's factor: ``lambda * sqrt(k) * 2**-24`` for a sum of ``k`` terms, after Higham
and Mary's probabilistic rounding error analysis (2019): rounding errors add up like a random walk, where the worst
case ``k * 2**-24`` is many times too wide. It is not a guarantee; it tells rounding apart from a wrong packing or
blur, which move the map by a large share of its range. Measured on nearly singular Gaussians
(tests/test_native_heads.py) the native head's and the graph's errors stay under a hundredth of this bound."""


def native_head(head: Any) -> NativeHead:
    """The native form (:class:`tilead.runtime.native_heads.NativeHead`) of a refit ``BlockRowPadimHead``.

    The block rows hold ``A`` on the diagonal blocks and ``A_ij + A_ji^T`` right of them; assembled into a
    matrix with zeros below the diagonal blocks, its quadratic form is the head's, and
    :func:`~tilead.runtime.native_heads.pack_upper` of it gives each pair ``(i, j)`` its summed weight
    (exact in fp16 for the symmetric fp16 matrices PaDiM stores).

    Args:
        head: A ``BlockRowPadimHead`` (``mean`` ``(P, d)``, block rows ``row0``.., ``bounds``, ``size``, blur).
    """
    from tilead.runtime.native_heads import pack_upper

    mean = head.mean.detach().to(torch.float32).numpy()
    blur = head.blur.detach().numpy().astype(np.float32) if head.blur_sigma > 0 else np.zeros(0, np.float32)
    h, w = head.size
    return NativeHead(np.ascontiguousarray(mean), pack_upper(block_matrix(head)), blur, (int(h), int(w)))


def block_matrix(head: Any) -> np.ndarray:
    """float64 ``(P, d, d)``: a ``BlockRowPadimHead``'s block rows in place, zeros below the diagonal blocks."""
    p, d = (int(v) for v in head.mean.shape)
    bounds: list[int] = list(head.bounds)
    full = np.zeros((p, d, d), dtype=np.float64)
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        full[:, a:b, a:] = getattr(head, f"row{i}").detach().to(torch.float64).numpy()
    return full


def exact_map(features: np.ndarray, head: Any) -> np.ndarray:
    """The head's map computed in float64 from its block rows (the reference of :func:`native_parity`).

    Args:
        features: float32 ``(n, d, h, w)``.
        head: A ``BlockRowPadimHead``.

    Returns:
        float64 ``(n, 1, h, w)``.
    """
    from tilead.runtime.native_heads import blur_maps

    n, d, h, w = features.shape
    mean = head.mean.detach().to(torch.float64).numpy()
    diff = features.astype(np.float64).reshape(n, d, h * w).transpose(2, 0, 1) - mean[:, None, :]  # (P, n, d)
    q = np.einsum("pki,pij,pkj->kp", diff, block_matrix(head), diff, optimize=True)
    maps = np.sqrt(np.maximum(q, 0.0)).reshape(n, 1, h, w)
    return blur_maps(maps, head.blur.detach().to(torch.float64).numpy()) if head.blur_sigma > 0 else maps


def rounding_bound(features: np.ndarray, head: Any) -> np.ndarray:
    """How far any float32 evaluation of the head's map may be from :func:`exact_map` through rounding alone.

    A float32 quadratic form ``q = sum_ij U_ij (x_i - m_i)(x_j - m_j)`` is within
    ``gamma * sum_ij |U_ij| |x_i - m_i| |x_j - m_j|`` of the exact one. The worst case has
    ``gamma = k * 2**-24`` for ``k`` terms; rounding errors add up like a random walk, so this uses the
    probabilistic ``gamma = lambda * sqrt(k) * 2**-24`` (:data:`ROUNDING_LAMBDA`, ``k = d +``
    :data:`ROUNDING_TERMS_SLACK` for the row folds; ``x`` and ``m`` are float32 values in both, so ``x - m``
    rounds by at most ``2**-24 |x - m|``). The map is ``sqrt(q)``, and ``|sqrt(a) - sqrt(b)|`` is at
    most ``min(sqrt(|a - b|), |a - b| / sqrt(b))``; the Gaussian blur (positive taps summing to 1) carries the
    bound through as it carries the map. Nearly singular Gaussians (few fit tiles) make ``sum |U| a a`` large
    against ``q``: that is where the native head and the head graph both drift from the exact map, and this
    bound says how far they may, on any machine.

    Args:
        features: float32 ``(n, d, h, w)``.
        head: A ``BlockRowPadimHead``.

    Returns:
        float64 ``(n, 1, h, w)``, non-negative.
    """
    from tilead.runtime.native_heads import blur_maps

    n, d, h, w = features.shape
    mean = head.mean.detach().to(torch.float64).numpy()
    diff = features.astype(np.float64).reshape(n, d, h * w).transpose(2, 0, 1) - mean[:, None, :]  # (P, n, d)
    weights = block_matrix(head)
    q = np.maximum(np.einsum("pki,pij,pkj->kp", diff, weights, diff, optimize=True), 0.0)
    size = np.einsum("pki,pij,pkj->kp", np.abs(diff), np.abs(weights), np.abs(diff), optimize=True)
    bound = ROUNDING_LAMBDA * np.sqrt(d + ROUNDING_TERMS_SLACK) * 2.0**-24 * size
    with np.errstate(divide="ignore", invalid="ignore"):  # both branches are computed; q == 0 takes the inf
        err = np.minimum(np.sqrt(bound), np.where(q > 0, bound / np.sqrt(q), np.inf)).reshape(n, 1, h, w)
    return blur_maps(err, head.blur.detach().to(torch.float64).numpy()) if head.blur_sigma > 0 else err


def native_parity(
    backbone: Bf16Backbone, head_path: Path, native: NativeHead, head: Any, tiles: np.ndarray
) -> tuple[float, float, float, float]:
    """The native head, the head graph (ONNX Runtime) and the exact map on the bf16 features of ``tiles``.

    Args:
        backbone: The OpenVINO bf16 backbone.
        head_path: The head graph.
        native: The native head.
        head: The refit ``BlockRowPadimHead`` both were made from (:func:`exact_map`).
        tiles: A few training tiles, float32 ``(n, C, th, tw)``.

    Returns:
        ``(native vs graph, native vs exact, graph vs exact, native vs bound)``: the first three max abs
        differences relative to the exact map's range; the last the largest ratio of the native head's difference
        from the exact map to :func:`rounding_bound` (plus ``1e-6`` of the range) at the same pixel (at most 1:
        rounding explains every difference).

    Raises:
        RuntimeError: If the map shapes differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    features = backbone.run([FEATURES_NAME], {INPUT_NAME: tiles})[0]
    graph = np.asarray(session.run([OUTPUT_NAME], {FEATURES_NAME: features})[0], dtype=np.float64)
    got = native(features).astype(np.float64)
    exact = exact_map(features, head)
    if not got.shape == graph.shape == exact.shape:
        raise RuntimeError(
            f"{head_path}: map shapes differ: native {got.shape}, graph {graph.shape}, exact {exact.shape}"
        )
    span = float(exact.max() - exact.min()) or 1.0

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max()) / span

    allowed = rounding_bound(features, head) + 1e-6 * span
    return rel(got, graph), rel(got, exact), rel(graph, exact), float((np.abs(got - exact) / allowed).max())
