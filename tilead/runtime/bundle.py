"""The bundle: the one interface between the exporter and the runtime.

A bundle is a directory::

    manifest.json        schema version, tilead version, grid, preprocessing, model,
                         per-location files with sha256, post-processing, statistics
    tiles/rRcC.onnx      one ONNX model per tile location (input "tiles"
                         (n, C, th, tw) float32, output "map" (n, 1, h, w) float32;
                         with postprocess.image_score "detector" also output
                         "score" (n,) float32, the detector's own image score)

:func:`read_manifest` validates the manifest and :func:`verify_files` checks
every listed file's size and sha256 before anything is loaded. Nothing in a
bundle is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilead.runtime._checks import as_int, check_mapping, describe
from tilead.runtime.engines import EngineSet, parse_engine_sets
from tilead.runtime.files import LocationFile
from tilead.runtime.geometry import TileGrid, location_name
from tilead.runtime.postprocess import BlendWeights, SeamSmoothing
from tilead.runtime.preprocess import Preprocessing
from tilead.runtime.stats import NormalizationStats

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INPUT_NAME = "tiles"
OUTPUT_NAME = "map"
SCORE_NAME = "score"
IMAGE_SCORES = ("max", "detector")
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
)
_REQUIRED = ("schema_version", "grid", "preprocessing", "model", "locations", "postprocess", "normalization")


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, tampered with, or from an unknown schema."""


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``.

    Attributes:
        grid: Tile grid.
        preprocessing: Tile preprocessing.
        model: Model facts (family, output stride, map size, ...).
        locations: One file per location, row-major.
        weights: Untile blend weights.
        seam: Seam smoothing or None.
        stats: Normalization statistics.
        tilead_version: Version that wrote the bundle.
        raw: The manifest as read.
        image_score: ``max`` (of the final map) or ``detector`` (every
            location's graph has the output ``score``; the image score is its
            max over the image's tiles, normalized with ``stats``' image range).
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

    @property
    def engine_sets(self) -> tuple[EngineSet, ...]:
        """TensorRT engine sets built for this bundle (validated when the manifest was read)."""
        return parse_engine_sets(self.raw.get("engines"), [loc.name for loc in self.locations])

    @property
    def map_size(self) -> tuple[int, int]:
        """``(h, w)`` of each location's output map."""
        h, w = self.model["map_size"]
        return int(h), int(w)


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
)


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
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def parse_manifest(data: Any, *, source: str = MANIFEST, current_version: str | None = None) -> Manifest:
    """Validate manifest data.

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
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{source}: unknown bundle schema_version {version!r}; this tilead reads schema {SCHEMA_VERSION}"
        )
    writer = str(data.get("tilead_version", "0"))
    if current_version is not None and _version_tuple(writer) > _version_tuple(current_version):
        raise BundleError(
            f"{source}: the bundle was written by tilead {writer}, newer than this tilead {current_version}; "
            "upgrade tilead to load it"
        )
    try:
        d = check_mapping(data, source, _TOP_KEYS, _REQUIRED)
        grid = TileGrid.from_dict(d["grid"])
        prep = Preprocessing.from_dict(d["preprocessing"])
        model = dict(check_mapping(d["model"], "model", _MODEL_KEYS))
        for key in ("family", "map_size"):
            if key not in model:
                raise ValueError(f"model: missing key {key!r}")
        if model.get("precision", "fp32") not in ("fp32", "int8"):
            raise ValueError(f"model.precision: expected 'fp32' or 'int8', got {describe(model['precision'])}")
        h, w = (as_int(v, "model.map_size") for v in model["map_size"])
        model["map_size"] = [h, w]
        post = check_mapping(d["postprocess"], "postprocess", ("weights", "seam", "image_score"), ("weights",))
        weights = post["weights"]
        if weights not in ("uniform", "feather"):
            raise ValueError(f"postprocess.weights: expected 'uniform' or 'feather', got {describe(weights)}")
        seam = None if post.get("seam") is None else SeamSmoothing.from_dict(post["seam"])
        image_score = post.get("image_score", "max")
        if image_score not in IMAGE_SCORES:
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
        files = []
        for i, item in enumerate(locs):
            e = check_mapping(item, f"locations[{i}]", ("name", "file", "sha256", "bytes"), ("name", "file", "sha256"))
            files.append(LocationFile(str(e["name"]), str(e["file"]), str(e["sha256"]), int(e.get("bytes", -1))))
        if [f.name for f in files] != expected:
            raise ValueError(
                f"locations: expected one entry per grid location in row-major order {expected}, "
                f"got {[f.name for f in files]}"
            )
        parse_engine_sets(d.get("engines"), expected)
        if stats.tile_stats is not None and len(stats.tile_stats.thresholds) != grid.num_locations:
            raise ValueError(
                f"normalization.tile_stats: expected {grid.num_locations} values, "
                f"got {len(stats.tile_stats.thresholds)}"
            )
    except BundleError:
        raise
    except ValueError as err:
        raise BundleError(f"{source}: {err}") from None
    return Manifest(grid, prep, model, tuple(files), weights, seam, stats, writer, dict(data), image_score)


def read_manifest(bundle: Path, *, current_version: str | None = None) -> Manifest:
    """Read and validate ``bundle/manifest.json``.

    Raises:
        BundleError: If the bundle or its manifest is missing or invalid.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} is not a directory")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a tilead bundle: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    return parse_manifest(data, source=str(path), current_version=current_version)


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Check every location file exists, has the listed size and sha256.

    Raises:
        BundleError: Naming the first file that is missing or does not match.
    """
    root = Path(bundle).resolve()
    for loc in manifest.locations:
        path = (root / loc.file).resolve()
        if root not in path.parents:
            raise BundleError(f"location {loc.name}: file {loc.file!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"location {loc.name}: model file {path} is missing")
        if loc.bytes >= 0 and path.stat().st_size != loc.bytes:
            raise BundleError(
                f"location {loc.name}: model file {path} has {path.stat().st_size} bytes, the manifest lists "
                f"{loc.bytes} (truncated or replaced)"
            )
        digest = sha256_file(path)
        if digest != loc.sha256:
            raise BundleError(
                f"location {loc.name}: sha256 of {path} is {digest}, the manifest lists {loc.sha256} "
                "(the file was modified or corrupted)"
            )


def location_files(grid: TileGrid) -> list[str]:
    """Bundle-relative model file names, row-major."""
    return [f"tiles/{location_name(r, c)}.onnx" for r, c in grid.locations()]
