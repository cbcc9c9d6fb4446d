"""Small real bundles without torch: ONNX graphs built with ``onnx.helper``, run by the real ONNX Runtime.

Each location's model maps tiles ``(n, C, th, tw)`` to ``map`` ``(n, 1, h, w)``:
the channel mean, average-pooled to the map size, times a per-location gain
(so every location's file and hash differ). With ``detector=True`` it also
outputs ``score`` ``(n,)``, the map's max. The parameters let a test build
models that disagree with the manifest (names, channels, sizes, batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import reference

from tilead.runtime import TileGrid
from tilead.runtime.bundle import SCHEMA_VERSION, location_files, sha256_file, write_manifest

GRID = {"image_size": [64, 64], "tile_size": [40, 40], "stride": [24, 24], "edge": "shift"}
MAP_SIZE = (5, 5)


def onnx_model(
    gain: float,
    *,
    channels: int = 3,
    tile: tuple[int, int] = (40, 40),
    map_size: tuple[int, int] = MAP_SIZE,
    input_name: str = "tiles",
    output_name: str = "map",
    batch: int | str = "n",
    detector: bool = False,
) -> bytes:
    """Serialized ONNX model of one location (opset 17)."""
    import onnx
    from onnx import TensorProto, helper

    th, tw = tile
    h, w = map_size
    kernel = [th // h, tw // w]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["mean"], ["pooled"], kernel_shape=kernel, strides=kernel),
        helper.make_node("Mul", ["pooled", "gain"], [output_name]),
    ]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 1, h, w])]
    if detector:
        nodes.append(helper.make_node("ReduceMax", [output_name], ["score"], axes=[1, 2, 3], keepdims=0))
        outputs.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(
        nodes,
        "location",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, channels, th, tw])],
        outputs,
        initializer=[helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def normalization(stage: str = "image") -> dict[str, Any]:
    """Statistics that fit the models above on uint8 images (maps lie in about [-2.2, 2.7])."""
    if stage == "none":
        return {"stage": "none", "pixel_threshold": 1.0, "image_threshold": 1.5}
    return {
        "stage": "image",
        "pixel_threshold": 1.0,
        "image_threshold": 1.5,
        "pixel_range": [-2.5, 3.0],
        "image_range": [-2.5, 3.0],
        "tile_stats": None,
    }


def manifest_data(
    root: Path,
    *,
    detector: bool = False,
    stage: str = "image",
    grid_data: dict[str, Any] | None = None,
    layout: str = "per_location",
) -> dict[str, Any]:
    """The manifest of the files under ``root`` (written by :func:`make_bundle` / :func:`make_shared_bundle`).

    Without digest; ``layout`` ``shared_backbone`` adds ``layout`` and the ``backbone`` entry.
    """
    grid_data = dict(GRID if grid_data is None else grid_data)
    grid = TileGrid.from_dict(grid_data)
    locations = []
    shared: dict[str, Any] = {}
    if layout == "shared_backbone":
        path = root / "backbone.onnx"
        entry = {"name": "backbone", "file": "backbone.onnx", "sha256": sha256_file(path), "bytes": path.stat().st_size}
        shared = {"layout": layout, "backbone": {**entry, "output": "features", "features": [FEATURES, *MAP_SIZE]}}
    for name, rel in zip(grid.location_names(), location_files(grid, layout), strict=True):
        path = root / rel
        locations.append({"name": name, "file": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return {
        "schema_version": SCHEMA_VERSION,
        "tilead_version": "0.1.0",
        "created": "2026-12-01T00:00:00+00:00",
        "grid": grid_data,
        "preprocessing": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "channels": 3,
            "color_order": "RGB",
            "dtype": "float32",
        },
        "model": {
            "family": "padim",
            "map_size": list(MAP_SIZE),
            "input": "tiles",
            "output": "map",
            "dtype": "float32",
            **({"score_output": "score"} if detector else {}),
        },
        "locations": locations,
        "postprocess": {
            "weights": "feather",
            "seam": None,
            "image_score": "detector" if detector else "max",
        },
        "normalization": normalization(stage),
        "source": {"run": "synthetic"},
        **shared,
    }


def make_bundle(
    root: Path, *, detector: bool = False, stage: str = "image", grid_data: dict[str, Any] | None = None, **model: Any
) -> Path:
    """Write a bundle at ``root`` (``model`` keywords go to :func:`onnx_model` for every location).

    ``grid_data`` is the manifest's grid (default :data:`GRID`, 2x2 locations of 40x40 tiles).
    """
    grid = TileGrid.from_dict(GRID if grid_data is None else grid_data)
    for i, rel in enumerate(location_files(grid)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(onnx_model(1.0 + 0.25 * i, detector=detector, **model))
    write_manifest(root, manifest_data(root, detector=detector, stage=stage, grid_data=grid_data))
    return root


FEATURES = 2
"""Channels of the shared backbone's features in :func:`make_shared_bundle`."""


