"""The ``shared_backbone`` bundle layout: one backbone graph for every tile, one head graph per location (issue #21).

For a detector whose backbone is frozen and identical at every location
(PaDiM, PatchCore: ``model.embedding`` is the same module with the same
weights and buffers everywhere), a location's graph is ``head(embedding(x))``.
The exporter then writes ``backbone.onnx`` (``embedding``: tiles in,
``features`` ``(n, d, fh, fw)`` out) once and ``heads/rRcC.onnx`` (``head``:
features in, ``map`` out) per location; the runtime runs every tile of a
batch through the backbone in a few batched calls, then each location's head
on its block of features. ``head(backbone(x))`` is checked against the eager
location model exactly as the per-location graphs are.

INT8 (``--precision int8``): the backbone graph is quantized once (QDQ,
per-channel weights, calibrated on the training tiles of every location) and
every PaDiM head is refit on the INT8 backbone's own features, then exported
in FP32 like the others (see :mod:`tilead.exporter.quantize` for why the refit).
bf16 (``--precision bf16``) keeps the FP32 backbone graph and refits the heads on
the features OpenVINO computes from it with the bf16 hint; int8_bf16 quantizes the
graph as INT8 does, then refits on OpenVINO's bf16-hinted features of the INT8
graph (:mod:`tilead.exporter.bf16`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilead.exporter.compact_heads import chunk_fp16_products
from tilead.exporter.onnx_export import check_onnx, export_like, export_location
from tilead.exporter.quantize import quantize_location
from tilead.runtime.bundle import BACKBONE_FILE, FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, location_files, sha256_file

log = logging.getLogger("tilead.exporter")
LAYOUTS = ("per_location", "shared_backbone")
SHARED_FAMILIES = ("padim", "patchcore")
"""Families whose backbone is frozen and the same at every location (the only ones that may share it)."""
CALIBRATION_MIN_PER_LOCATION = 4
"""INT8: calibration tiles taken from each location at least (when it has that many)."""
DEFAULT_LAYOUT: dict[str, str] = {}
"""The layout ``tilead-export`` writes when none is asked for, by family (others: ``per_location``).

Empty: ``per_location`` for every family until ``make bench-cpu-speed`` shows the shared layout
faster on a quiet CPU (issue #21: the default changes only on a measured gain; under the load of
the machine it was written on, the two measured within noise of each other). Set
``{"padim": "shared_backbone", "patchcore": "shared_backbone"}`` then."""


def choose_layout(layout: str | None, family: str, image_score: str) -> str:
    """The layout to export: the one asked for, checked, or the family's default.

    Args:
        layout: ``per_location``, ``shared_backbone`` or None (the default for the family).
        family: The run's detector family.
        image_score: The run's ``postprocess.image_score``.

    Raises:
        ValueError: For an unknown layout, or ``shared_backbone`` for a family
            that trains its backbone or a run that deploys the detector's own score.
    """
    if layout is None:
        default = DEFAULT_LAYOUT.get(family, "per_location")
        return default if image_score == "max" and family in SHARED_FAMILIES else "per_location"
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "shared_backbone":
        if family not in SHARED_FAMILIES:
            raise ValueError(
                f"layout shared_backbone: needs a frozen backbone shared by every location "
                f"({', '.join(SHARED_FAMILIES)}); this run's model is {family!r}: export per_location"
            )
        if image_score != "max":
            raise ValueError(
                "layout shared_backbone: the heads output only the map; this run deploys the detector's own image "
                f"score (postprocess.image_score {image_score!r}): export per_location"
            )
    return layout


class FeatureGraph(nn.Module):
    """The shared part of a location model: ``(n, C, th, tw)`` tiles to ``(n, d, fh, fw)`` features."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a tile batch."""
        out: torch.Tensor = self.embedding(x)
        return out


class HeadGraph(nn.Module):
    """One location's head: ``(n, d, fh, fw)`` features to the ``(n, 1, h, w)`` map."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map of a feature batch."""
        out: torch.Tensor = self.head(features)
        return out


