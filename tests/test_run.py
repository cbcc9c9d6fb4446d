"""The opened training run (:class:`tilead.trainer.run.Run`): run.json parsing, clear errors, bundle matching.

Fast tests build a run folder by hand (config.yaml, run.json, stats.json) beside a real small bundle from
:mod:`bundle_factory`; the integration test opens a trained tiny run and its exported bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import bundle_factory
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import EDGE_POLICIES, Manifest, TileGrid, read_manifest
from tilead.runtime.bundle import parse_manifest
from tilead.trainer.config import load_config
from tilead.trainer.run import Run
from tilead.trainer.run_dir import (
    RUN_SCHEMA_VERSION,
    RunFolderError,
    RunPaths,
    RunRecord,
    parse_run_record,
    update_run_json,
)

PREP = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3, "color_order": "RGB",
        "dtype": "float32"}  # fmt: skip


def _record_data(grid: TileGrid, **extra: Any) -> dict[str, Any]:
    """What tilead-train writes into run.json (the parsed part, plus a few free-form facts)."""
    return {
        "status": "trained",
        "fit_key": "0123456789abcdef",
        "grid": grid.to_dict(),
        "grid_shape": [grid.rows, grid.cols],
        "locations": grid.location_names(),
        "preprocessing": PREP,
        "splits": {"split": "holdout", "fit_images": 5},
        "timings": {"fit_s": 1.5},
        **extra,
    }


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    th, tw = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    sy, sx = draw(st.integers(1, th)), draw(st.integers(1, tw))
    h, w = draw(st.integers(th, 4 * th)), draw(st.integers(tw, 4 * tw))
    edge = draw(st.sampled_from(EDGE_POLICIES))
    return TileGrid((h, w), (th, tw), stride=(sy, sx), edge=edge)


@given(grid=grids(), version=st.sampled_from([None, 1]))
def test_a_written_record_parses_back_to_what_was_written(grid: TileGrid, version: int | None) -> None:
    data = _record_data(grid, **({} if version is None else {"schema_version": version}))
    record = parse_run_record(json.loads(json.dumps(data)))  # through JSON, as read from the file
    assert record.grid == grid
    assert record.locations == tuple(grid.location_names())
    assert record.schema_version == 1  # a run.json written before the field existed is schema 1
    assert (record.status, record.fit_key) == ("trained", "0123456789abcdef")
    assert record.preprocessing.to_dict() == PREP
    assert record.splits == {"split": "holdout", "fit_images": 5}
    assert record.raw["timings"] == {"fit_s": 1.5}


def _parse_or_message(data: Any, source: str = "RUN/run.json") -> RunRecord | str:
    """The record, or the RunFolderError's message (any other exception propagates and fails the test)."""
    try:
        return parse_run_record(data, source)
    except RunFolderError as err:
        return str(err)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
REQUIRED = ("status", "fit_key", "grid", "preprocessing", "locations")


@given(grid=grids(), key=st.sampled_from(REQUIRED), value=JSON)
def test_a_required_field_replaced_by_any_json_value_is_refused_by_name_or_still_valid(
    grid: TileGrid, key: str, value: Any
) -> None:
    data = _record_data(grid)
    data[key] = value
    record = _parse_or_message(data)
    if isinstance(record, str):
        assert record.startswith(f"RUN/run.json: {key!r}")
    elif key in ("status", "fit_key"):  # only a value that means the same passes: another non-empty text
        assert isinstance(value, str)
        assert value
    else:  # ... or the same grid / preprocessing / locations
        assert getattr(record, key) == getattr(parse_run_record(_record_data(grid)), key)


@given(grid=grids(), part=st.sampled_from(["grid", "preprocessing"]), data=st.data())
def test_any_value_inside_the_grid_or_preprocessing_parses_or_is_refused_by_name(
    grid: TileGrid, part: str, data: st.DataObject
) -> None:
    record = _record_data(grid)
    section = dict(record[part])
    key = data.draw(st.sampled_from(sorted(section)))
    section[key] = data.draw(JSON | st.lists(st.integers(-(2**70), 2**70), max_size=3))
    record[part] = section
    parsed = _parse_or_message(record)
    if isinstance(parsed, str):
        assert parsed.startswith((f"RUN/run.json: {part!r}", "RUN/run.json: 'locations' must list"))
    else:
        assert parsed.grid.location_names() == list(parsed.locations)


@given(grid=grids(), key=st.sampled_from(REQUIRED))
def test_a_missing_required_field_is_named(grid: TileGrid, key: str) -> None:
    data = _record_data(grid)
    del data[key]
    with pytest.raises(RunFolderError, match=rf"RUN/run.json: '{key}'.*(missing|got)"):
        parse_run_record(data, "RUN/run.json")