def backbone_model(
    *,
    channels: int = 3,
    tile: tuple[int, int] = (40, 40),
    map_size: tuple[int, int] = MAP_SIZE,
    output_name: str = "features",
    features: int = FEATURES,
) -> bytes:
    """Serialized ONNX shared backbone: tiles ``(n, C, th, tw)`` to ``features`` ``(n, features, h, w)``.

    Channel ``k`` of the features is ``(k + 1)`` times the pooled channel mean, so their
    channel mean is ``(features + 1) / 2`` times the pooled mean.
    """
    import onnx
    from onnx import TensorProto, helper

    th, tw = tile
    h, w = map_size
    kernel = [th // h, tw // w]
    scales = [float(k + 1) for k in range(features)]
    nodes = [
        helper.make_node("ReduceMean", ["tiles"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["mean"], ["pooled"], kernel_shape=kernel, strides=kernel),
        helper.make_node("Mul", ["pooled", "scales"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "backbone",
        [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["n", channels, th, tw])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["n", features, h, w])],
        initializer=[helper.make_tensor("scales", TensorProto.FLOAT, [1, features, 1, 1], scales)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def head_model(
    gain: float, *, map_size: tuple[int, int] = MAP_SIZE, input_name: str = "features", features: int = FEATURES
) -> bytes:
    """Serialized ONNX head: ``features`` ``(n, features, h, w)`` to ``map`` ``(n, 1, h, w)`` (channel mean x gain)."""
    import onnx
    from onnx import TensorProto, helper

    h, w = map_size
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "gain"], ["map"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", features, h, w])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["n", 1, h, w])],
        initializer=[helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def make_shared_bundle(
    root: Path,
    *,
    grid_data: dict[str, Any] | None = None,
    backbone: bytes | None = None,
    heads: list[bytes] | None = None,
) -> Path:
    """A ``shared_backbone`` bundle whose maps equal :func:`make_bundle`'s (same grid).

    Location ``i``'s head gain is ``(1 + 0.25 i) / ((FEATURES + 1) / 2)``, so
    ``head(backbone(x))`` is :func:`make_bundle`'s location model. ``backbone`` and
    ``heads`` replace the files (models that disagree with the manifest).
    """
    grid = TileGrid.from_dict(GRID if grid_data is None else grid_data)
    root.mkdir(parents=True, exist_ok=True)
    (root / "backbone.onnx").write_bytes(backbone_model() if backbone is None else backbone)
    for i, rel in enumerate(location_files(grid, "shared_backbone")):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        gain = (1.0 + 0.25 * i) / ((FEATURES + 1) / 2)
        path.write_bytes(head_model(gain) if heads is None else heads[i])
    data = manifest_data(root, grid_data=grid_data, layout="shared_backbone")
    write_manifest(root, data)
    return root


PREP_MEAN = [0.485, 0.456, 0.406]
PREP_STD = [0.229, 0.224, 0.225]


def reference_location_maps(images: np.ndarray, swap_rb: bool) -> np.ndarray:
    """What :func:`make_bundle`'s default models output, by tests/reference.py: float64 ``(4, n, 5, 5)``.

    Each location: channel mean of the normalized tile, 8x8 average pooling to 5x5, times 1 + 0.25 * location.
    """
    tiles = reference.tile(images, (40, 40), (24, 24), "shift", PREP_MEAN, PREP_STD, 3, swap_rb)  # (L, n, 3, 40, 40)
    pooled = tiles.mean(axis=2).reshape(4, images.shape[0], 5, 8, 5, 8).mean(axis=(3, 5))
    result: np.ndarray = pooled * (1.0 + 0.25 * np.arange(4))[:, None, None, None]
    return result


def reference_outputs(images: np.ndarray, swap_rb: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps, raw scores, scores)`` of :func:`make_bundle`'s default bundle for uint8 ``(n, 64, 64, 3)``.

    The location maps of :func:`reference_location_maps`, feather untiling, no seam smoothing, image-stage
    normalization, all by tests/reference.py in float64.
    """
    merged = reference.untile(
        reference_location_maps(images, swap_rb), (64, 64), (40, 40), (24, 24), "shift", "feather"
    )
    norm, _, raw, scores = reference.normalize(merged, 1.0, 1.5, (-2.5, 3.0), (-2.5, 3.0))
    return norm, raw, scores