def same_module(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal state and buffers (persistent or not) under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    return ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)


def shared_embedding(models: Sequence[nn.Module]) -> nn.Module:
    """The one ``embedding`` every location model shares.

    Raises:
        ValueError: If a model has no ``embedding`` / ``head`` or the embeddings differ.
    """
    for i, m in enumerate(models):
        if not isinstance(getattr(m, "embedding", None), nn.Module) or not isinstance(
            getattr(m, "head", None), nn.Module
        ):
            raise ValueError(f"layout shared_backbone: location {i}'s model has no embedding/head split")
    first = models[0].get_submodule("embedding")
    for i, m in enumerate(models[1:], start=1):
        if m.get_submodule("embedding") is not first and not same_module(m.get_submodule("embedding"), first):
            raise ValueError(
                f"layout shared_backbone: location {i}'s embedding differs from location 0's (weights, channel "
                "subset or size); export per_location"
            )
    return first


@dataclass
class SharedExport:
    """What :func:`export_shared` wrote into the bundle folder."""

    backbone: dict[str, Any]
    entries: list[dict[str, Any]]
    parity: dict[str, float]
    quantization: dict[str, Any] = field(default_factory=dict)
    native: list[dict[str, Any]] = field(default_factory=list)
    """bf16: the manifest's ``native_heads`` entries (one ``heads/<name>.padim.npz`` per model)."""


def _features(session: Any, tiles: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([FEATURES_NAME], {INPUT_NAME: np.ascontiguousarray(tiles, dtype=np.float32)})[0])


def chain_difference(backbone: Any, head_path: Path, model: nn.Module, tiles: np.ndarray) -> float:
    """Max abs difference of ``head(backbone(tiles))`` (ONNX Runtime) vs the eager location model, relative to the map.

    Args:
        backbone: An ONNX Runtime session of ``backbone.onnx``.
        head_path: The location's head graph.
        model: The eager location model (tiles to map).
        tiles: float32 ``(n, C, th, tw)``.

    Raises:
        RuntimeError: If the shapes differ.
    """
    import onnxruntime as ort

    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    got = head.run([OUTPUT_NAME], {FEATURES_NAME: _features(backbone, tiles)})[0]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))).numpy()
    if got.shape != ref.shape:
        raise RuntimeError(f"{head_path}: map shape {got.shape} differs from the eager model's {ref.shape}")
    span = float(ref.max() - ref.min()) or 1.0
    return float(np.abs(got - ref).max()) / span


