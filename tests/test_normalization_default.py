"""``postprocess.normalization: auto`` (issue #20): ``tile`` where the models serve different numbers of locations.

The resolution rule for every assignment mode (``cluster`` with k >= 2: at fit time, from the clusters' sizes),
the resolved value in trained run configs (never ``auto``), old run configs (written with ``image``, explicitly or
by the old default) keeping ``image``, the warning for an explicit ``image`` with clusters of unequal sizes, and
the note when ``--resume`` changes the stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import NormalizationStats, TileGrid
from tilead.trainer.config import (
    NORMALIZATION_DOC,
    AssignmentConfig,
    PostprocessConfig,
    RunConfig,
    load_config,
    parse_config,
    save_config,
)
from tilead.trainer.pipeline import normalization_change, saved_normalization

CLUSTERS = ({"mode": "cluster", "k": 2}, {"mode": "cluster", "k": 4}, {"mode": "cluster", "k": 4, "orient": True})


def _config(assignment: Any = None, normalization: str | None = None) -> dict[str, Any]:
    grid: dict[str, Any] = {"tile_size": 8}
    if assignment is not None:
        grid["assignment"] = assignment
    data: dict[str, Any] = {"data": {"format": "mvtec", "root": "."}, "grid": grid}
    if normalization is not None:
        data["postprocess"] = {"normalization": normalization}
    return data


@pytest.mark.parametrize(
    ("assignment", "stage"),
    [
        (None, "image"),  # no assignment: one_to_one
        ("one_to_one", "image"),
        ({"mode": "neighbourhood", "k": 1}, "image"),  # 1x1 blocks: a model per location
        ("all_to_one", "image"),  # one model (demo2048: image better; bottle with tile not measured)
        ({"mode": "neighbourhood", "k": 2}, "image"),  # equal blocks (measured: image better on both datasets)
        ({"mode": "neighbourhood", "k": 3}, "image"),
        ({"mode": "cluster", "k": 1}, "image"),  # one cluster: all_to_one
        ({"mode": "cluster", "k": 2}, "auto"),  # clusters: decided at fit time
        ({"mode": "cluster", "k": 4}, "auto"),
        ({"mode": "cluster", "k": 4, "orient": True}, "auto"),
    ],
)
def test_auto_resolves_by_assignment_mode(tmp_path: Path, assignment: Any, stage: str) -> None:
    for explicit in (None, "auto"):  # the default and the value written out
        cfg = parse_config(_config(assignment, explicit), base_dir=tmp_path)
        assert cfg.postprocess.normalization == stage
        assert cfg.grid.assignment.default_normalization() == (None if stage == "auto" else stage)
        assert cfg.grid.assignment.groups_from_data == (stage == "auto")


@pytest.mark.parametrize(
    ("sizes", "stage"),
    [
        ((4, 5, 3, 4), "tile"),  # bottle 4x4 cluster (measured: tile far better)
        ((4, 4, 4, 4), "image"),  # bottle 4x4 cluster_oriented (measured: image better)
        ((9, 5, 1, 1), "tile"),  # demo2048 cluster_oriented
        ((7, 3, 3, 3), "tile"),
        ((8, 8), "image"),
        ((16,), "image"),  # k-means gave one group
    ],
)
def test_clusters_resolve_from_their_sizes(sizes: tuple[int, ...], stage: str) -> None:
    cluster = AssignmentConfig(mode="cluster", k=len(sizes) if len(sizes) > 1 else 2)
    assert cluster.default_normalization(sizes) == stage
    assert cluster.default_normalization() is None
    # Assignments whose groups are not made from the data do not need the sizes.
    assert AssignmentConfig(mode="neighbourhood", k=2).default_normalization(sizes) == "image"
    assert AssignmentConfig(mode="all_to_one").default_normalization(sizes) == "image"


@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=16))
def test_the_cluster_rule_is_tile_exactly_when_the_sizes_differ(sizes: list[int]) -> None:
    stage = AssignmentConfig(mode="cluster", k=4).default_normalization(sizes)
    assert stage == ("tile" if min(sizes) != max(sizes) else "image")


def test_a_config_without_a_postprocess_section_is_resolved_too(tmp_path: Path) -> None:
    data = _config({"mode": "neighbourhood", "k": 2})
    assert "postprocess" not in data
    assert parse_config(data, base_dir=tmp_path).postprocess.normalization == "image"
    assert parse_config(_config(), base_dir=tmp_path).postprocess.normalization == "image"
    assert parse_config(_config({"mode": "cluster", "k": 3}), base_dir=tmp_path).postprocess.normalization == "auto"


@given(
    mode=st.sampled_from(("one_to_one", "all_to_one", "neighbourhood", "cluster")),
    k=st.integers(1, 6),
    orient=st.booleans(),
    given_stage=st.sampled_from((None, "auto", "image", "tile", "none")),
)
def test_a_validated_config_holds_auto_only_for_clusters_and_keeps_an_explicit_stage(
    mode: str, k: int, orient: bool, given_stage: str | None
) -> None:
    assignment: dict[str, Any] = {"mode": mode}
    if mode in ("neighbourhood", "cluster"):
        assignment["k"] = k
    if mode == "cluster":
        assignment["orient"] = orient
    cfg = parse_config(_config(assignment, given_stage), base_dir=Path("/tmp"))
    clusters = mode == "cluster" and k >= 2
    want = ("auto" if clusters else "image") if given_stage in (None, "auto") else given_stage
    assert cfg.postprocess.normalization == want
    assert RunConfig.model_validate(cfg.to_dict()) == cfg  # the saved form reads back the same


def test_saved_run_config_holds_the_resolved_stage(tmp_path: Path) -> None:
    cfg = parse_config(_config({"mode": "cluster", "k": 2}), base_dir=tmp_path).with_normalization("tile")
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    save_config(cfg, path)
    saved = yaml.safe_load(path.read_text())
    assert saved["postprocess"]["normalization"] == "tile"
    assert load_config(path) == cfg
    assert saved_normalization(tmp_path / "run") == "tile"
    assert saved_normalization(tmp_path / "nothing") is None
    # A cluster run stopped before its fit was done saved 'auto': no stage yet.
    save_config(parse_config(_config({"mode": "cluster", "k": 2}), base_dir=tmp_path), path)
    assert yaml.safe_load(path.read_text())["postprocess"]["normalization"] == "auto"
    assert saved_normalization(tmp_path / "run") is None


def test_old_run_configs_keep_image(tmp_path: Path) -> None:
    """Runs saved before ``auto`` wrote the whole resolved config: ``normalization: image`` is in it."""
    run = tmp_path / "run"
    run.mkdir()
    # What save_config wrote before ``auto`` for a cluster run that relied on the old default.
    old = parse_config(_config({"mode": "cluster", "k": 4}, "image"), base_dir=tmp_path).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    reloaded = load_config(run / "config.yaml")  # what --resume with RUN/config.yaml, export and eval read
    assert reloaded.postprocess.normalization == "image"
    assert normalization_change(reloaded, saved_normalization(run), (4, 5, 3, 4)) is None
    assert reloaded.image_normalization_warning((4, 5, 3, 4)) is not None  # kept, trained with a warning if unequal
    assert reloaded.image_normalization_warning((4, 4, 4, 4)) is None
    # A run config without the key (hand-written, or from before the key existed: one model per location)
    # still loads, with today's stage for one-to-one.
    without = {k: v for k, v in old.items() if k != "postprocess"}
    without["grid"]["assignment"] = {"mode": "one_to_one", "k": None, "orient": False}
    (run / "config.yaml").write_text(yaml.safe_dump(without, sort_keys=False))
    assert load_config(run / "config.yaml").postprocess.normalization == "image"


def test_resume_with_a_config_that_resolves_to_another_stage_says_so(tmp_path: Path) -> None:
    new = parse_config(_config({"mode": "cluster", "k": 4}), base_dir=tmp_path).with_normalization("tile")
    note = normalization_change(new, "image", (4, 5, 3, 4))
    assert note is not None
    assert "from 'image' (the run's saved config.yaml) to 'tile'" in note
    assert "the default 'auto' gives 'tile' for grid.assignment cluster" in note
    assert "--config RUN/config.yaml or --set postprocess.normalization=image" in note
    explicit = parse_config(_config("one_to_one", "tile"), base_dir=tmp_path)
    assert "set in this config" in (normalization_change(explicit, "image") or "")
    assert normalization_change(new, "tile", (4, 5, 3, 4)) is None
    assert normalization_change(new, None, (4, 5, 3, 4)) is None  # a new run


@pytest.mark.parametrize("assignment", CLUSTERS)
def test_explicit_image_with_unequal_clusters_is_allowed_with_a_warning(tmp_path: Path, assignment: Any) -> None:
    cfg = parse_config(_config(assignment, "image"), base_dir=tmp_path)
    assert cfg.postprocess.normalization == "image"
    assert cfg.image_normalization_warning() is None  # before the fit: sizes unknown
    assert cfg.image_normalization_warning((3, 3)) is None  # equal clusters: image is what auto gives
    warning = cfg.image_normalization_warning((5, 1))
    assert warning is not None
    assert f"grid.assignment cluster (k {assignment['k']}" in warning  # what
    assert (f"(k {assignment['k']}, orient)" in warning) == bool(assignment.get("orient"))
    assert "different numbers of tile locations (5, 1)" in warning
    assert "score on different scales" in warning  # why
    assert NORMALIZATION_DOC in warning  # where the figures are
    assert "postprocess.normalization: tile" in warning  # how to switch
    assert "--resume --set postprocess.normalization=tile" in warning


@pytest.mark.parametrize(
    ("assignment", "stage"),
    [
        ("one_to_one", "image"),
        ({"mode": "neighbourhood", "k": 2}, "image"),
        ("all_to_one", "image"),
        ({"mode": "cluster", "k": 1}, "image"),
        ({"mode": "cluster", "k": 4}, "none"),
        ({"mode": "cluster", "k": 4}, None),
    ],
)
def test_no_warning_without_image_and_clusters(tmp_path: Path, assignment: Any, stage: str | None) -> None:
    cfg = parse_config(_config(assignment, stage), base_dir=tmp_path)
    assert cfg.image_normalization_warning((5, 1)) is None


def test_a_bad_stage_is_a_config_error_naming_the_choices(tmp_path: Path) -> None:
    from tilead.trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"postprocess\.normalization.*'auto', 'image', 'tile' or 'none'.*'tiles'"):
        parse_config(_config({"mode": "cluster", "k": 2}, "tiles"), base_dir=tmp_path)


def test_a_section_built_alone_has_no_stage_until_resolved() -> None:
    """Outside a RunConfig ``auto`` has no stage (a clear error); its processor merges, and takes the stats' stage."""
    grid = TileGrid((16, 16), 8)
    with pytest.raises(ValueError, match=r"'auto' is resolved from grid\.assignment"):
        _ = PostprocessConfig().stage
    assert PostprocessConfig(normalization="tile").stage == "tile"
    assert PostprocessConfig().processor(grid).stats is None
    stats = NormalizationStats(stage="none", pixel_threshold=1.0, image_threshold=1.0)
    assert PostprocessConfig().processor(grid, stats).stats == stats
    with pytest.raises(ValueError, match=r"stage 'none', but the config's postprocess\.normalization is 'image'"):
        PostprocessConfig(normalization="image").processor(grid, stats)


