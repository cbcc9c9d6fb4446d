"""Task assignment (issue #20 item 2).

The config section, the location -> model tables, the manifest's models table, and the runtime's one
batched call per shared model (real ONNX Runtime on real files).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import manifest_data, onnx_model, reference_location_maps
from hypothesis import given
from hypothesis import strategies as st

from tilead import runtime
from tilead.runtime import TileGrid
from tilead.runtime.bundle import BundleError, parse_manifest, read_manifest, sha256_file, write_manifest
from tilead.trainer.assignment import (
    RETRIEVE_REFUSAL,
    Assignment,
    AssignmentError,
    check_assignment,
    cluster_assignment,
    fixed_assignment,
    load_assignment,
    mean_embeddings,
    resolve_assignment,
    save_assignment,
)
from tilead.trainer.config import ConfigError, GridConfig, parse_config

MODES = ("one_to_one", "all_to_one", "neighbourhood", "cluster")


def _grid(rows: int, cols: int, tile: int = 8) -> TileGrid:
    return TileGrid((rows * tile, cols * tile), tile)


def _config(assignment: Any) -> dict[str, Any]:
    return {"data": {"format": "mvtec", "root": "."}, "grid": {"tile_size": 8, "assignment": assignment}}


# -- config ---------------------------------------------------------------------------------------------


def test_config_default_shorthand_and_refusals(tmp_path: Path) -> None:
    cfg = parse_config(_config({}), base_dir=tmp_path)
    assert cfg.grid.assignment.mode == "one_to_one"
    assert cfg.grid.assignment.k is None
    assert parse_config(_config("all_to_one"), base_dir=tmp_path).grid.assignment.mode == "all_to_one"
    assert parse_config(_config({"mode": "cluster", "k": 3}), base_dir=tmp_path).grid.assignment.k == 3
    with pytest.raises(ConfigError, match=r"grid\.assignment.*'retrieve'.*router graph.*Use 'cluster'"):
        parse_config(_config("retrieve"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"grid\.assignment.*needs k"):
        parse_config(_config("cluster"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"grid\.assignment.*takes no k"):
        parse_config(_config({"mode": "all_to_one", "k": 2}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"grid\.assignment\.k"):
        parse_config(_config({"mode": "neighbourhood", "k": 0}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"grid\.assignment\.mode"):
        parse_config(_config("one_to_two"), base_dir=tmp_path)


def test_one_to_one_keeps_the_fit_key_of_runs_made_before_assignment(tmp_path: Path) -> None:
    plain = parse_config({"data": {"format": "mvtec", "root": "."}, "grid": {"tile_size": 8}}, base_dir=tmp_path)
    explicit = parse_config(_config({"mode": "one_to_one"}), base_dir=tmp_path)
    shared = parse_config(_config("all_to_one"), base_dir=tmp_path)
    assert plain.fit_key() == explicit.fit_key() != shared.fit_key()


@given(
    mode=st.sampled_from((*MODES, "retrieve", "other", "")),
    k=st.one_of(st.none(), st.integers(-3, 40)),
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
)
def test_config_parser_accepts_exactly_the_settings_that_fit_the_grid(
    mode: str, k: int | None, rows: int, cols: int
) -> None:
    """Every setting either builds a grid and a table that fits it, or is one ConfigError naming grid.assignment."""
    data = {"tile_size": 8, "assignment": {"mode": mode, **({} if k is None else {"k": k})}}
    needs_k = mode in ("neighbourhood", "cluster")
    fits = (
        mode in MODES
        and (k is not None) == needs_k
        and (k is None or k >= 1)
        and not (mode == "neighbourhood" and k is not None and k > max(rows, cols))
        and not (mode == "cluster" and k is not None and k > rows * cols)
    )
    if not fits:
        with pytest.raises((ConfigError, ValueError), match="assignment"):
            GridConfig.model_validate(data).build((rows * 8, cols * 8))
        return
    grid = GridConfig.model_validate(data).build((rows * 8, cols * 8))
    if mode != "cluster":
        table = fixed_assignment(mode, k, grid)
        assert len(table.location_model) == grid.num_locations
        assert set(table.location_model) == set(range(table.num_models))


# -- tables ---------------------------------------------------------------------------------------------


def test_fixed_tables() -> None:
    grid = _grid(3, 4)
    one = fixed_assignment("one_to_one", None, grid)
    assert one.names == tuple(grid.location_names())
    assert one.location_model == tuple(range(12))
    assert not one.shared
    assert fixed_assignment("all_to_one", None, grid).location_model == (0,) * 12
    hood = fixed_assignment("neighbourhood", 2, grid)
    # 3 x 4 locations in 2 x 2 blocks: the last block row is one location high.
    assert hood.location_model == (0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3)
    assert hood.names == ("m0", "m1", "m2", "m3")
    assert hood.groups[3] == (10, 11)
    with pytest.raises(AssignmentError, match="depends on the training tiles"):
        fixed_assignment("cluster", 2, grid)


@given(rows=st.integers(1, 7), cols=st.integers(1, 7), k=st.integers(1, 7))
def test_neighbourhood_blocks_are_k_by_k_and_cover_the_grid(rows: int, cols: int, k: int) -> None:
    grid = _grid(rows, cols)
    if k > max(rows, cols):
        with pytest.raises(AssignmentError, match="larger than the"):
            fixed_assignment("neighbourhood", k, grid)
        return
    table = fixed_assignment("neighbourhood", k, grid)
    assert table.num_models == -(-rows // k) * -(-cols // k)
    for group in table.groups:
        cells = [grid.locations()[i] for i in group]
        rs, cs = {r for r, _ in cells}, {c for _, c in cells}
        assert max(rs) - min(rs) < k
        assert max(cs) - min(cs) < k
        assert min(rs) % k == 0
        assert min(cs) % k == 0
    assert sorted(i for g in table.groups for i in g) == list(range(grid.num_locations))


def test_cluster_groups_alike_locations_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    truth = np.array([0, 1, 2, 0, 1, 2, 2, 2, 0])
    emb = centres[truth] + 0.1 * rng.standard_normal((9, 3))
    table = cluster_assignment(emb, 3, seed=5)
    assert table.mode == "cluster"
    assert table.num_models == 3
    # The same partition as the truth, renumbered row-major (first location's model is m0).
    assert table.location_model == (0, 1, 2, 0, 1, 2, 2, 2, 0)
    assert cluster_assignment(emb, 3, seed=5) == table
    assert cluster_assignment(emb, 1, seed=5).location_model == (0,) * 9
    with pytest.raises(AssignmentError, match="10 clusters for 9 locations"):
        cluster_assignment(emb, 10, seed=0)
    with pytest.raises(AssignmentError, match="not finite"):
        cluster_assignment(np.full((3, 2), np.nan), 2, seed=0)
    # Identical embeddings cannot fill k clusters: fewer models, none empty.
    assert cluster_assignment(np.zeros((4, 2)), 3, seed=0).num_models == 1


def test_mean_embeddings_average_every_tile_of_a_location() -> None:
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    b = np.ones((2, 1, 4), dtype=np.float32)
    got = mean_embeddings(iter([a, b]), 2)
    np.testing.assert_allclose(got, np.concatenate([a, b], axis=1).mean(axis=1))
    with pytest.raises(AssignmentError, match="no training tiles"):
        mean_embeddings(iter([]), 2)
    with pytest.raises(AssignmentError, match=r"expected embeddings \(3, n, d\)"):
        mean_embeddings(iter([a]), 3)


def test_resolve_saves_reloads_and_refuses_another_mode(tmp_path: Path) -> None:
    grid = _grid(2, 2)
    calls: list[int] = []

    def embed() -> np.ndarray:
        calls.append(1)
        return np.array([[0.0], [5.0], [0.1], [5.1]])

    table = resolve_assignment("cluster", 2, 0, grid, tmp_path, embed)
    assert table.location_model == (0, 1, 0, 1)
    assert len(calls) == 1
    assert resolve_assignment("cluster", 2, 0, grid, tmp_path, embed) == table
    assert len(calls) == 1
    assert load_assignment(tmp_path, 4) == table
    with pytest.raises(AssignmentError, match="holds a 'cluster' table, the config asks for 'all_to_one'"):
        resolve_assignment("all_to_one", None, 0, grid, tmp_path)
    with pytest.raises(AssignmentError, match="is missing"):
        resolve_assignment("cluster", 2, 0, grid, tmp_path / "other")
    assert resolve_assignment("one_to_one", None, 0, grid, tmp_path / "o") == fixed_assignment("one_to_one", None, grid)
    assert not (tmp_path / "o").exists()  # one model per location writes nothing (runs from before keep working)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "not valid JSON"),
        ('{"mode": "cluster"}', "expected keys"),
        ('{"mode": "retrieve", "location_model": [0, 0, 0, 0], "names": ["m0"]}', "unknown mode"),
        ('{"mode": "cluster", "location_model": [0, 0, 0], "names": ["m0"]}', "4 model indices"),
        ('{"mode": "cluster", "location_model": [0, 0, 0, 2], "names": ["m0", "m1"]}', r"indices in \[0, 2\)"),
        ('{"mode": "cluster", "location_model": [0, 0, 0, 0], "names": ["m0", "m1"]}', "at least one location"),
        ('{"mode": "cluster", "location_model": [0, 0, 0, true], "names": ["m0", "m1"]}', "indices"),
    ],
)
def test_a_broken_assignment_file_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "assignment.json").write_text(content)
    with pytest.raises(AssignmentError, match=match):
        load_assignment(tmp_path, 4)


def test_check_assignment_messages() -> None:
    grid = _grid(2, 3)
    with pytest.raises(AssignmentError, match=r"a 4 x 4 neighbourhood is larger than the 2 x 3 grid"):
        check_assignment("neighbourhood", 4, grid)
    with pytest.raises(AssignmentError, match="7 clusters but the 2 x 3 grid has only 6 locations"):
        check_assignment("cluster", 7, grid)
    with pytest.raises(AssignmentError, match="expected an integer >= 1, got 0"):
        check_assignment("cluster", 0, grid)
    with pytest.raises(AssignmentError) as err:
        check_assignment("retrieve", None, grid)
    assert str(err.value) == RETRIEVE_REFUSAL


# -- bundle ---------------------------------------------------------------------------------------------

GAINS = (1.0, 2.0)
TABLE = (0, 1, 1, 0)  # scattered: model m0 serves r0c0 and r1c1, m1 serves r0c1 and r1c0


def make_shared_model_bundle(root: Path, table: tuple[int, ...] = TABLE, mode: str = "cluster") -> Path:
    """The factory's 2x2 bundle with ``len(GAINS)`` models shared by the locations as ``table`` says."""
    models = []
    for i, gain in enumerate(GAINS[: max(table) + 1]):
        path = root / "tiles" / f"m{i}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(onnx_model(gain))
        models.append(
            {"name": f"m{i}", "file": f"tiles/m{i}.onnx", "sha256": sha256_file(path), "bytes": path.stat().st_size}
        )
    names = ["r0c0", "r0c1", "r1c0", "r1c1"]
    for name in names:  # manifest_data lists (and hashes) per-location files; they are replaced by the table below
        (root / "tiles" / f"{name}.onnx").write_bytes(b"")
    data = manifest_data(root)
    for name in names:
        (root / "tiles" / f"{name}.onnx").unlink()
    data["assignment"] = mode
    data["models"] = models
    data["locations"] = [{"name": n, "model": f"m{m}"} for n, m in zip(names, table, strict=True)]
    write_manifest(root, data)
    return root