def export_shared(
    root: Path,
    grid: Any,
    tile_shape: tuple[int, int, int],
    models: Sequence[nn.Module],
    exported: Sequence[nn.Module],
    *,
    opset: int,
    tolerance: float,
    calibration: Callable[[int], list[np.ndarray]] | None = None,
    refit: Callable[[int, Any, nn.Module], tuple[nn.Module, int]] | None = None,
    int8_tolerance: float = 1.0,
    weight_bits: int = 8,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
    names: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
    bf16: Callable[[Path], Any] | None = None,
    quantize_bf16: bool = False,
) -> SharedExport:
    """Write ``backbone.onnx`` and ``heads/rRcC.onnx`` into ``root`` and check them.

    Args:
        root: The bundle's temporary folder.
        grid: The run's tile grid.
        tile_shape: ``(C, th, tw)``.
        models: Every location's eager model (the reference), row-major.
        exported: Every location's export variant (same embedding, the head that is traced).
        opset: ONNX opset.
        tolerance: Largest FP32 chain-vs-eager difference accepted (relative to the map's range).
        calibration: INT8 only: ``location index -> its calibration tile batches``; the backbone is
            calibrated on about as many tiles in all as one location has (spread over the locations).
        refit: INT8 only: ``(location index, INT8 backbone session, export head) -> (refit head, tiles fitted on)``.
        int8_tolerance: INT8 only: largest chain-vs-eager difference accepted on real tiles.
        weight_bits: INT8 only: the backbone's weights in 8 bits, or 7 (:data:`tilead.exporter.quantize.WEIGHT_BITS`).
        progress: Wraps the per-location loop (a progress bar).
        names: Model names when locations share models (task assignment; ``models`` then holds one per
            model and the indices above are model indices); None: the grid's location names.
        files: The heads' bundle-relative files, with ``names``; None: ``heads/rRcC.onnx``.
        bf16: bf16 and int8_bf16 only (:mod:`tilead.exporter.bf16`): ``backbone.onnx path -> a session-like bf16
            backbone``. For bf16 the backbone stays FP32 (checked like FP32's); ``refit`` gets this backbone instead
            of ONNX Runtime's, ``calibration`` gives the tiles of the parity check (nothing is quantized), and
            ``int8_tolerance`` bounds the chain's difference from the FP32 eager model.
        quantize_bf16: int8_bf16, with ``bf16``: the backbone is first quantized as for INT8 (``calibration``
            calibrates it as INT8's, its first batch per location is the parity check's), then ``bf16`` compiles
            the INT8 graph and ``refit`` reads its features.

    Returns:
        The manifest's ``backbone`` entry, the location entries, the parity per location and INT8 facts.

    Raises:
        RuntimeError: If a chain differs from its eager model beyond the tolerance.
        ValueError: If the locations do not share one embedding.
    """
    import onnxruntime as ort

    embedding = shared_embedding(list(exported))
    shared_embedding(list(models))
    backbone_path = root / BACKBONE_FILE
    graph = FeatureGraph(embedding).eval()
    export_location(graph, tile_shape, backbone_path, opset=opset, outputs=[FEATURES_NAME])
    check_onnx(backbone_path)
    quant: dict[str, Any] = {}
    quantize = calibration is not None and (bf16 is None or quantize_bf16)
    if quantize and calibration is not None:
        # An equal share from every location (one location in memory at a time): one location's worth of tiles
        # in all, but at least CALIBRATION_MIN_PER_LOCATION from each (a 16-location grid would leave 2 otherwise).
        first = calibration(0)
        available = sum(int(b.shape[0]) for b in first)
        per_location = max(-(-available // grid.num_locations), min(available, CALIBRATION_MIN_PER_LOCATION))
        spread = [np.concatenate(first)[:per_location]] if first else []
        del first
        for index in range(1, len(models)):
            tiles = calibration(index)
            if tiles:
                spread.append(np.concatenate(tiles)[:per_location])
        info = quantize_location(backbone_path, backbone_path, spread, weight_bits=weight_bits)
        check_onnx(backbone_path)
        quant = {
            "quantized_nodes": info.backbone_nodes,
            "fp32_nodes": info.fp32_nodes,
            "calibration_tiles": info.calibration_tiles,
        }
    session = ort.InferenceSession(str(backbone_path), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).standard_normal((2, *tile_shape)).astype(np.float32)
    feats = _features(session, probe)
    d, fh, fw = (int(v) for v in feats.shape[1:])
    features_session = bf16(backbone_path) if bf16 is not None else session
    if not quantize:
        with torch.inference_mode():
            ref = graph(torch.from_numpy(probe)).numpy()
        span = float(ref.max() - ref.min()) or 1.0
        diff = float(np.abs(feats - ref).max()) / span
        if diff > tolerance:
            raise RuntimeError(f"backbone.onnx differs from the eager embedding by {diff:.2e} of its range")
    entries: list[dict[str, Any]] = []
    native: list[dict[str, Any]] = []
    parity: dict[str, float] = {}
    refit_tiles = 0
    template: tuple[Path, nn.Module] | None = None
    names = list(names) if names is not None else grid.location_names()
    files = list(files) if files is not None else location_files(grid, "shared_backbone")
    with tempfile.TemporaryDirectory(prefix="tilead-heads-") as scratch:  # the template head, outside the bundle
        for index in progress(range(len(models))):
            name, rel = names[index], files[index]
            target = root / rel
            head = HeadGraph(exported[index].get_submodule("head")).eval()
            real: list[np.ndarray] = calibration(index)[:1] if calibration is not None else []
            refit_head: nn.Module | None = None
            if refit is not None:
                new, fitted = refit(index, features_session, exported[index].get_submodule("head"))
                head, refit_head = HeadGraph(new).eval(), new
                refit_tiles = max(refit_tiles, fitted)
            reused = template is not None and export_like(template[0], template[1], head, target)
            if not reused:
                export_location(head, (d, fh, fw), target, opset=opset, input_name=FEATURES_NAME)
                if template is None:  # the traced graph as exported: export_like swaps weights by their names
                    template = (Path(scratch) / "head.onnx", head)
                    shutil.copyfile(target, template[0])
            chunk_fp16_products(target)  # fp16 state stays fp16 in memory (compact_heads)
            check_onnx(target)
            # The eager reference: FP32, the plain location model; INT8, the exported backbone's own head chain.
            if bf16 is not None:
                checked = _bf16_check(features_session, target, models[index], head, real, name, rel, int8_tolerance)
                head_diff, diff = checked
                quant["head_parity"] = max(float(quant.get("head_parity", 0.0)), head_diff)
                if refit_head is not None:
                    entry, figures = _bf16_native(features_session, root, target, rel, refit_head, real, name)
                    native.append(entry)
                    for key, value in figures.items():
                        quant[key] = max(float(quant.get(key, 0.0)), value)
            elif calibration is None:
                diff = chain_difference(session, target, models[index], probe)
                if reused and diff > tolerance:
                    export_location(head, (d, fh, fw), target, opset=opset, input_name=FEATURES_NAME)
                    chunk_fp16_products(target)
                    check_onnx(target)
                    diff = chain_difference(session, target, models[index], probe)
                if diff > tolerance:
                    raise RuntimeError(
                        f"location {name}: backbone.onnx + {rel} differ from the eager model by {diff:.2e} of the map "
                        f"range (tolerance {tolerance:.0e})"
                    )
            else:
                diff = chain_difference(session, target, models[index], real[0])
                if diff > int8_tolerance:
                    raise RuntimeError(
                        f"location {name}: the INT8 backbone + {rel} differ from the eager model by {diff:.2e} of the "
                        f"map range on training tiles (INT8 tolerance {int8_tolerance})"
                    )
            parity[name] = diff
            entries.append({"name": name, "file": rel, "sha256": sha256_file(target), "bytes": target.stat().st_size})
            log.info("exported %s head (%.1f MiB, parity %.1e)", name, target.stat().st_size / 2**20, diff)
    backbone = {
        "name": "backbone",
        "file": BACKBONE_FILE,
        "sha256": sha256_file(backbone_path),
        "bytes": backbone_path.stat().st_size,
        "output": FEATURES_NAME,
        "features": [d, fh, fw],
    }
    if (quant or bf16 is not None) and refit is not None:
        quant["head_refit_tiles"] = refit_tiles
    return SharedExport(backbone, entries, parity, quant, native)


def _bf16_native(
    backbone: Any, root: Path, target: Path, rel: str, head: nn.Module, real: list[np.ndarray], name: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """Write a bf16 model's native head next to its graph and check it (:func:`tilead.exporter.bf16.native_parity`).

    Returns:
        The manifest's ``native_heads`` entry and the parity figures recorded in ``source.quantization``:
        ``native_head_parity`` (native vs graph), ``native_head_exact`` and ``graph_head_exact`` (each vs
        the float64 map), relative to the exact map's range, and ``native_head_vs_rounding_bound`` (the native
        head's largest difference from the exact map over float32 rounding's bound there).

    Raises:
        RuntimeError: If the graph is farther than :data:`~tilead.exporter.bf16.BF16_HEAD_TOLERANCE` from the exact
            map, or the native head beyond :data:`~tilead.exporter.bf16.NATIVE_HEAD_TOLERANCE`, more than
            :data:`~tilead.exporter.bf16.NATIVE_VS_GRAPH_ERROR` times as far as the graph and beyond float32
            rounding's bound (:func:`~tilead.exporter.bf16.rounding_bound`).
    """
    from tilead.exporter.bf16 import (
        BF16_HEAD_TOLERANCE,
        NATIVE_HEAD_TOLERANCE,
        NATIVE_VS_GRAPH_ERROR,
        native_head,
        native_parity,
    )
    from tilead.runtime.native_heads import native_file

    native = native_head(head)
    file = native_file(rel)
    native.save(root / file)
    vs_graph, native_exact, graph_exact, vs_bound = native_parity(backbone, target, native, head, real[0][:4])
    if not graph_exact <= BF16_HEAD_TOLERANCE:
        raise RuntimeError(
            f"location {name}: {rel} differs from its float64 map on the same bf16 features by {graph_exact:.2e} "
            f"of the map range (tolerance {BF16_HEAD_TOLERANCE:.0e})"
        )
    if not (native_exact <= max(NATIVE_HEAD_TOLERANCE, NATIVE_VS_GRAPH_ERROR * graph_exact) or vs_bound <= 1.0):
        raise RuntimeError(
            f"location {name}: the native head {file} differs from the float64 map on the same bf16 features by "
            f"{native_exact:.2e} of the map range, {rel} by {graph_exact:.2e}, and by up to {vs_bound:.3g} times "
            f"float32 rounding's bound (accepted: up to {NATIVE_HEAD_TOLERANCE:.0e}, {NATIVE_VS_GRAPH_ERROR:g} "
            "times the graph's, or within the rounding bound)"
        )
    entry = {"name": name, "file": file, "sha256": sha256_file(root / file), "bytes": (root / file).stat().st_size}
    figures = {
        "native_head_parity": vs_graph,
        "native_head_exact": native_exact,
        "graph_head_exact": graph_exact,
        "native_head_vs_rounding_bound": vs_bound,
    }
    return entry, figures


def _bf16_check(
    backbone: Any,
    target: Path,
    model: nn.Module,
    head: nn.Module,
    real: list[np.ndarray],
    name: str,
    rel: str,
    tolerance: float,
) -> tuple[float, float]:
    """A bf16 location's parity (:func:`tilead.exporter.bf16.bf16_parity`), refused beyond its tolerances."""
    from tilead.exporter.bf16 import BF16_HEAD_TOLERANCE, bf16_parity

    if not real:
        raise ValueError(f"location {name}: no training tiles for the bf16 parity check")
    head_diff, chain = bf16_parity(backbone, target, model, head, real[0][:4])
    if head_diff > BF16_HEAD_TOLERANCE:
        raise RuntimeError(
            f"location {name}: {rel} differs from the refit eager head on the same bf16 features by {head_diff:.2e} "
            f"of the map range (tolerance {BF16_HEAD_TOLERANCE:.0e})"
        )
    if chain > tolerance:
        raise RuntimeError(
            f"location {name}: the bf16 backbone + {rel} differ from the FP32 eager model by {chain:.2e} "
            f"of the map range on training tiles (bf16 tolerance {tolerance})"
        )
    return head_diff, chain


def refit_padim(session: Any, head: Any, batches: Iterable[np.ndarray], eps: float) -> tuple[nn.Module, int]:
    """A PaDiM head fitted again on the (INT8) backbone session's features of a location's training tiles.

    Args:
        session: ONNX Runtime session of ``backbone.onnx``.
        head: The location's export head (a ``BlockRowPadimHead``): its size, blur, block count and storage dtype.
        batches: The location's training tiles, float32 ``(n, C, th, tw)``.
        eps: The run's covariance regularization.

    Returns:
        The refit ``BlockRowPadimHead`` and the number of tiles it was fitted on.
    """
    from tilead.trainer.detectors.padim.model import BlockRowPadimHead, PadimAccumulator

    h, w = head.size
    acc = PadimAccumulator(h * w, int(head.mean.shape[1]))
    for batch in batches:
        acc.update(torch.from_numpy(_features(session, batch)))
    mean, inv_cov = acc.finalize(eps)
    refit = BlockRowPadimHead(mean, inv_cov.to(head.row0.dtype), (h, w), head.blur_sigma, blocks=len(head.bounds) - 1)
    return refit.eval(), acc.count