@given(value=JSON)
def test_any_json_document_parses_or_is_refused_with_a_run_folder_error(value: Any) -> None:
    parsed = _parse_or_message(value, "run.json")
    assert isinstance(parsed, RunRecord) or parsed.startswith("run.json: ")


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (RUN_SCHEMA_VERSION + 1, "written by a newer tilead.*upgrade tilead"),
        (0, "schema_version must be a positive integer, got int 0"),
        ("1", "schema_version must be a positive integer, got str '1'"),
        (True, "schema_version must be a positive integer, got bool True"),
    ],
)
def test_a_schema_version_this_tilead_does_not_read_is_refused(version: Any, message: str) -> None:
    grid = TileGrid(64, 40, stride=24)
    with pytest.raises(RunFolderError, match=message):
        parse_run_record(_record_data(grid, schema_version=version))


def test_preprocessing_without_defaults() -> None:
    grid = TileGrid(64, 40, stride=24)
    with pytest.raises(RunFolderError, match=r"'preprocessing' lacks \['dtype', 'std'\]; expected every key"):
        parse_run_record(_record_data(grid, preprocessing={k: PREP[k] for k in ("mean", "channels", "color_order")}))


def test_locations_that_are_not_the_grids_are_refused() -> None:
    grid = TileGrid(64, 40, stride=24)
    with pytest.raises(RunFolderError, match=r"'locations' must list the grid's 4 locations row-major \(r0c0, r0c1"):
        parse_run_record(_record_data(grid, locations=["r0c0", "r0c1", "r1c1", "r1c0"]))


