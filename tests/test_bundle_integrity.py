"""Hostile bundles fail at load with one error type (issue #16) and carry a digest of their own manifest (#17).

The bundles are real (ONNX graphs from ``bundle_factory``, real ONNX Runtime,
real files, FIFOs and symbolic links); the fuzz tests mutate a valid manifest
and require that loading either succeeds or raises ``BundleError``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle, manifest_data, onnx_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import json_paths

from tilead.runtime import BundleError, Predictor
from tilead.runtime.bundle import (
    DIGEST_KEY,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    TensorSpec,
    check_model_io,
    load_manifest_json,
    manifest_digest,
    parse_manifest,
    read_manifest,
    read_verified,
    read_verified_file,
    write_manifest,
)


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def bundle(master: Path, tmp_path: Path) -> Path:
    target = tmp_path / "b"
    shutil.copytree(master, target)
    return target


def _data(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


def _rewrite(bundle: Path, change: Any) -> None:
    """Apply ``change`` to the manifest and write it with a valid digest (the values themselves are on trial)."""
    data = _data(bundle)
    change(data)
    write_manifest(bundle, data)


# -- the digest ------------------------------------------------------------------------------------------


def test_the_digest_is_sha256_of_the_canonical_json_without_itself(bundle: Path) -> None:
    import hashlib

    data = _data(bundle)
    content = {k: v for k, v in data.items() if k != DIGEST_KEY}
    # Expected value written out independently of manifest_digest.
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert data[DIGEST_KEY] == hashlib.sha256(canonical).hexdigest()
    assert manifest_digest(data) == data[DIGEST_KEY]
    read_manifest(bundle)  # loads


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["normalization"].update(image_threshold=2.9), "edited after it was written"),
        (lambda d: d["normalization"].update(image_threshold=1.5000001), "edited after it was written"),
        (lambda d: d.pop(DIGEST_KEY), "no manifest_sha256"),
        (lambda d: d.update({DIGEST_KEY: "0" * 64}), "edited after it was written"),
        (lambda d: d["locations"][0].update(sha256="a" * 64), "edited after it was written"),
    ],
)
def test_a_hand_edited_manifest_is_refused_and_points_to_calibrate(bundle: Path, edit: Any, message: str) -> None:
    data = _data(bundle)
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data, indent=1))
    with pytest.raises(BundleError, match=message) as err:
        Predictor(bundle)
    assert "tilead-calibrate" in str(err.value)


def test_reformatting_the_manifest_keeps_it_valid(bundle: Path) -> None:
    data = _data(bundle)
    (bundle / "manifest.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=7))
    assert read_manifest(bundle).stats.image_threshold == 1.5


def test_schema_1_is_refused_with_a_request_to_re_export(bundle: Path) -> None:
    _rewrite(bundle, lambda d: d.update(schema_version=1))
    with pytest.raises(BundleError, match="schema 1 bundles carry no manifest digest: re-export"):
        read_manifest(bundle)


# -- values and structure ----------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema_version", True, "unknown bundle schema_version True"),
        ("schema_version", 2.0, "unknown bundle schema_version 2.0"),
        ("tilead_version", 7, "tilead_version: expected a string"),
        ("normalization.pixel_range", [-1e308, 1e308], r"pixel_range\[0\]: expected a number in"),
        ("normalization.image_range", [-3e38, 3e38], r"image_range\[0\]: expected a number in"),
        ("normalization.image_threshold", 1e39, "image_threshold: expected a number in"),
        ("normalization.image_threshold", 40.0, "image_threshold: the threshold 40.0 lies outside"),
        ("normalization.pixel_threshold", -3.0, "pixel_threshold: the threshold -3.0 lies outside"),
        ("normalization.pixel_range", [1.0, 1.0 + 1e-13], "pixel_range: expected min < max with max - min >="),
        ("normalization.image_range", [3.0, -2.5], "image_range: expected min < max"),
        ("normalization.image_threshold", True, "image_threshold: expected a number, got True"),
        ("grid.image_size", [10**9, 10**9], r"image_size\[0\]: expected an integer <= 65536"),
        ("grid.image_size", [2**62, 64], r"image_size\[0\]: expected an integer <= 65536"),
        ("grid.tile_size", [2**62, 2**62], r"tile_size\[0\]: expected an integer <= 65536"),
        ("grid.image_size", [64, 64, 3], "image_size: expected an integer or a pair"),
        ("grid.edge", ["shift"], "edge: expected one of shift, pad, resize"),
        ("grid.stride", [1, 1], r"grid: 25 x 25 = 625 locations|locations: expected one entry"),
        ("model.map_size", 5, r"model.map_size: expected \[height, width\], got 5"),
        ("model.map_size", [5, True], r"model.map_size\[1\]: expected an integer"),
        ("model.map_size", [2**62, 5], r"model.map_size\[0\]: expected an integer <= 65536"),
        ("model.map_size", [50, 5], "model.map_size: expected at most the tile size 40 x 40"),
        ("model.input", "x", "model.input: expected 'tiles'"),
        ("locations.0.bytes", [1], r"locations\[0\].bytes: expected an integer >= 0"),
        ("locations.0.bytes", -5, r"locations\[0\].bytes: expected an integer >= 0"),
        ("locations.0.bytes", True, r"locations\[0\].bytes: expected an integer >= 0"),
        ("locations.0.file", "tiles/r0c1.onnx", r"locations\[0\].file: location r0c0 must use its own file"),
        ("locations.0.file", "../../etc/passwd", r"locations\[0\].file: location r0c0 must use its own file"),
        ("locations.1.name", "r0c0", r"locations\[1\].name: expected 'r0c1'"),
        ("locations.0.sha256", "XYZ", r"locations\[0\].sha256: expected 64 lower-case hex digits"),
        ("locations", {"r0c0": 1}, "locations: expected a list"),
        ("locations", [], r"locations: expected one entry per grid location \(4, row-major\), got 0"),
        ("preprocessing.channels", True, "preprocessing.channels: expected 1 or 3, got True"),
        ("preprocessing.std", [0.2, 0.2, 1e300], r"preprocessing.std\[2\]: expected a number in"),
        ("postprocess.weights", ["uniform"], "postprocess.weights: expected 'uniform' or 'feather'"),
        ("postprocess.seam", {"sigma": 1e9}, "seam.sigma: expected a number in"),
        ("source", 3, "source: expected a mapping"),
        ("engines", [{"key": "../x"}], "engines"),
    ],
)
def test_bad_values_are_one_error_naming_the_key(bundle: Path, path: str, value: Any, message: str) -> None:
    _rewrite(bundle, _set(path, value))
    start = time.perf_counter()
    with pytest.raises(BundleError, match=message):
        Predictor(bundle)
    assert time.perf_counter() - start < 10  # refused before allocating per-location lists for 10^9 locations


def test_a_ten_line_manifest_cannot_make_the_parser_allocate(bundle: Path) -> None:
    data = _data(bundle)
    data["grid"] = {"image_size": [65536, 65536], "tile_size": [1, 1], "stride": [1, 1]}
    with pytest.raises(BundleError, match=r"65536 x 65536 = 4294967296 locations, more than the 4096"):
        parse_manifest(data)


def test_json_bombs_are_refused(bundle: Path) -> None:
    path = bundle / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        read_manifest(bundle)
    path.write_text("{" + '"a": ' + "[" * 40 + "1" + "]" * 40 + "}")  # deep enough to refuse, not to crash
    with pytest.raises(BundleError, match="nested deeper"):
        read_manifest(bundle)
    with open(path, "wb") as fh:  # sparse: the size is refused from stat, before anything is read
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleError, match=f"has {MAX_MANIFEST_BYTES + 1} bytes, more than the {MAX_MANIFEST_BYTES}"):
        read_manifest(bundle)
    for text, message in [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": 1e400}', "out of the float range"),
        ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
        ("\xff", "not valid JSON"),
    ]:
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(BundleError, match=message):
            read_manifest(bundle)


# -- files -----------------------------------------------------------------------------------------------


def test_the_bytes_returned_are_the_bytes_hashed(bundle: Path) -> None:
    import hashlib

    manifest = read_manifest(bundle)
    models = read_verified(bundle, manifest)
    assert list(models) == ["r0c0", "r0c1", "r1c0", "r1c1"]
    for loc in manifest.locations:
        assert hashlib.sha256(models[loc.name]).hexdigest() == loc.sha256
        assert models[loc.name] == (bundle / loc.file).read_bytes()


def test_symlinks_fifos_and_swaps_are_refused_with_what_they_are(bundle: Path, tmp_path: Path) -> None:
    manifest = read_manifest(bundle)
    loc = manifest.locations[1]
    target = bundle / loc.file
    outside = tmp_path / "outside.onnx"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match=r"location r0c1: model file .*r0c1.onnx is .*symbolic link"):
        Predictor(bundle)
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(BundleError, match=r"location r0c1: model file .*r0c1.onnx is a FIFO, not a regular file"):
        read_verified_file(bundle, loc)  # returns at once: a FIFO is never opened for a blocking read
    target.unlink()
    target.mkdir()
    with pytest.raises(BundleError, match="is a directory, not a regular file"):
        read_verified_file(bundle, loc)
    target.rmdir()
    with pytest.raises(BundleError, match=r"location r0c1: model file .*r0c1.onnx is missing"):
        read_verified_file(bundle, loc)
    shutil.copy(outside, target)
    tiles = bundle / "tiles"
    tiles.rename(bundle / "real_tiles")
    tiles.symlink_to(bundle / "real_tiles")  # a symlinked folder inside the bundle
    with pytest.raises(BundleError, match="symbolic link"):
        read_verified_file(bundle, loc)
    tiles.unlink()
    (bundle / "real_tiles").rename(tiles)
    with open(target, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match=f"has {loc.bytes + 1} bytes, the manifest lists {loc.bytes}"):
        read_verified_file(bundle, loc)


def test_a_swapped_model_with_the_listed_size_fails_on_its_hash(bundle: Path) -> None:
    loc = read_manifest(bundle).locations[2]
    path = bundle / loc.file
    path.write_bytes(onnx_model(9.0))  # same graph and size, another gain
    assert path.stat().st_size == loc.bytes
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    message = (
        f"location r1c0: sha256 of {path} is {digest}, the manifest lists {loc.sha256} "
        "(the file was modified or corrupted)"
    )
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        Predictor(bundle)


# -- model inputs and outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"input_name": "x"}, "location r0c0: model has inputs ['x'], the manifest needs exactly one named 'tiles'"),
        (
            {"output_name": "heat"},
            "location r0c0: model has outputs ['heat'], the manifest needs ['map'] (missing ['map'])",
        ),
        (
            {"channels": 1},
            "location r0c0: model: 'tiles' has shape (n, 1, 40, 40), the manifest needs (n, 3, 40, 40) "
            "(n, channels, tile_h, tile_w)",
        ),
        (
            {"map_size": (4, 4)},
            "location r0c0: model: 'map' has shape (n, 1, 4, 4), the manifest needs (n, 1, 5, 5) (n, 1, map_h, map_w)",
        ),
        (
            {"batch": 1},
            "location r0c0: model: 'tiles' has a fixed batch dimension 1; the manifest needs (n, 3, 40, 40) "
            "(n, channels, tile_h, tile_w) with a dynamic n",
        ),
    ],
)
def test_models_that_disagree_with_the_manifest_fail_at_load(tmp_path: Path, model: Any, message: str) -> None:
    bundle = make_bundle(tmp_path / "b", **model)
    data = manifest_data(bundle)
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        Predictor(bundle)


def test_a_model_of_another_element_type_fails_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = manifest_data(bundle)
    data["preprocessing"]["dtype"] = "float16"
    write_manifest(bundle, data)
    message = "location r0c0: model: 'tiles' has element type float32, the manifest needs float16"
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        Predictor(bundle)


def test_a_detector_bundle_needs_the_score_output(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")  # graphs without "score"
    write_manifest(bundle, manifest_data(bundle, detector=True))
    with pytest.raises(BundleError, match=r"needs \['map', 'score'\] \(missing \['score'\]\)"):
        Predictor(bundle)
    good = make_bundle(tmp_path / "d", detector=True)
    with Predictor(good) as predictor:
        result = predictor.predict(np.full((64, 64, 3), 200, np.uint8))
    assert not isinstance(result, list)
    assert np.isfinite(result.raw_score)


def test_check_model_io_on_plain_specs(master: Path) -> None:
    manifest = read_manifest(master)
    tiles = TensorSpec("tiles", "float32", ("n", 3, 40, 40))
    check_model_io("r0c0", [tiles], [TensorSpec("map", "float32", (None, 1, 5, 5))], manifest)
    with pytest.raises(BundleError, match="'map' has element type float16, the manifest needs float32"):
        check_model_io("r0c0", [tiles], [TensorSpec("map", "float16", ("n", 1, 5, 5))], manifest)
    with pytest.raises(BundleError, match=r"'map' has shape \(n, 5, 5\)"):
        check_model_io("r0c0", [tiles], [TensorSpec("map", "float32", ("n", 5, 5))], manifest)
    with pytest.raises(BundleError, match=r"'map' has shape \(n, 1, h, 5\)"):
        check_model_io("r0c0", [tiles], [TensorSpec("map", "float32", ("n", 1, "h", 5))], manifest)


# -- fuzzing ---------------------------------------------------------------------------------------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 2, -1, 0.5, 1e-13, 1e39, 2**31, 2**62, 10**9, "", "r0c0", "tiles/r0c0.onnx", "shift"]),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=70), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A manifest with 1-3 edits: a value replaced, a key deleted, a value wrapped in a list or dict, a key added."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = json_paths(data)
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "wrap", "nest", "add"]))
        if action == "replace":
            parent[key] = draw(_VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = [parent[key]]
        elif action == "nest":
            parent[key] = {"value": parent[key]}
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    return data


_BASE: dict[str, Any] = {}


def _base(master: Path) -> dict[str, Any]:
    if not _BASE:
        _BASE.update(_data(master))
    return _BASE


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_manifest_values_and_structure(master: Path, data: st.DataObject) -> None:
    manifest = data.draw(mutated(_base(master)))
    try:
        parsed = parse_manifest(manifest)
    except BundleError:
        return
    # What parses is usable: sizes bounded, thresholds inside their ranges, one file per location.
    assert parsed.grid.num_locations == len(parsed.locations) <= 4096
    assert [loc.file for loc in parsed.locations] == [f"tiles/{loc.name}.onnx" for loc in parsed.locations]


@settings(
    max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None
)
@given(data=st.data())
def test_fuzz_loading_mutated_bundles_is_ok_or_bundle_error(
    master: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    bundle = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(master, bundle)
    write_manifest(bundle, data.draw(mutated(_base(master))))
    try:
        Predictor(bundle, threads=1).close()
    except BundleError:
        pass
    finally:
        shutil.rmtree(bundle)


@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_manifest_bytes(raw: bytes) -> None:
    try:
        data = load_manifest_json(raw, "manifest.json")
        parse_manifest(data)
    except BundleError:
        pass


@given(cut=st.integers(min_value=0, max_value=4000))
def test_fuzz_truncated_manifests(master: Path, cut: int) -> None:
    raw = (master / "manifest.json").read_bytes()
    with pytest.raises(BundleError):
        parse_manifest(load_manifest_json(raw[: min(cut, len(raw) - 2)], "manifest.json"))


@pytest.mark.parametrize(
    ("writer", "current", "refused"),
    [
        ("0.1.0", "0.1.0", False),
        ("0.2.0", "0.10.0", False),  # numeric, not string, order
        ("0.10.0", "0.2.0", True),
        ("1.0", "0.9.9", True),
        ("0.1.1rc1", "0.1.0", True),
        ("0.1", "0.1.0", False),
        ("0.1.0.dev3", "0.1.0", True),
        ("9" * 30, "1.0", True),  # huge components are cut, not a crash
    ],
)
def test_a_bundle_from_a_newer_tilead_is_refused(writer: str, current: str, refused: bool) -> None:
    data = _base_manifest()
    data["tilead_version"] = writer
    if refused:
        with pytest.raises(BundleError, match=f"written by tilead {writer[:20]}.*newer than this tilead {current}"):
            parse_manifest(data, current_version=current)
    else:
        assert parse_manifest(data, current_version=current).tilead_version == writer


def _base_manifest() -> dict[str, Any]:
    grid_names = ["r0c0", "r0c1", "r1c0", "r1c1"]
    return {
        "schema_version": 2,
        "grid": {"image_size": [64, 64], "tile_size": [40, 40], "stride": [24, 24]},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3, "color_order": "RGB"},
        "model": {"family": "padim", "map_size": [5, 5]},
        "locations": [{"name": n, "file": f"tiles/{n}.onnx", "sha256": "0" * 64, "bytes": 1} for n in grid_names],
        "postprocess": {"weights": "uniform"},
        "normalization": {"stage": "none", "pixel_threshold": 1.0, "image_threshold": 1.0},
    }


def test_entry_messages_name_the_value_given() -> None:
    from tilead.runtime.files import MAX_FILE_BYTES

    for key, value, message in [
        ("name", "r9c9", r"locations\[0\].name: expected 'r0c0' \(row-major order\), got 'r9c9'"),
        ("file", "tiles/x.onnx", r"locations\[0\].file: .* own file 'tiles/r0c0.onnx', got 'tiles/x.onnx'"),
        ("sha256", "ABC", r"locations\[0\].sha256: expected 64 lower-case hex digits, got 'ABC'"),
        ("bytes", MAX_FILE_BYTES + 1, rf"locations\[0\].bytes: expected an integer <= {MAX_FILE_BYTES}"),
    ]:
        data = _base_manifest()
        data["locations"][0][key] = value
        with pytest.raises(BundleError, match=message):
            parse_manifest(data)
    data = _base_manifest()
    data["locations"][0]["bytes"] = MAX_FILE_BYTES
    assert parse_manifest(data).locations[0].bytes == MAX_FILE_BYTES


def test_missing_bundles_and_non_ascii_manifests(tmp_path: Path, bundle: Path) -> None:
    import hashlib

    with pytest.raises(BundleError, match=r"bundle not found: .*nothing is not a directory"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"empty is not a tilead bundle: manifest.json is missing"):
        read_manifest(tmp_path / "empty")
    _rewrite(bundle, lambda d: d["source"].update(config="flasche-\u00e9\u4e2d"))
    data = _data(bundle)
    content = {k: v for k, v in data.items() if k != DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert "\\u00e9" in text
    assert data[DIGEST_KEY] == hashlib.sha256(text.encode()).hexdigest()
    assert read_manifest(bundle).raw["source"]["config"] == "flasche-\u00e9\u4e2d"
    with pytest.raises(BundleError, match="cannot be written as JSON"):
        manifest_digest({"a": float("nan")})


def test_parsed_fields_and_boundaries() -> None:
    data = _base_manifest()
    data["tilead_version"] = "0.1.0"
    data["postprocess"] = {"weights": "feather", "seam": {"sigma": 2.0, "width": 0.1}}
    data["model"].update(opset=1000, output_stride=8, mahalanobis_blocks=4, backbone="b", detector={"k": 1})
    data["model"]["map_size"] = [40, 40]  # equal to the tile: accepted
    m = parse_manifest(data)
    assert (m.weights, m.seam is not None, m.tilead_version, m.map_size) == ("feather", True, "0.1.0", (40, 40))
    assert m.model["map_size"] == [40, 40]
    data["postprocess"] = {"weights": "uniform"}
    assert parse_manifest(data).weights == "uniform"
    assert parse_manifest(data).seam is None
    # 64 x 64 locations of a 1-pixel tile = 4096 = MAX_LOCATIONS: accepted up to the per-location list check.
    data["grid"] = {"image_size": [64, 64], "tile_size": [1, 1], "stride": [1, 1]}
    data["model"]["map_size"] = [1, 1]
    with pytest.raises(BundleError, match=r"locations: expected one entry per grid location \(4096"):
        parse_manifest(data)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "family", 3, "model.family: expected a string, got 3"),
        ("model", "backbone", [1], r"model.backbone: expected a string, got \[1\]"),
        ("model", "detector", "x", "model.detector: expected a mapping, got 'x'"),
        ("model", "output", "heat", "model.output: expected 'map', got 'heat'"),
        ("model", "dtype", "float16", "model.dtype: expected 'float32', got 'float16'"),
        ("model", "opset", 1001, "model.opset: expected an integer <= 1000, got 1001"),
        ("model", "output_stride", 0, "model.output_stride: expected an integer >= 1, got 0"),
        ("model", "mahalanobis_blocks", 65537, "model.mahalanobis_blocks: expected an integer <= 65536"),
        ("model", "map_size", [41, 5], "model.map_size: expected at most the tile size 40 x 40, got 41 x 5"),
        ("model", "map_size", [5, 41], "model.map_size: expected at most the tile size 40 x 40, got 5 x 41"),
        (None, "created", 5, "manifest.created: expected a string, got 5"),
        (None, DIGEST_KEY, 5, "manifest.manifest_sha256: expected a string, got 5"),
        (None, "calibration", [1], r"calibration: expected a mapping, got \[1\]"),
        (None, "source", "run", "source: expected a mapping, got 'run'"),
        (None, "schema_version", 3, r"unknown bundle schema_version 3; this tilead reads schema 2$"),
        (None, "schema_version", "1", r"unknown bundle schema_version '1'; this tilead reads schema 2$"),
        (None, "postprocess", {"weights": 1}, "postprocess.weights: expected 'uniform' or 'feather', got 1"),
        (None, "postprocess", {"seam": None}, r"postprocess: missing keys \['weights'\]"),
        (None, "postprocess", {"weights": "uniform", "image_score": "avg"}, "image_score: expected 'max' or"),
        (None, "locations", "x", "locations: expected a list, got 'x'"),
        (None, "normalization", {"stage": "tile"}, "normalization: missing keys"),
    ],
)
def test_each_key_is_checked(section: str | None, key: str, value: Any, message: str) -> None:
    data = _base_manifest()
    (data if section is None else data[section])[key] = value
    with pytest.raises(BundleError, match=message):
        parse_manifest(data)


def test_model_missing_keys_and_tile_stats_count() -> None:
    data = _base_manifest()
    del data["model"]["family"]
    with pytest.raises(BundleError, match=r"model: missing keys \['family'\]"):
        parse_manifest(data)
    data = _base_manifest()
    data["normalization"] = {
        "stage": "tile", "pixel_threshold": 0.5, "image_threshold": 0.5, "pixel_range": [0, 1],
        "image_range": [0, 1], "tile_stats": {"thresholds": [1.0] * 3, "mins": [0.0] * 3, "maxs": [2.0] * 3},
    }  # fmt: skip
    with pytest.raises(BundleError, match=r"normalization\.tile_stats: expected 4 values, got 3"):
        parse_manifest(data)
    data["normalization"]["tile_stats"] = {"thresholds": [1.0] * 4, "mins": [0.0] * 4, "maxs": [2.0] * 4}
    assert parse_manifest(data).stats.tile_stats is not None


def test_open_in_bundle_refuses_paths_that_leave_it(tmp_path: Path) -> None:
    from tilead.runtime.bundle import _open_in_bundle

    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "a.onnx").write_bytes(b"x")
    fd = _open_in_bundle(tmp_path, "tiles/a.onnx", "model")
    try:
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)
    for rel in ("/etc/passwd", "../a.onnx", "tiles/../tiles/a.onnx", "./tiles/a.onnx", "tiles//a.onnx", "tiles/"):
        with pytest.raises(BundleError, match="^" + re.escape(f"model: file {rel!r} points outside the bundle") + "$"):
            _open_in_bundle(tmp_path, rel, "model")
    message = (
        f"model {tmp_path / 'tiles/a.onnx/b'} is (or lies under) a symbolic link or not a directory; "
        "bundle files must be regular files inside the bundle"
    )
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        _open_in_bundle(tmp_path, "tiles/a.onnx/b", "model")  # a file where a folder should be
    with pytest.raises(BundleError, match="^" + re.escape(f"model {tmp_path / 'tiles/b.onnx'} is missing") + "$"):
        _open_in_bundle(tmp_path, "tiles/b.onnx", "model")


def test_manifest_refusals_say_what_to_do(bundle: Path) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["normalization"]["image_threshold"] = 1.25
    path.write_text(json.dumps(data))
    message = (
        f"{path}: the manifest was edited after it was written (manifest_sha256 does not match its content); "
        "change thresholds and normalization with tilead-calibrate, not by hand"
    )
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        read_manifest(bundle)
    del data["manifest_sha256"]
    path.write_text(json.dumps(data))
    message = (
        f"{path}: no manifest_sha256; the manifest was not written by tilead-export or tilead-calibrate "
        "(re-export the run, or set thresholds with tilead-calibrate)"
    )
    with pytest.raises(BundleError, match="^" + re.escape(message) + "$"):
        read_manifest(bundle)
    path.write_text("[]")
    with pytest.raises(BundleError, match="^" + re.escape(str(path))):
        read_manifest(bundle)


def test_read_manifest_passes_the_version_and_names_the_file(bundle: Path) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["tilead_version"] = "99.0"
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=r"written by tilead 99\.0.*newer than this tilead 0\.1\.0"):
        read_manifest(bundle, current_version="0.1.0")
    assert read_manifest(bundle, current_version="99.0").tilead_version == "99.0"
    path.write_text("{")
    with pytest.raises(BundleError, match="^" + re.escape(str(path))):
        read_manifest(bundle)
    path.unlink()
    path.symlink_to(bundle / "tiles" / "r0c0.onnx")
    with pytest.raises(BundleError, match="^" + re.escape(f"{bundle}: manifest.json {bundle.resolve()}/manifest.json")):
        read_manifest(bundle)