def _location_reference(images: np.ndarray, table: tuple[int, ...]) -> np.ndarray:
    own = reference_location_maps(images, swap_rb=True)  # gain 1 + 0.25 * location
    gains = np.array([GAINS[m] / (1.0 + 0.25 * i) for i, m in enumerate(table)])
    result: np.ndarray = own * gains[:, None, None, None]
    return result


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("table", [TABLE, (0, 0, 1, 1), (0, 0, 0, 0)])
def test_predictor_runs_each_shared_model_on_its_locations(
    tmp_path: Path, table: tuple[int, ...], backend: str
) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    mode = "all_to_one" if max(table) == 0 else "cluster"
    bundle = make_shared_model_bundle(tmp_path / "b", table, mode)
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for workers in (1, 2):
        with runtime.Predictor(bundle, backend=backend, location_workers=workers) as p:
            assert p.manifest.assignment == mode
            assert p.manifest.location_model == table
            assert [m.name for m in p.manifest.models] == [f"m{i}" for i in range(max(table) + 1)]
            got = p.location_maps(images)
            timed = p.predict_timed(images)[1]
        np.testing.assert_allclose(got, _location_reference(images, table), rtol=1e-4, atol=1e-4)
        # One inference call per model, named after it.
        stages = {k for k in timed.seconds if k.startswith("location:")}
        assert stages == {f"location:m{i}" for i in range(max(table) + 1)}
    assert sorted(p.name for p in (bundle / "tiles").iterdir()) == [f"m{i}.onnx" for i in range(max(table) + 1)]