def test_run_json_gets_the_schema_version_once(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    assert update_run_json(paths, status="fitting")["schema_version"] == RUN_SCHEMA_VERSION
    paths.run_json.write_text(json.dumps({"status": "fitting"}))  # a run.json of before the field
    assert update_run_json(paths, status="trained") == {"status": "trained", "schema_version": 1}


# -- a run folder by hand beside a real bundle ---------------------------------------------------------------


def _make_run(root: Path) -> Run:
    """A finished run folder whose config, grid, preprocessing, post-processing and stats are the factory bundle's."""
    root.mkdir(parents=True)
    (root / "data").mkdir()
    cfg = {
        "name": "by_hand",
        "data": {"format": "mvtec", "root": str(root / "data")},
        "grid": {"tile_size": 40, "stride": 24},
        "postprocess": {"weights": "feather", "seam": {"sigma": 0.0, "width": 0.1}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(root / "config.yaml")
    grid = TileGrid.from_dict(bundle_factory.GRID)
    data = _record_data(grid, fit_key=config.fit_key(), schema_version=RUN_SCHEMA_VERSION)
    (root / "run.json").write_text(json.dumps(data))
    stats = {"normalization": bundle_factory.normalization(), "validation": {"split": {"split": "holdout"}}}
    (root / "stats.json").write_text(json.dumps(stats))
    return Run.open(root)


@pytest.fixture
def run_and_manifest(tmp_path: Path) -> tuple[Run, dict[str, Any]]:
    """A run folder and the manifest data of a bundle exported from it (its fit key in ``source``)."""
    run = _make_run(tmp_path / "run")
    bundle = bundle_factory.make_bundle(tmp_path / "bundle")
    data = bundle_factory.manifest_data(bundle)
    data["source"] = {"run": str(run.root), "fit_key": run.fit_key}
    return run, data


def _manifest(data: dict[str, Any]) -> Manifest:
    return parse_manifest(json.loads(json.dumps(data)))


def test_a_run_opens_with_its_grid_statistics_and_validation(run_and_manifest: tuple[Run, dict[str, Any]]) -> None:
    run, _ = run_and_manifest
    assert run.grid == TileGrid.from_dict(bundle_factory.GRID)
    assert run.model_names == ("r0c0", "r0c1", "r1c0", "r1c1")
    assert run.finished
    assert run.stats.image_threshold == 1.5
    assert run.validation == {"split": {"split": "holdout"}}
    assert run.config.name == "by_hand"


def test_the_bundle_of_a_run_matches_it(run_and_manifest: tuple[Run, dict[str, Any]]) -> None:
    run, data = run_and_manifest
    assert run.mismatches(_manifest(data)) == []
    assert run.matches(_manifest(data))
    data["source"]["run"] = "/somewhere/else"  # a copied run still matches its bundles
    assert run.matches(_manifest(data))


def _edit(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("source.fit_key", "ffffffffffffffff", "fitted with fit key ffffffffffffffff, this run's is"),
        ("source", {"run": "x"}, "fitted with fit key None"),
        ("grid.edge", "pad", "its grid is"),
        ("preprocessing.mean", [0.5, 0.5, 0.5], "its preprocessing is"),
        ("postprocess.weights", "uniform", "its blend weights are 'uniform', the run's postprocess.weights 'feather'"),
        ("postprocess.seam", {"sigma": 2.0, "width": 0.1}, "its seam smoothing is"),
        ("normalization.image_threshold", 1.25, "normalization statistics differ"),
    ],
)
def test_a_bundle_that_differs_from_the_run_is_told_apart(
    run_and_manifest: tuple[Run, dict[str, Any]], path: str, value: Any, message: str
) -> None:
    run, data = run_and_manifest
    _edit(data, path, value)
    differences = run.mismatches(_manifest(data))
    assert len(differences) == 1
    assert message in differences[0]
    assert not run.matches(_manifest(data))


def test_a_bundle_of_another_image_score_is_told_apart(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    data = bundle_factory.manifest_data(bundle_factory.make_bundle(tmp_path / "bundle", detector=True), detector=True)
    data["source"] = {"fit_key": run.fit_key}
    assert run.mismatches(_manifest(data)) == [
        "its image score is 'detector', the run's postprocess.image_score is 'max'"
    ]


def test_run_without_statistics_opens_but_matches_no_bundle(run_and_manifest: tuple[Run, dict[str, Any]]) -> None:
    run, data = run_and_manifest
    run.paths.stats.unlink()
    reopened = Run.open(run.root)
    assert not reopened.finished
    with pytest.raises(FileNotFoundError, match=r"stats.json not found: training of .* did not finish"):
        _ = reopened.stats
    assert "the run has no usable statistics" in reopened.mismatches(_manifest(data))[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"stats.json: not valid JSON .*expected the statistics tilead-train writes"),
        ("[1, 2]", r"stats.json: expected a JSON object"),
        ('{"validation": {}}', r"stats.json: no 'normalization' section; expected the statistics tilead-train writes"),
        ('{"normalization": {"stage": "image"}}', r"stats.json: invalid statistics: normalization: missing keys"),
        (
            '{"normalization": {"stage": "image", "pixel_threshold": "high", "image_threshold": 1}}',
            r"stats.json: invalid statistics: .*pixel_threshold",
        ),
    ],
)
def test_corrupt_statistics_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    run = _make_run(tmp_path / "run")
    run.paths.stats.write_text(content)
    with pytest.raises(RunFolderError, match=message):
        _ = Run.open(run.root).stats


def test_bad_run_folders_say_what_is_wrong_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a tilead run folder \(no config.yaml\); run tilead-train"):
        Run.open(tmp_path / "nothing")
    run = _make_run(tmp_path / "run")
    run_json = run.paths.run_json
    good = run_json.read_text()
    run_json.unlink()
    with pytest.raises(FileNotFoundError, match=r"run.json not found: .* is not a started tilead run"):
        Run.open(run.root)
    run_json.write_text("{")
    with pytest.raises(RunFolderError, match=r"run.json: not valid JSON"):
        Run.open(run.root)
    run_json.write_bytes(b"\xff\xfe{}")
    with pytest.raises(RunFolderError, match=r"run.json: not UTF-8 text"):
        Run.open(run.root)
    run_json.write_text(json.dumps({**json.loads(good), "schema_version": RUN_SCHEMA_VERSION + 1}))
    with pytest.raises(RunFolderError, match=f"schema_version {RUN_SCHEMA_VERSION + 1} was written by a newer"):
        Run.open(run.root)
    run_json.write_text(json.dumps({**json.loads(good), "fit_key": "ffffffffffffffff"}))
    with pytest.raises(RunFolderError, match=r"fit key ffffffffffffffff, but .*config.yaml gives .*changed in data"):
        Run.open(run.root)


def test_a_run_without_checkpoints_says_which_location_is_missing(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"model r0c0 has no checkpoint .*finish training with --resume"):
        run.models()


# -- a trained run ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_trained_run_matches_its_bundle_until_it_is_validated_again(
    tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from tilead.trainer.eager import load_eager_ensemble
    from tilead.trainer.evaluation import evaluate

    root, bundle = tiny_trained
    run = Run.open(root)
    manifest = read_manifest(bundle)
    assert run.matches(manifest)
    assert run.grid == manifest.grid
    assert run.preprocessing == manifest.preprocessing
    models = run.models()
    assert len(models) == len(run.model_names) == run.grid.num_locations
    assert run.models() is models  # loaded once
    assert load_eager_ensemble(run).models is models
    assert all(not m.training for m in models)

    # A copy of the run whose statistics changed since the export no longer matches: evaluation refuses the bundle.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    stats = json.loads((copy / "stats.json").read_text())
    stats["normalization"]["image_threshold"] *= 1.5
    (copy / "stats.json").write_text(json.dumps(stats))
    assert Run.open(copy).mismatches(manifest) == [
        f"its normalization statistics differ from the run's {copy / 'stats.json'} (validated again since)"
    ]
    with pytest.raises(ValueError, match=r"not exported from the run .* as it is now: its normalization statistics"):
        evaluate(copy, tmp_path / "eval", bundle=bundle, progress=False)