@pytest.mark.integration
def test_training_resolves_auto_from_the_clusters_and_warns_for_image_only_when_they_differ(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tiny cluster run trained with ``image``, then resumed with ``auto``.

    With ``image``: one warning if its clusters differ in size. Resumed with ``auto``: the stage the clusters'
    sizes give (validated again, no refit), saved in config.yaml; stats.json says why.
    """
    import json

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.trainer.assignment import load_assignment
    from tilead.trainer.pipeline import train

    data = generate(tmp_path / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1))
    raw = {
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64, "assignment": {"mode": "cluster", "k": 2}},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "postprocess": {"normalization": "image"},
        "validation": {"force": True},
    }
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="tilead.trainer"):
        result = train(load_config(path), tmp_path / "run", progress=False)
    assignment = load_assignment(result.paths.root, 4)
    assert assignment is not None
    sizes = [len(g) for g in assignment.groups]
    unequal = min(sizes) != max(sizes)
    rule = "tile" if unequal else "image"
    warned = [r.getMessage() for r in caplog.records if "postprocess.normalization 'image'" in r.getMessage()]
    assert len(warned) == int(unequal)
    stats = json.loads(result.paths.stats.read_text())
    assert stats["normalization"]["stage"] == "image"
    assert stats["validation"]["normalization_default"] == rule
    assert stats["validation"]["group_sizes"] == sizes
    assert stats["validation"].get("normalization_warning") == (warned[0] if warned else None)
    assert load_config(result.paths.config).postprocess.normalization == "image"

    # Resumed with a config without the key: 'auto' gives the rule's stage, validated again (no refit).
    del raw["postprocess"]
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).postprocess.normalization == "auto"  # unresolved until the clusters exist
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tilead.trainer"):
        again = train(load_config(path), tmp_path / "run", resume=True, progress=False)
    assert again.fitted_now == 0
    assert again.stats.stage == rule
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"postprocess.normalization auto -> {rule}: the 2 clusters serve") for m in messages)
    assert any("changes from 'image'" in m for m in messages) == unequal
    assert not any("postprocess.normalization 'image' with" in m for m in messages)
    assert load_config(again.paths.config).postprocess.normalization == rule  # saved resolved
    again_stats = json.loads(again.paths.stats.read_text())
    assert again_stats["normalization"]["stage"] == rule


@pytest.mark.parametrize(
    ("table", "given_stage", "stage", "sizes"),
    [
        ((0, 0, 1, 1), None, "image", (2, 2)),  # equal clusters: image
        ((0, 0, 0, 1), None, "tile", (3, 1)),  # unequal: tile
        ((0, 0, 0, 1), "image", "image", (3, 1)),  # an explicit stage is kept
        ((0, 1, 1, 0), "tile", "tile", (2, 2)),
    ],
)
def test_a_fitted_cluster_run_resolves_auto_and_saves_it(
    tmp_path: Path, table: tuple[int, ...], given_stage: str | None, stage: str, sizes: tuple[int, ...]
) -> None:
    """What training does once the fit has written ``assignment.json`` (both outcomes, without training)."""
    from tilead.trainer.assignment import Assignment, save_assignment
    from tilead.trainer.pipeline import resolve_normalization
    from tilead.trainer.run_dir import RunPaths

    cfg = parse_config(_config({"mode": "cluster", "k": 2}, given_stage), base_dir=tmp_path)
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    save_config(cfg, paths.config)
    grid = TileGrid((16, 16), 8)  # 2x2 locations
    with pytest.raises(RuntimeError, match=r"no assignment\.json"):
        resolve_normalization(cfg, paths, grid)
    save_assignment(paths.root, Assignment("cluster", table, ("m0", "m1")))
    resolved, got = resolve_normalization(cfg, paths, grid)
    assert got == sizes
    assert resolved.postprocess.normalization == stage
    assert load_config(paths.config).postprocess.normalization == stage
    # Other assignments are resolved at validation and need no table.
    one = parse_config(_config("one_to_one"), base_dir=tmp_path)
    assert resolve_normalization(one, RunPaths(tmp_path / "none"), grid) == (one, None)