def _shared_manifest(tmp_path: Path) -> dict[str, Any]:
    bundle = make_shared_model_bundle(tmp_path / "m")
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


def test_manifest_model_table_validation(tmp_path: Path) -> None:
    good = _shared_manifest(tmp_path)
    parsed = parse_manifest(good)
    assert parsed.groups == ((0, 3), (1, 2))
    assert parsed.shared_models
    assert [f.file for f in parsed.files] == ["tiles/m0.onnx", "tiles/m1.onnx"]
    assert [loc.file for loc in parsed.locations] == [
        "tiles/m0.onnx",
        "tiles/m1.onnx",
        "tiles/m1.onnx",
        "tiles/m0.onnx",
    ]

    def bad(edit: Any, match: str) -> None:
        data = copy.deepcopy(good)
        edit(data)
        with pytest.raises(BundleError, match=match):
            parse_manifest(data)

    bad(lambda d: d.update(assignment="retrieve"), "assignment: expected one of all_to_one, neighbourhood, cluster")
    bad(lambda d: d.update(assignment="one_to_one"), "assignment: expected one of")
    bad(lambda d: d.pop("models"), "models: assignment 'cluster' needs a non-empty list")
    bad(lambda d: d.update(models=[]), "needs a non-empty list")
    bad(lambda d: d["locations"][3].update(model="m7"), r"locations\[3\]\.model: location r1c1 must name one of")
    bad(lambda d: d["locations"][3].pop("model"), r"locations\[3\]: missing keys \['model'\]")
    bad(lambda d: d["locations"][1].update(name="r1c0"), r"locations\[1\]\.name: expected 'r0c1'")
    bad(lambda d: [loc.update(model="m0") for loc in d["locations"]], r"models: \['m1'\] serve no location")
    bad(lambda d: d["models"][1].update(file="tiles/r0c1.onnx"), r"models\[1\]\.file")
    bad(lambda d: d["models"][0].update(name="m1"), r"models\[0\]\.name: expected 'm0'")
    bad(lambda d: d["models"].extend([d["models"][0]] * 4), "6 models for 4 locations")
    bad(lambda d: d["locations"].pop(), "expected one entry per grid location")


