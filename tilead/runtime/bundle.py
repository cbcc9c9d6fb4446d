"""The bundle: the one interface between the exporter and the runtime.

A bundle is a directory::

    manifest.json        schema version, tilead version, grid, preprocessing, model,
                         per-location files with sha256, post-processing, statistics
    tiles/rRcC.onnx      one ONNX model per tile location (input "tiles"
                         (n, C, th, tw) float32, output "map" (n, 1, h, w) float32;
                         with postprocess.image_score "detector" also output
                         "score" (n,) float32, the detector's own image score)

Layouts (the manifest's ``layout``; absent means ``per_location``):

* ``per_location``: the files above, each location's full graph (backbone + head).
* ``shared_backbone`` (frozen-backbone detectors, PaDiM and PatchCore): one
  ``backbone.onnx`` (input "tiles" (n, C, th, tw), output "features"
  (n, d, fh, fw); the manifest's ``backbone`` entry lists its file, sha256,
  bytes and ``features`` shape ``[d, fh, fw]``) that every tile of every
  location goes through, and ``heads/rRcC.onnx`` per location (input
  "features" (n, d, fh, fw), output "map" as above). ``head(backbone(x))``
  equals the per-location graph of that location.

Thumbnail branch (optional; the manifest's ``thumbnail`` entry, absent = off):
``thumbnail.onnx`` (input "tiles" (n, C, size, size): whole images resized to
``size``; output "map" (n, 1, h, w) with ``(h, w)`` the entry's ``map_size``),
its fusion (``max`` or ``weighted`` with the weight validation chose), both
branches' validation statistics, file, sha256 and bytes
(:class:`tilead.runtime.thumbnail.ThumbnailBranch`). The ``normalization``
statistics of such a bundle were measured on the fused maps.

Shared models (task assignment; the manifest's ``assignment``, absent means
``one_to_one``). Locations may share a model: ``assignment`` names the mode
(``all_to_one``, ``neighbourhood``, ``cluster``), ``models`` lists one file per
model (``{"name": "m0", "file": "tiles/m0.onnx", "sha256", "bytes"}``, names
``m0``, ``m1``, ... in order; ``heads/mK.onnx`` with a shared backbone) and
``locations`` becomes the location -> model table
(``[{"name": "r0c0", "model": "m0"}, ...]``, row-major). Every location is
mapped and every model serves at least one location; the runtime runs a
model's locations' tiles through it in one batched call per model without
location workers (a GPU), one call per location with them (a CPU:
:func:`tilead.runtime.backends.base.location_jobs`).

Integrity (schema 2). The manifest carries ``manifest_sha256``, the sha256
of its own canonical JSON without that key (:func:`manifest_digest`: sorted
keys, compact separators, ASCII); :func:`read_manifest` refuses a manifest
whose content does not match, so thresholds are changed with
``tilead-calibrate`` (which rewrites the digest), never by hand. Schema 1
bundles carry no digest and are refused with a request to re-export.

Native heads (bf16 bundles, #21). ``native_heads`` lists, in model order, one
``{"name", "file", "sha256", "bytes"}`` per model: ``heads/<name>.padim.npz``
next to the model's ``heads/<name>.onnx`` (the Gaussians for the C++ kernel,
:mod:`tilead.runtime.native_heads`; the ``hybrid`` backend runs them instead
of the heads' graphs). Optional (older bf16 bundles have none); only bundles
whose heads were refit on OpenVINO (precision ``bf16`` or ``int8_bf16``,
:func:`refit_on_openvino`) may carry it.

Hostile input. Everything a bundle can hold fails at load with
:class:`BundleError` naming the key or file: the manifest file is at most
:data:`MAX_MANIFEST_BYTES` (checked before reading), nested at most
:data:`MAX_JSON_DEPTH` deep, without duplicate keys, NaN or infinities; every
value is type- and range-checked (bool is not an int; sizes are bounded and
the number of locations is checked against :data:`MAX_LOCATIONS` before any
per-location list is built); every location's file is that location's own
``tiles/rRcC.onnx`` (shared models: ``tiles/mK.onnx``); engines are
``engines/<key>/<model>.engine``, one per model, and ``engines/<key>/thumbnail.engine``
for a bundle with a thumbnail branch.

Files. :func:`read_verified_file` opens a listed file once (no symbolic link
anywhere below the bundle root, regular files only), reads it, checks size
and sha256 on the bytes read and returns those bytes, which the backends
load: the file hashed is the file loaded. :func:`check_model_io` compares the
inputs and outputs an inference session reports with the manifest. Nothing
in a bundle is pickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilead.atomic import atomic_write_text
from tilead.runtime import orientation
from tilead.runtime._checks import as_int, as_pair, check_mapping, describe
from tilead.runtime.cpu_features import ARITHMETICS
from tilead.runtime.engines import EngineSet, parse_engine_sets
from tilead.runtime.files import LocationFile, parse_location_file
from tilead.runtime.geometry import MAX_SIDE, TileGrid, location_name
from tilead.runtime.native_heads import native_file
from tilead.runtime.postprocess import BlendWeights, SeamSmoothing, parse_seam
from tilead.runtime.postprocessor import IMAGE_SCORES, NormalizationStats
from tilead.runtime.preprocess import Preprocessing
from tilead.runtime.thumbnail import THUMBNAIL_FILE, ThumbnailBranch, parse_thumbnail

SCHEMA_VERSION = 2
DIGEST_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 * 2**20
"""Largest accepted ``manifest.json`` (a real one is a few KiB; checked before reading)."""
MAX_JSON_DEPTH = 32
"""Deepest accepted nesting of the manifest's JSON (a real one nests 5 deep)."""
MAX_LOCATIONS = 4096
"""Most tile locations a bundle may declare (one model file each)."""
MANIFEST = "manifest.json"
INPUT_NAME = "tiles"
OUTPUT_NAME = "map"
SCORE_NAME = "score"
FEATURES_NAME = "features"
LAYOUTS = ("per_location", "shared_backbone")
SHARED_ASSIGNMENTS = ("all_to_one", "neighbourhood", "cluster")
"""Task-assignment modes whose bundles carry a ``models`` table (absent ``assignment``: ``one_to_one``)."""
BACKBONE_FILE = "backbone.onnx"
_TOP_KEYS = (
    "schema_version",
    "tilead_version",
    "created",
    "grid",
    "preprocessing",
    "model",
    "locations",
    "postprocess",
    "normalization",
    "source",
    "engines",
    "calibration",
    "layout",
    "backbone",
    "thumbnail",
    "assignment",
    "models",
    "native_heads",
    DIGEST_KEY,
)
_REQUIRED = ("schema_version", "grid", "preprocessing", "model", "locations", "postprocess", "normalization")


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, tampered with, or from an unknown schema."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as an inference session reports it.

    Attributes:
        name: Tensor name.
        dtype: Element type as a numpy name (``"float32"``, ``"float16"``, ...).
        shape: Dimensions; None (or a symbolic name) for a dynamic one.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``.

    Attributes:
        grid: Tile grid.
        preprocessing: Tile preprocessing.
        model: Model facts (family, output stride, map size, ...).
        locations: One file per location, row-major.
        weights: Untile blend weights.
        seam: Seam smoothing, or None: off.
        stats: Normalization statistics.
        tilead_version: Version that wrote the bundle.
        raw: The manifest as read.
        image_score: ``max`` (of the final map) or ``detector`` (every
            location's graph has the output ``score``; the image score is its
            max over the image's tiles, normalized with ``stats``' image range).
        layout: ``per_location`` or ``shared_backbone`` (see the module docstring).
        backbone: The shared backbone's file (``shared_backbone`` only, else None).
        features: ``(d, fh, fw)`` of the backbone's ``features`` output (``shared_backbone`` only).
        thumbnail: The thumbnail branch (``thumbnail.onnx``, its fusion and statistics), or None
            (absent from the manifest: no thumbnail branch).
        models: One file per model (for ``one_to_one`` the locations' own files; see the module docstring).
        location_model: Model index of every location, row-major.
        assignment: ``one_to_one`` or one of :data:`SHARED_ASSIGNMENTS`.
        location_transform: Orientation of every location's tiles before its model
            (:mod:`tilead.runtime.orientation`; the map is transformed back), row-major;
            empty when no location is oriented (the manifest's ``locations[i].transform``).
        native_heads: bf16 and int8_bf16 bundles: every model's native head file (``heads/<name>.padim.npz``), in model
            order, or empty (none written: the heads' graphs run).
    """

    grid: TileGrid
    preprocessing: Preprocessing
    model: dict[str, Any]
    locations: tuple[LocationFile, ...]
    weights: BlendWeights
    seam: SeamSmoothing | None
    stats: NormalizationStats
    tilead_version: str
    raw: dict[str, Any]
    image_score: str = "max"
    layout: str = "per_location"
    backbone: LocationFile | None = None
    features: tuple[int, int, int] | None = None
    thumbnail: ThumbnailBranch | None = None
    models: tuple[LocationFile, ...] = ()
    location_model: tuple[int, ...] = ()
    assignment: str = "one_to_one"
    location_transform: tuple[int, ...] = ()
    native_heads: tuple[LocationFile, ...] = ()

    def transform(self, location: int) -> int:
        """Orientation of a location's tiles (0: as cut)."""
        return self.location_transform[location] if self.location_transform else 0

    def __post_init__(self) -> None:
        if not self.models:  # one model per location
            object.__setattr__(self, "models", self.locations)
            object.__setattr__(self, "location_model", tuple(range(len(self.locations))))

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Location indices (row-major) each model serves, in model order."""
        out: list[list[int]] = [[] for _ in self.models]
        for loc, model in enumerate(self.location_model):
            out[model].append(loc)
        return tuple(tuple(g) for g in out)

    @property
    def shared_models(self) -> bool:
        """Whether some model serves several locations (the bundle has a ``models`` table)."""
        return self.assignment != "one_to_one"

    @property
    def files(self) -> tuple[LocationFile, ...]:
        """Every model file, each once: the shared backbone (when there is one), the models', then the thumbnail's."""
        files = self.models if self.backbone is None else (self.backbone, *self.models)
        return files if self.thumbnail is None or self.thumbnail.file is None else (*files, self.thumbnail.file)

    @property
    def engine_sets(self) -> tuple[EngineSet, ...]:
        """TensorRT engine sets built for this bundle (validated when the manifest was read)."""
        return parse_engine_sets(
            self.raw.get("engines"), [m.name for m in self.models], thumbnail=self.thumbnail is not None
        )

    @property
    def backbone_input(self) -> str:
        """``model.backbone_input`` (:data:`BACKBONE_INPUTS`): ``"uint8"`` or ``"float32"`` (absent)."""
        return str(self.model.get("backbone_input", "float32"))

    @property
    def precision(self) -> str:
        """``model.precision`` (:data:`PRECISIONS`; absent: ``"fp32"``)."""
        return str(self.model.get("precision", "fp32"))

    @property
    def int8_weight_bits(self) -> int | None:
        """``model.int8_weight_bits`` of an INT8 bundle (absent: 8, as exported before it existed); None otherwise."""
        if self.precision not in QUANTIZED_PRECISIONS:
            return None
        return int(self.model.get("int8_weight_bits", 8))

    @property
    def int8_arithmetic(self) -> str | None:
        """``model.int8_arithmetic``: how the exporting CPU summed INT8 products when the heads were refit.

        :data:`tilead.runtime.cpu_features.ARITHMETICS`; None when not recorded (not ``int8``, or exported before
        the key, or on a CPU whose INT8 path is not known).
        """
        value = self.model.get("int8_arithmetic")
        return None if value is None else str(value)

    @property
    def openvino_refit(self) -> bool:
        """Whether the heads were refit on OpenVINO's backbone run with the bf16 hint (:func:`refit_on_openvino`).

        Such a bundle (precision ``bf16`` or ``int8_bf16``) runs only where its backbone gives those features:
        OpenVINO with ``INFERENCE_PRECISION_HINT`` ``bf16`` on a CPU with bfloat16 units (the ``hybrid`` backend).
        """
        return refit_on_openvino(self.precision)

    @property
    def uint8_backbone(self) -> bool:
        """Whether the backbone takes uint8 channels-last tiles (:attr:`backbone_input` ``"uint8"``)."""
        return self.backbone_input == "uint8"

    @property
    def map_size(self) -> tuple[int, int]:
        """``(h, w)`` of each location's output map."""
        h, w = self.model["map_size"]
        return int(h), int(w)


PRECISIONS = ("fp32", "int8", "bf16", "int8_bf16")
"""``model.precision``: FP32 graphs; INT8 (QDQ backbones, for ONNX Runtime); bf16 (``shared_backbone``
FP32 graphs whose heads were refit on OpenVINO's bf16 backbone features: the ``hybrid`` backend); or
int8_bf16 (``shared_backbone``, the INT8 QDQ backbone graph, heads refit on the features OpenVINO computes
from it with the bf16 hint: the ``hybrid`` backend)."""

INT8_WEIGHT_BITS = (7, 8)
"""``model.int8_weight_bits``: 8, INT8 weights' full range; 7, ONNX Runtime's ``reduce_range`` (weights in [-64, 64]),
whose uint8 x int8 pair sums fit AVX2's saturating 16-bit ``vpmaddubsw`` (:mod:`tilead.runtime.cpu_features`)."""

QUANTIZED_PRECISIONS = ("int8", "int8_bf16")
"""Precisions whose backbone is an INT8 QDQ graph (``model.int8_weight_bits`` says how its weights were rounded)."""

OPENVINO_REFIT_PRECISIONS = ("bf16", "int8_bf16")
"""Precisions whose heads were refit on OpenVINO's backbone with ``INFERENCE_PRECISION_HINT`` ``bf16``."""


def refit_on_openvino(precision: str) -> bool:
    """Whether a bundle of this ``model.precision`` has heads refit on OpenVINO's bf16-hinted backbone.

    Such bundles need that very backbone at run time (the ``hybrid`` backend; ONNX Runtime refuses them):
    ``shared_backbone`` layout, optional native heads and uint8 tiles (:data:`OPENVINO_REFIT_PRECISIONS`).
    """
    return precision in OPENVINO_REFIT_PRECISIONS


_MODEL_KEYS = (
    "family",
    "output_stride",
    "map_size",
    "input",
    "output",
    "opset",
    "backbone",
    "dtype",
    "mahalanobis_blocks",
    "detector",
    "score_output",
    "precision",
    "backbone_input",
    "int8_weight_bits",
    "int8_arithmetic",
)

BACKBONE_INPUTS = ("float32", "uint8")
"""``model.backbone_input``: how OpenVINO's compiled backbone of a bf16 bundle takes its tiles.

``float32`` (absent: bundles exported before issue #21 item 3): normalized ``(n, C, th, tw)`` tiles
(:func:`tilead.runtime.preprocess.tile_images`); ``uint8``: the pixels as they are, ``(n, th, tw, C)``
(:func:`tilead.runtime.preprocess.tile_images_u8`), converted and normalized inside the compiled model
(:func:`tilead.runtime.backends.openvino.uint8_input`). The two give features that differ by bf16
rounding, and the heads were refit on one of them, so the bundle says which."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits[:9]) if digits else 0)
    return tuple(parts)


def _optional_str(model: Mapping[str, Any], key: str, where: str) -> None:
    if key in model and not isinstance(model[key], str):
        raise ValueError(f"{where}.{key}: expected a string, got {describe(model[key])}")


def _parse_model(data: object, grid: TileGrid) -> dict[str, Any]:
    """Validate the manifest's ``model`` section against the grid."""
    model = dict(check_mapping(data, "model", _MODEL_KEYS, ("family", "map_size")))
    for key in ("family", "backbone"):
        _optional_str(model, key, "model")
    if model.get("detector") is not None and not isinstance(model["detector"], Mapping):
        raise ValueError(f"model.detector: expected a mapping, got {describe(model['detector'])}")
    raw_size = model["map_size"]
    if not isinstance(raw_size, list):
        raise ValueError(f"model.map_size: expected [height, width], got {describe(raw_size)}")
    h, w = as_pair(raw_size, "model.map_size", maximum=MAX_SIDE)
    th, tw = grid.tile_size
    if h > th or w > tw:
        raise ValueError(f"model.map_size: expected at most the tile size {th} x {tw}, got {h} x {w}")
    model["map_size"] = [h, w]
    precision = model.get("precision", "fp32")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        choices = ", ".join(map(repr, PRECISIONS))
        raise ValueError(f"model.precision: expected one of {choices}, got {describe(precision)}")
    if "int8_weight_bits" in model:
        bits = model["int8_weight_bits"]
        if precision not in QUANTIZED_PRECISIONS:
            raise ValueError(
                f"model.int8_weight_bits: only INT8 bundles have it (precision {' or '.join(QUANTIZED_PRECISIONS)}), "
                f"not {precision!r}"
            )
        if isinstance(bits, bool) or bits not in INT8_WEIGHT_BITS:
            raise ValueError(f"model.int8_weight_bits: expected 7 or 8, got {describe(bits)}")
    if "int8_arithmetic" in model:
        arithmetic = model["int8_arithmetic"]
        if precision != "int8":
            raise ValueError(f"model.int8_arithmetic: only int8 bundles have it, not {precision!r}")
        if not isinstance(arithmetic, str) or arithmetic not in ARITHMETICS:
            choices = ", ".join(map(repr, ARITHMETICS))
            raise ValueError(f"model.int8_arithmetic: expected one of {choices}, got {describe(arithmetic)}")
    backbone_input = model.get("backbone_input", "float32")
    if not isinstance(backbone_input, str) or backbone_input not in BACKBONE_INPUTS:
        choices = ", ".join(map(repr, BACKBONE_INPUTS))
        raise ValueError(f"model.backbone_input: expected one of {choices}, got {describe(backbone_input)}")
    if backbone_input == "uint8":
        if not refit_on_openvino(precision):
            raise ValueError(
                f"model.backbone_input 'uint8': only bf16 bundles take uint8 tiles (precision "
                f"{' or '.join(OPENVINO_REFIT_PRECISIONS)}), not {precision!r}"
            )
        if grid.edge == "resize":
            raise ValueError("model.backbone_input 'uint8': needs the edge policy 'shift' or 'pad', not 'resize'")
    for key, expected in (("input", INPUT_NAME), ("output", OUTPUT_NAME), ("dtype", "float32")):
        if key in model and model[key] != expected:
            raise ValueError(f"model.{key}: expected {expected!r}, got {describe(model[key])}")
    for key, high in (("output_stride", MAX_SIDE), ("opset", 1000), ("mahalanobis_blocks", MAX_SIDE)):
        if key in model:
            as_int(model[key], f"model.{key}", maximum=high)
    return model


def parse_manifest(data: Any, *, source: str = MANIFEST, current_version: str | None = None) -> Manifest:
    """Validate manifest data (structure, types and ranges; not the digest, see :func:`read_manifest`).

    Args:
        data: The parsed JSON.
        source: Name used in error messages.
        current_version: This tilead's version (a bundle from a newer one is refused).

    Returns:
        The manifest.

    Raises:
        BundleError: For an unknown schema version, a newer tilead, missing or
            unknown keys, or invalid values (the message names the key).
    """
    if not isinstance(data, Mapping):
        raise BundleError(f"{source}: expected a JSON object, got {describe(data)}")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        hint = ""
        if type(version) is int and version == 1:
            hint = " (schema 1 bundles carry no manifest digest: re-export the run with tilead-export)"
        raise BundleError(
            f"{source}: unknown bundle schema_version {describe(version)}; this tilead reads schema {SCHEMA_VERSION}"
            + hint
        )
    writer = data.get("tilead_version", "0")
    if not isinstance(writer, str):
        raise BundleError(f"{source}: tilead_version: expected a string, got {describe(writer)}")
    if current_version is not None and _version_tuple(writer) > _version_tuple(current_version):
        raise BundleError(
            f"{source}: the bundle was written by tilead {writer}, newer than this tilead {current_version}; "
            "upgrade tilead to load it"
        )
    try:
        d = check_mapping(data, source, _TOP_KEYS, _REQUIRED)
        for key in ("created", DIGEST_KEY):
            _optional_str(d, key, "manifest")
        for key in ("source", "calibration"):
            if d.get(key) is not None and not isinstance(d[key], Mapping):
                raise ValueError(f"{key}: expected a mapping, got {describe(d[key])}")
        grid = TileGrid.from_dict(d["grid"])
        if grid.num_locations > MAX_LOCATIONS:  # before any per-location list is built
            raise ValueError(
                f"grid: {grid.rows} x {grid.cols} = {grid.num_locations} locations, more than the "
                f"{MAX_LOCATIONS} a bundle may have"
            )
        prep = Preprocessing.from_dict(d["preprocessing"])
        model = _parse_model(d["model"], grid)
        post = check_mapping(d["postprocess"], "postprocess", ("weights", "seam", "image_score"), ("weights",))
        weights = post["weights"]
        if not isinstance(weights, str) or weights not in ("uniform", "feather"):
            raise ValueError(f"postprocess.weights: expected 'uniform' or 'feather', got {describe(weights)}")
        seam = parse_seam(post.get("seam"))  # None: off (null, or a sigma or width of 0)
        image_score = post.get("image_score", "max")
        if not isinstance(image_score, str) or image_score not in IMAGE_SCORES:
            raise ValueError(f"postprocess.image_score: expected 'max' or 'detector', got {describe(image_score)}")
        if (image_score == "detector") != ("score_output" in model):
            raise ValueError(
                "postprocess.image_score 'detector' and model.score_output go together "
                f"(image_score {image_score!r}, score_output {describe(model.get('score_output'))})"
            )
        if image_score == "detector" and model["score_output"] != SCORE_NAME:
            raise ValueError(f"model.score_output: expected {SCORE_NAME!r}, got {describe(model['score_output'])}")
        stats = NormalizationStats.from_dict(d["normalization"])
        locs = d["locations"]
        if not isinstance(locs, list):
            raise ValueError(f"locations: expected a list, got {describe(locs)}")
        expected = grid.location_names()
        if len(locs) != len(expected):
            raise ValueError(
                f"locations: expected one entry per grid location ({len(expected)}, row-major), got {len(locs)}"
            )
        layout = d.get("layout", "per_location")
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {describe(layout)}")
        backbone, features = _parse_backbone(d.get("backbone"), layout, image_score, grid)
        if refit_on_openvino(model.get("precision", "fp32")) and layout != "shared_backbone":
            raise ValueError(
                f"model.precision {model['precision']!r}: expected layout 'shared_backbone', got {layout!r}"
            )
        assignment = d.get("assignment", "one_to_one")
        model_files: tuple[LocationFile, ...] = ()
        table: tuple[int, ...] = ()
        transforms: tuple[int, ...] = ()
        if assignment == "one_to_one" and "models" not in d:
            files = [
                parse_location_file(item, f"locations[{i}]", name, rel)
                for i, (item, name, rel) in enumerate(zip(locs, expected, location_files(grid, layout), strict=True))
            ]
        else:
            model_files, table, transforms = parse_model_table(
                assignment, d.get("models"), locs, expected, layout, grid.tile_size
            )
            files = [
                LocationFile(name, model_files[m].file, model_files[m].sha256, model_files[m].bytes)
                for name, m in zip(expected, table, strict=True)
            ]
        native = parse_native_heads(
            d.get("native_heads"), model.get("precision", "fp32"), model_files if model_files else tuple(files)
        )
        thumbnail = parse_thumbnail(d.get("thumbnail"))
        model_names = [f.name for f in model_files] if model_files else expected
        parse_engine_sets(d.get("engines"), model_names, thumbnail=thumbnail is not None)
        if thumbnail is not None and image_score == "detector":
            raise ValueError(
                "thumbnail: a thumbnail branch fuses maps; it does not go with postprocess.image_score 'detector'"
            )
        if stats.tile_stats is not None and len(stats.tile_stats.thresholds) != grid.num_locations:
            raise ValueError(
                f"normalization.tile_stats: expected {grid.num_locations} values, "
                f"got {len(stats.tile_stats.thresholds)}"
            )
    except BundleError:
        raise
    except ValueError as err:
        raise BundleError(f"{source}: {err}") from None
    blend: BlendWeights = "feather" if weights == "feather" else "uniform"
    return Manifest(
        grid,
        prep,
        model,
        tuple(files),
        blend,
        seam,
        stats,
        writer,
        dict(data),
        image_score,
        layout,
        backbone,
        features,
        thumbnail,
        model_files,
        table,
        str(assignment),
        transforms,
        native,
    )


def parse_native_heads(data: object, precision: str, models: Sequence[LocationFile]) -> tuple[LocationFile, ...]:
    """Validate the manifest's ``native_heads``: absent, or one entry per model of a bf16 or int8_bf16 bundle.

    Args:
        data: The JSON value (None: absent).
        precision: ``model.precision``.
        models: The model files, in model order (each native head sits next to its model's graph).

    Raises:
        ValueError: For native heads in a bundle whose heads were not refit on OpenVINO (:func:`refit_on_openvino`),
            another count than the models', or an entry
            naming another model or file (:func:`~tilead.runtime.files.parse_location_file`).
    """
    if data is None:
        return ()
    if not refit_on_openvino(precision):
        raise ValueError(
            f"native_heads: only bf16 bundles carry native heads (precision {' or '.join(OPENVINO_REFIT_PRECISIONS)}), "
            f"this one's precision is {precision!r}"
        )
    if not isinstance(data, list) or len(data) != len(models):
        raise ValueError(
            f"native_heads: expected a list of {len(models)} entries (one per model), got {describe(data)}"
        )
    return tuple(
        parse_location_file(item, f"native_heads[{i}]", m.name, native_file(m.file))
        for i, (item, m) in enumerate(zip(data, models, strict=True))
    )


def model_files(count: int, layout: str = "per_location") -> list[str]:
    """Bundle-relative files of ``count`` shared models: ``tiles/mK.onnx`` (``shared_backbone``: ``heads/``)."""
    folder = "heads" if layout == "shared_backbone" else "tiles"
    return [f"{folder}/m{i}.onnx" for i in range(count)]


def parse_model_table(
    assignment: object,
    models: object,
    locations: list[Any],
    expected: Sequence[str],
    layout: str,
    tile_size: tuple[int, int] = (1, 1),
) -> tuple[tuple[LocationFile, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate a shared-model bundle's ``assignment``, ``models`` and location -> model ``locations``.

    Args:
        assignment: The manifest's ``assignment`` (one of :data:`SHARED_ASSIGNMENTS`).
        models: The manifest's ``models`` list.
        locations: The manifest's ``locations`` list (length already checked).
        expected: Location names, row-major.
        layout: The bundle's layout (folder of the model files).
        tile_size: ``(th, tw)``: quarter turns need square tiles.

    Returns:
        ``(model files, model index of every location, orientation of every location or ())``.

    Raises:
        ValueError: Naming the key: an unknown mode, a ``models`` list missing, empty, too long, misnamed or
            pointing at other files, a location mapped to an unknown model, or a model no location uses.
    """
    if not isinstance(assignment, str) or assignment not in SHARED_ASSIGNMENTS:
        raise ValueError(
            f"assignment: expected one of {', '.join(SHARED_ASSIGNMENTS)} together with 'models' "
            f"(absent for one model per location), got {describe(assignment)}"
        )
    if not isinstance(models, list) or not models:
        raise ValueError(
            f"models: assignment {assignment!r} needs a non-empty list of model files, got {describe(models)}"
        )
    if len(models) > len(expected):
        raise ValueError(f"models: {len(models)} models for {len(expected)} locations (at most one per location)")
    names = [f"m{i}" for i in range(len(models))]
    files = tuple(
        parse_location_file(item, f"models[{i}]", name, rel)
        for i, (item, name, rel) in enumerate(zip(models, names, model_files(len(models), layout), strict=True))
    )
    index = {name: i for i, name in enumerate(names)}
    table = []
    transforms: list[int] = []
    for i, (item, name) in enumerate(zip(locations, expected, strict=True)):
        e = check_mapping(item, f"locations[{i}]", ("name", "model", "transform"), ("name", "model"))
        if e["name"] != name:
            raise ValueError(f"locations[{i}].name: expected {name!r} (row-major order), got {describe(e['name'])}")
        if not isinstance(e["model"], str) or e["model"] not in index:
            raise ValueError(
                f"locations[{i}].model: location {name} must name one of the models {names[0]}..{names[-1]}, "
                f"got {describe(e['model'])}"
            )
        table.append(index[e["model"]])
        if "transform" in e:
            transforms.append(_parse_transform(e["transform"], f"locations[{i}].transform", tile_size))
    unused = [n for n in names if index[n] not in set(table)]
    if unused:
        raise ValueError(f"models: {unused} serve no location (every model must be used)")
    if transforms and len(transforms) != len(table):
        raise ValueError("locations: a transform on some locations only (oriented bundles give every location one)")
    if transforms and assignment != "cluster":
        raise ValueError(f"locations[].transform: only assignment 'cluster' orients locations, got {assignment!r}")
    if transforms and layout != "per_location":
        raise ValueError(f"locations[].transform: oriented locations need layout 'per_location', got {layout!r}")
    return files, tuple(table), tuple(transforms)


def _parse_transform(value: object, where: str, tile_size: tuple[int, int]) -> int:
    """An orientation index (:mod:`tilead.runtime.orientation`) the tile shape allows."""
    choices = orientation.allowed(*tile_size)
    if type(value) is not int or value not in choices:
        raise ValueError(
            f"{where}: expected one of {list(choices)} (orientation index; quarter turns 1, 3, 5, 7 need square "
            f"tiles, these are {tile_size[0]} x {tile_size[1]}), got {describe(value)}"
        )
    return value


_BACKBONE_KEYS = ("name", "file", "sha256", "bytes", "output", "features")


def _parse_backbone(
    data: object, layout: str, image_score: str, grid: TileGrid
) -> tuple[LocationFile | None, tuple[int, int, int] | None]:
    """Validate the manifest's ``backbone`` entry against the layout (present exactly for ``shared_backbone``)."""
    if layout == "per_location":
        if data is not None:
            raise ValueError("backbone: only a 'shared_backbone' layout has a backbone entry (layout 'per_location')")
        return None, None
    if image_score != "max":
        raise ValueError(
            "layout 'shared_backbone': expected postprocess.image_score 'max' (its heads output only the map)"
        )
    entry = check_mapping(data, "backbone", _BACKBONE_KEYS, _BACKBONE_KEYS)
    if entry["output"] != FEATURES_NAME:
        raise ValueError(f"backbone.output: expected {FEATURES_NAME!r}, got {describe(entry['output'])}")
    raw = entry["features"]
    if not isinstance(raw, list) or len(raw) != 3:
        raise ValueError(f"backbone.features: expected [channels, height, width], got {describe(raw)}")
    d = as_int(raw[0], "backbone.features[0]", minimum=1, maximum=1 << 16)
    fh, fw = as_pair(raw[1:], "backbone.features[1:]", maximum=MAX_SIDE)
    th, tw = grid.tile_size
    if fh > th or fw > tw:
        raise ValueError(
            f"backbone.features: expected a feature map at most the tile size {th} x {tw}, got {fh} x {fw}"
        )
    file = parse_location_file(
        {k: entry[k] for k in ("name", "file", "sha256", "bytes")}, "backbone", "backbone", BACKBONE_FILE
    )
    return file, (d, fh, fw)


# -- the manifest file ---------------------------------------------------------------------------------


def manifest_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without :data:`DIGEST_KEY`.

    Canonical: ``json.dumps(..., sort_keys=True, separators=(",", ":"),
    ensure_ascii=True, allow_nan=False)`` encoded as ASCII. JSON numbers
    round-trip exactly through Python floats, so the digest of a manifest as
    read equals the digest of the one written.

    Raises:
        BundleError: If the data cannot be written as JSON.
    """
    content = {k: v for k, v in data.items() if k != DIGEST_KEY}
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise BundleError(f"manifest: cannot be written as JSON ({err})") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_manifest(bundle: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``bundle/manifest.json`` atomically with a fresh :data:`DIGEST_KEY`.

    Args:
        bundle: Bundle directory.
        data: Manifest content (any existing digest is replaced).

    Returns:
        The manifest as written (with its digest).
    """
    out = {k: v for k, v in data.items() if k != DIGEST_KEY}
    out[DIGEST_KEY] = manifest_digest(out)
    atomic_write_text(Path(bundle) / MANIFEST, json.dumps(out, indent=2, allow_nan=False) + "\n")
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def load_manifest_json(raw: bytes, source: str) -> Any:
    """Parse manifest bytes: UTF-8 JSON, no duplicate keys, no NaN or infinity, at most ``MAX_JSON_DEPTH`` deep.

    Raises:
        BundleError: Naming ``source`` and the problem.
    """
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_no_constant
        )
    except RecursionError:
        raise BundleError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, our hooks, huge integers
        raise BundleError(f"{source}: not valid JSON ({err})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise BundleError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def read_manifest(bundle: Path, *, current_version: str | None = None) -> Manifest:
    """Read ``bundle/manifest.json``, check its digest and validate it.

    Raises:
        BundleError: If the bundle or its manifest is missing, too large, not
            JSON, edited after export (digest mismatch: thresholds are changed
            with ``tilead-calibrate``), or invalid.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} is not a directory")
    if not os.path.lexists(path):
        raise BundleError(f"{bundle} is not a tilead bundle: {MANIFEST} is missing")
    raw = _read_in_bundle(bundle.resolve(), MANIFEST, f"{bundle}: {MANIFEST}", limit=MAX_MANIFEST_BYTES)
    data = load_manifest_json(raw, str(path))
    if (
        isinstance(data, Mapping)
        and type(data.get("schema_version")) is int
        and data["schema_version"] == SCHEMA_VERSION
    ):
        listed = data.get(DIGEST_KEY)
        if listed is None:
            raise BundleError(
                f"{path}: no {DIGEST_KEY}; the manifest was not written by tilead-export or tilead-calibrate "
                "(re-export the run, or set thresholds with tilead-calibrate)"
            )
        if listed != manifest_digest(data):
            raise BundleError(
                f"{path}: the manifest was edited after it was written ({DIGEST_KEY} does not match its content); "
                "change thresholds and normalization with tilead-calibrate, not by hand"
            )
    return parse_manifest(data, source=str(path), current_version=current_version)


# -- model and engine files ------------------------------------------------------------------------------

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _open_in_bundle(root: Path, rel: str, what: str) -> int:
    """Open ``root/rel`` for reading without following any symbolic link below ``root``.

    Returns:
        A file descriptor of a regular file (the caller closes it).

    Raises:
        BundleError: For a path that leaves the bundle, a symbolic link, a
            missing file, or anything but a regular file (FIFO, directory, ...).
    """
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{what}: file {rel!r} points outside the bundle")
    target = root / rel
    cloexec = getattr(os, "O_CLOEXEC", 0)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | cloexec)
    try:
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | cloexec, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | cloexec, dir_fd=fd)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise BundleError(f"{what} {target} is missing") from None
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BundleError(
                f"{what} {target} is (or lies under) a symbolic link or not a directory; "
                "bundle files must be regular files inside the bundle"
            ) from None
        raise BundleError(f"{what} {target} cannot be opened: {err.strerror}") from None
    finally:
        os.close(fd)
    mode = os.fstat(out).st_mode
    if not stat.S_ISREG(mode):
        os.close(out)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise BundleError(f"{what} {target} is {kind}, not a regular file")
    return out


def _read_in_bundle(root: Path, rel: str, what: str, *, limit: int) -> bytes:
    """Read a regular file inside the bundle, refusing one larger than ``limit`` before reading it."""
    fd = _open_in_bundle(root, rel, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise BundleError(f"{what} {root / rel} has {size} bytes, more than the {limit} accepted")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{what} {root / rel} grew beyond {limit} bytes while being read")
    return data


def read_verified_file(bundle: Path, entry: LocationFile, kind: str = "model file") -> bytes:
    """Read one listed file once and return its bytes after checking its size and sha256.

    The bytes returned are the bytes hashed: hand them to the backend
    (``onnxruntime.InferenceSession(bytes)``, ``deserialize_cuda_engine``)
    instead of its path, so a file swapped after the check is never loaded.

    Args:
        bundle: Bundle directory.
        entry: The manifest's entry (bundle-relative file, sha256, bytes).
        kind: What the file is, for messages (``"model file"``, ``"engine"``).

    Raises:
        BundleError: Naming the location and file: outside the bundle, a
            symbolic link, not a regular file (FIFO, ...), missing, of another
            size, or with another sha256.
    """
    root = Path(bundle).resolve()
    owners = {BACKBONE_FILE: "the shared backbone", THUMBNAIL_FILE: "the thumbnail model"}
    owner = owners.get(entry.file, f"model {entry.name}" if entry.name.startswith("m") else f"location {entry.name}")
    what = f"{owner}: {kind}"
    path = root / entry.file
    fd = _open_in_bundle(root, entry.file, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != entry.bytes:
            raise BundleError(
                f"{what} {path} has {size} bytes, the manifest lists {entry.bytes} (truncated or replaced)"
            )
        data = fh.read(entry.bytes + 1)
    if len(data) != entry.bytes:
        raise BundleError(f"{what} {path} changed size while being read (read {len(data)} of {entry.bytes} bytes)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise BundleError(
            f"{owner}: sha256 of {path} is {digest}, the manifest lists {entry.sha256} "
            "(the file was modified or corrupted)"
        )
    return data


def read_verified(bundle: Path, manifest: Manifest) -> dict[str, bytes]:
    """Every model file's bytes, each file read once and verified (:func:`read_verified_file`).

    Returns:
        ``{model name: model bytes}`` in model order (location names, row-major, for one
        model per location), preceded for a ``shared_backbone`` bundle by ``"backbone"``: the backbone's bytes.
    """
    return {loc.name: read_verified_file(bundle, loc) for loc in manifest.files}


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Check every location file is a regular file inside the bundle with the listed size and sha256.

    Raises:
        BundleError: Naming the first file that is missing or does not match.
    """
    for loc in manifest.files:
        read_verified_file(bundle, loc)
    for head in manifest.native_heads:
        read_verified_file(bundle, head, "native head")


# -- model inputs and outputs --------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
}


def ort_specs(nodes: Sequence[Any]) -> list[TensorSpec]:
    """:class:`TensorSpec` of ONNX Runtime ``NodeArg`` s (``session.get_inputs()`` / ``get_outputs()``)."""
    return [TensorSpec(str(n.name), _ORT_TYPES.get(str(n.type), str(n.type)), tuple(n.shape or ())) for n in nodes]


def _check_spec(where: str, spec: TensorSpec, dtype: str, shape: tuple[int, ...], meaning: str) -> None:
    want = f"({', '.join(['n', *(str(d) for d in shape)])}) {meaning}"
    got = f"({', '.join(str(d) for d in spec.shape)})"
    if spec.dtype != dtype:
        raise BundleError(f"{where}: {spec.name!r} has element type {spec.dtype}, the manifest needs {dtype}")
    if len(spec.shape) != len(shape) + 1:
        raise BundleError(f"{where}: {spec.name!r} has shape {got}, the manifest needs {want}")
    if isinstance(spec.shape[0], int):
        raise BundleError(
            f"{where}: {spec.name!r} has a fixed batch dimension {spec.shape[0]}; the manifest needs {want} "
            "with a dynamic n"
        )
    for have, need in zip(spec.shape[1:], shape, strict=True):
        if have != need:
            raise BundleError(f"{where}: {spec.name!r} has shape {got}, the manifest needs {want}")


def check_model_io(
    location: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], manifest: Manifest
) -> None:
    """Check a loaded model's inputs and outputs against the manifest, at load rather than at the first predict.

    Expected: one input ``tiles`` (n, C, th, tw) of the preprocessing dtype;
    an output ``map`` (n, 1, h, w) float32 with ``(h, w)`` the manifest's
    ``map_size``; with image score ``detector`` also ``score`` (n,) float32.
    The batch dimension must be dynamic; other dimensions must be the numbers
    above (a symbolic dimension there cannot be checked and is refused).

    Args:
        location: Location name, for messages.
        inputs: What the session reports as inputs (see :func:`ort_specs`).
        outputs: What it reports as outputs.
        manifest: The bundle's manifest.

    Raises:
        BundleError: Naming the location, the tensor and what differs.
    """
    where = f"location {location}: model"
    names = [s.name for s in inputs]
    features = manifest.features
    wanted_input = INPUT_NAME if features is None else FEATURES_NAME
    if names != [wanted_input]:
        raise BundleError(f"{where} has inputs {names}, the manifest needs exactly one named {wanted_input!r}")
    if features is None:
        th, tw = manifest.grid.tile_size
        prep = manifest.preprocessing
        _check_spec(where, inputs[0], prep.dtype, (prep.channels, th, tw), "(n, channels, tile_h, tile_w)")
    else:
        _check_spec(where, inputs[0], "float32", features, "(n, channels, feature_h, feature_w)")
    by_name = {s.name: s for s in outputs}
    wanted = [OUTPUT_NAME, SCORE_NAME] if manifest.image_score == "detector" else [OUTPUT_NAME]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise BundleError(f"{where} has outputs {list(by_name)}, the manifest needs {wanted} (missing {missing})")
    _check_spec(where, by_name[OUTPUT_NAME], "float32", (1, *manifest.map_size), "(n, 1, map_h, map_w)")
    if manifest.image_score == "detector":
        _check_spec(where, by_name[SCORE_NAME], "float32", (), "(n,)")


def check_backbone_io(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], manifest: Manifest) -> None:
    """Check the shared backbone's inputs and outputs: ``tiles`` (n, C, th, tw) in, ``features`` (n, d, fh, fw) out.

    Raises:
        BundleError: Naming the tensor and what differs (also for a bundle without a shared backbone).
    """
    where = "the shared backbone: model"
    if manifest.features is None:
        raise BundleError(f"layout {manifest.layout!r} has no shared backbone")
    names = [s.name for s in inputs]
    if names != [INPUT_NAME]:
        raise BundleError(f"{where} has inputs {names}, the manifest needs exactly one named {INPUT_NAME!r}")
    th, tw = manifest.grid.tile_size
    prep = manifest.preprocessing
    _check_spec(where, inputs[0], prep.dtype, (prep.channels, th, tw), "(n, channels, tile_h, tile_w)")
    by_name = {s.name: s for s in outputs}
    if FEATURES_NAME not in by_name:
        raise BundleError(f"{where} has outputs {list(by_name)}, the manifest needs {FEATURES_NAME!r}")
    _check_spec(where, by_name[FEATURES_NAME], "float32", manifest.features, "(n, channels, feature_h, feature_w)")


def check_thumbnail_io(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], manifest: Manifest) -> None:
    """Check the thumbnail model's inputs and outputs: ``tiles`` (n, C, size, size) in, ``map`` (n, 1, h, w) out.

    Raises:
        BundleError: Naming the tensor and what differs (also for a bundle without a thumbnail branch).
    """
    where = "the thumbnail model"
    branch = manifest.thumbnail
    if branch is None:
        raise BundleError("the bundle has no thumbnail branch")
    names = [s.name for s in inputs]
    if names != [INPUT_NAME]:
        raise BundleError(f"{where} has inputs {names}, the manifest needs exactly one named {INPUT_NAME!r}")
    prep = manifest.preprocessing
    _check_spec(where, inputs[0], prep.dtype, (prep.channels, branch.size, branch.size), "(n, channels, size, size)")
    by_name = {s.name: s for s in outputs}
    if OUTPUT_NAME not in by_name:
        raise BundleError(f"{where} has outputs {list(by_name)}, the manifest needs {OUTPUT_NAME!r}")
    _check_spec(where, by_name[OUTPUT_NAME], "float32", (1, *branch.map_size), "(n, 1, map_h, map_w)")


def location_files(grid: TileGrid, layout: str = "per_location") -> list[str]:
    """Bundle-relative model file names, row-major: ``tiles/rRcC.onnx`` (``shared_backbone``: ``heads/``)."""
    folder = "heads" if layout == "shared_backbone" else "tiles"
    return [f"{folder}/{location_name(r, c)}.onnx" for r, c in grid.locations()]