@given(
    table=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    count=st.integers(1, 5),
    mode=st.sampled_from(("all_to_one", "neighbourhood", "cluster", "retrieve", "one_to_one", 3, None)),
)
def test_manifest_model_table_property(
    tmp_path_factory: pytest.TempPathFactory, table: list[int], count: int, mode: Any
) -> None:
    """Accepted exactly when the mode is a sharing one, every location names a listed model and every model is used."""
    base = _CACHE.setdefault("m", _shared_manifest(tmp_path_factory.mktemp("p")))
    data = copy.deepcopy(base)
    entry = data["models"][0]
    data["models"] = [{**entry, "name": f"m{i}", "file": f"tiles/m{i}.onnx"} for i in range(count)]
    for loc, m in zip(data["locations"], table, strict=True):
        loc["model"] = f"m{m}"
    data["assignment"] = mode
    ok = mode in ("all_to_one", "neighbourhood", "cluster") and max(table) < count and set(table) == set(range(count))
    if not ok:
        with pytest.raises(BundleError, match=r"assignment|models|locations\[\d\]\.model"):
            parse_manifest(data)
        return
    parsed = parse_manifest(data)
    assert parsed.location_model == tuple(table)
    assert len(parsed.models) == count


_CACHE: dict[str, dict[str, Any]] = {}


def test_tensorrt_takes_shared_models(tmp_path: Path) -> None:
    """One engine per model (tests/test_trt_branches.py runs them); only a shared backbone is refused."""
    from tilead.runtime.backends.tensorrt_modules import require_per_location

    bundle = make_shared_model_bundle(tmp_path / "t")
    require_per_location(bundle, read_manifest(bundle))


def test_assignment_round_trip(tmp_path: Path) -> None:
    table = Assignment("neighbourhood", (0, 0, 1, 1), ("m0", "m1"))
    save_assignment(tmp_path, table)
    assert load_assignment(tmp_path, 4) == table
    assert table.groups == ((0, 1), (2, 3))
    assert table.shared


# -- end to end: train, resume, export, predict ------------------------------------------------------------


def _train_shared(tmp: Path, assignment: dict[str, Any]) -> Path:
    import yaml

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=3))
    cfg = {
        "name": "tiny_shared",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64, "assignment": assignment},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "postprocess": {"weights": "feather"},
        "validation": {"force": True},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), tmp / "run", progress=False)
    table = result.paths.root / "assignment.json"
    models = len(json.loads(table.read_text())["names"]) if table.exists() else 4  # one_to_one: no table, 2x2 grid
    assert result.fitted_now == models
    again = train(load_config(path), tmp / "run", resume=True, progress=False)
    assert again.fitted_now == 0  # resumable per model: every model's checkpoint is reused
    return result.paths.root


@pytest.mark.integration
@pytest.mark.parametrize(
    ("assignment", "layout", "models"),
    [
        ({"mode": "cluster", "k": 2}, "per_location", 2),
        ({"mode": "all_to_one"}, "shared_backbone", 1),
        ({"mode": "neighbourhood", "k": 1}, "per_location", 4),
    ],
)
def test_shared_models_train_export_and_predict_like_the_eager_ensemble(
    tmp_path: Path, assignment: dict[str, Any], layout: str, models: int
) -> None:
    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.data import discover
    from tilead.trainer.inference import location_maps
    from tilead.trainer.run import Run

    run = _train_shared(tmp_path, assignment)
    opened = Run.open(run)
    paths, cfg = opened.paths, opened.config
    assert sorted(p.stem for p in paths.locations.iterdir()) == [f"m{i}" for i in range(models)]
    bundle = export_bundle(run, tmp_path / "bundle", progress=False, layout=layout).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["assignment"] == assignment["mode"]
    assert [m["name"] for m in manifest["models"]] == [f"m{i}" for i in range(models)]
    folder = "heads" if layout == "shared_backbone" else "tiles"
    assert sorted(p.name for p in (bundle / folder).iterdir()) == [f"m{i}.onnx" for i in range(models)]

    grid = opened.grid
    eager_models = opened.models()
    assert len(eager_models) == grid.num_locations
    assert len({id(m) for m in eager_models}) == models  # locations sharing a model get the same module
    samples = list(discover(cfg.data).test)
    eager, _, kept = location_maps(cfg, eager_models, samples, grid, opened.preprocessing, batch_size=4)
    from tilead.trainer.images import ImageLoader

    images = np.concatenate([b.images for b in ImageLoader(cfg.data).iter_batches(kept, 4)])
    with runtime.Predictor(bundle) as p:
        got = p.location_maps(images, input_order=cfg.data.channel_order)
    span = float(eager.max() - eager.min())
    assert np.abs(got - eager).max() <= 1e-4 * span


def test_location_tiles_of_a_shared_model_are_the_union_of_its_locations(tmp_path: Path) -> None:
    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.runtime import Preprocessing, tile_images
    from tilead.trainer.data import discover
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.tiles import LocationTiles

    data = generate(tmp_path / "d", SyntheticSpec(image_size=96, train_good=3, test_good=1, test_per_defect=1, seed=1))
    cfg = parse_config(
        {"data": {"format": "mvtec", "root": str(data)}, "grid": {"tile_size": 48}, "train": {"batch_size": 2}},
        base_dir=tmp_path,
    )
    samples = list(discover(cfg.data).train)
    grid = cfg.grid.build((96, 96))
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels=3, color_order="RGB")
    source = LocationTiles(cfg, samples, grid, prep, (0, 3), "fit m0")
    batches = [b.numpy() for b in source]
    assert source.num_images == 6
    assert len(source) == len(batches) == 4  # 2 image batches x 2 locations
    images = np.concatenate([b.images for b in ImageLoader(cfg.data).iter_batches(samples, 2)])
    tiles = tile_images(images, grid, prep, input_order="BGR")
    want = [tiles[0, :2], tiles[3, :2], tiles[0, 2:], tiles[3, 2:]]
    for got, ref in zip(batches, want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.integration
def test_one_model_per_location_by_any_mode_gives_the_one_to_one_maps(tmp_path: Path) -> None:
    """``cluster`` with k = locations and ``neighbourhood`` 1 fit exactly the one-to-one models (mapping sanity)."""
    from tilead.trainer.data import discover
    from tilead.trainer.inference import location_maps
    from tilead.trainer.run import Run

    maps = {}
    modes: list[tuple[str, dict[str, Any]]] = [
        ("one_to_one", {"mode": "one_to_one"}),
        ("cluster", {"mode": "cluster", "k": 4}),
        ("neighbourhood", {"mode": "neighbourhood", "k": 1}),
    ]
    for name, assignment in modes:
        opened = Run.open(_train_shared(tmp_path / name, assignment))
        samples = list(discover(opened.config.data).test)
        got, _, kept = location_maps(
            opened.config, opened.models(), samples, opened.grid, opened.preprocessing, batch_size=4
        )
        assert len(kept) == len(samples) > 0
        maps[name] = got
    # Every location its own model, renumbered row-major: the table is the identity.
    table = json.loads((tmp_path / "cluster" / "run" / "assignment.json").read_text())
    assert table["location_model"] == [0, 1, 2, 3]
    assert not (tmp_path / "one_to_one" / "run" / "assignment.json").exists()
    for name in ("cluster", "neighbourhood"):
        np.testing.assert_array_equal(maps[name], maps["one_to_one"], err_msg=name)
