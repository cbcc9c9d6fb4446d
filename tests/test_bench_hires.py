"""benchmarks/bench_hires.py: target marks, the table, and the refusal of config keys this tilead lacks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_hires", ROOT / "benchmarks" / "bench_hires.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_hires"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(variant: str, image: float, aupro: float, mib: float, dataset: str = "bottle4x4") -> dict[str, Any]:
    return {"dataset": dataset, "variant": variant, "image_auroc": image, "pixel_auroc": 0.9, "aupro": aupro,
            "bundle_mib": mib, "models": 1}  # fmt: skip


def test_cluster_target_needs_both_quality_and_size() -> None:
    b = _bench()
    rows = [
        _row("one_to_one", 0.990, 0.950, 300.0),
        _row("cluster", 0.986, 0.946, 90.0),
        _row("one_to_one", 0.990, 0.950, 300.0, "demo2048"),
        _row("cluster", 0.980, 0.950, 90.0, "demo2048"),  # image AUROC 0.010 lower
        _row("one_to_one", 0.990, 0.950, 300.0, "other"),
        _row("cluster", 0.990, 0.950, 120.0, "other"),  # 0.40 of the size
    ]
    b.mark_targets(rows)
    assert rows[1]["target"].startswith("met")
    assert rows[3]["target"].startswith("missed")
    assert "(no)" in rows[3]["target"]
    assert rows[5]["target"].startswith("missed")
    assert "(0.40)" in rows[5]["target"]
    assert "target" not in rows[0]
    text = b.table([*rows, {"dataset": "bottle", "variant": "+thumbnail", "skipped": "model.thumbnail: unknown key"}])
    assert "0.9860" in text
    assert "skipped: model.thumbnail: unknown key" in text


def test_thumbnail_target_against_todays_aupro() -> None:
    b = _bench()
    rows = [_row("one_to_one", 0.99, 0.9675, 300.0, "bottle"), _row("+thumbnail", 0.99, 0.9700, 310.0, "bottle")]
    b.mark_targets(rows)
    assert rows[1]["target"].startswith("met")
    lower = [_row("one_to_one", 0.99, 0.9675, 300.0, "bottle"), _row("+thumbnail", 0.98, 0.9800, 310.0, "bottle")]
    b.mark_targets(lower)
    assert lower[1]["target"].startswith("missed")


def test_config_refusal_names_an_unknown_key_and_accepts_assignment() -> None:
    b = _bench()
    config = ROOT / "configs" / "padim_bottle.yaml"
    refusal = b.config_refusal(config, {"model.not_a_key": 1})
    assert refusal is not None
    assert "model.not_a_key: unknown key" in refusal
    assert b.config_refusal(config, {"grid.assignment": {"mode": "cluster", "k": 4}}) is None
    assert "grid.assignment.k" in (b.config_refusal(config, {"grid.assignment": {"mode": "cluster", "k": 0}}) or "")


def test_higher_quality_keeps_the_cluster_target_and_oriented_rows_are_marked() -> None:
    b = _bench()
    rows = [
        _row("one_to_one", 0.9889, 0.9415, 219.3),
        _row("cluster_oriented", 0.9921, 0.9506, 54.8),  # above one_to_one by more than the tolerance: kept
        _row("cluster", 0.9830, 0.9415, 54.8),  # 0.0059 lower: not kept
    ]
    b.mark_targets(rows)
    assert rows[1]["target"].startswith("met")
    assert rows[2]["target"].startswith("missed")
    assert "cluster_oriented" in [r.variant for r in b.ROWS["bottle4x4"]]


def test_json_rows_merge_by_dataset_and_variant_and_keep_the_others(tmp_path: Path) -> None:
    b = _bench()
    path = tmp_path / "hires.json"
    b.write_json(
        path, "assignment, under load", [_row("one_to_one", 0.99, 0.94, 219.0), _row("cluster", 0.76, 0.54, 55.0)]
    )
    b.write_json(
        path, "thumbnail", [_row("one_to_one", 0.997, 0.9675, 270.0, "bottle"), _row("cluster", 0.8, 0.6, 55.0)]
    )
    rows = {(r["dataset"], r["variant"]): r for r in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == [("bottle", "one_to_one"), ("bottle4x4", "cluster"), ("bottle4x4", "one_to_one")]
    assert rows[("bottle4x4", "one_to_one")]["aupro"] == 0.94  # kept, with the note it was measured under
    assert rows[("bottle4x4", "one_to_one")]["note"] == "assignment, under load"
    assert rows[("bottle4x4", "cluster")]["aupro"] == 0.6  # measured again: replaced
    assert rows[("bottle4x4", "cluster")]["note"] == "thumbnail"


def test_rows_of_a_file_without_row_notes_get_its_note() -> None:
    b = _bench()
    old = {"note": "40 training images", "rows": [_row("one_to_one", 0.99, 0.94, 219.0)]}
    merged = b.merge_rows(old, [_row("+thumbnail320", 0.99, 0.97, 280.0, "bottle")], "full data")
    assert [(r["variant"], r["note"]) for r in merged] == [
        ("one_to_one", "40 training images"),
        ("+thumbnail320", "full data"),
    ]


def test_tile_normalized_rows_are_judged_against_the_better_one_to_one() -> None:
    b = _bench()
    rows = [
        _row("one_to_one", 1.0, 0.9986, 824.0, "demo2048"),
        _row("one_to_one_tile", 1.0, 0.9990, 824.0, "demo2048"),
        _row("cluster_tile", 1.0, 0.9963, 206.0, "demo2048"),  # 0.0027 below the better one_to_one row
        _row("cluster", 1.0, 0.9930, 206.0, "demo2048"),  # 0.0060 below it
    ]
    b.mark_targets(rows)
    assert rows[2]["target"].startswith("met")
    assert rows[3]["target"].startswith("missed")
    assert "target" not in rows[1]
    # Above plain one_to_one but 0.006 below one_to_one_tile: the better reference decides.
    better = [_row("one_to_one", 0.99, 0.990, 300.0), _row("one_to_one_tile", 0.99, 0.998, 300.0)]
    better.append(_row("cluster_tile", 0.99, 0.992, 90.0))
    b.mark_targets(better)
    assert better[2]["target"].startswith("missed")
    names = [r.variant for r in b.ROWS["demo2048"]]
    assert {"one_to_one_tile", "cluster_tile"} <= set(names)
    tile_row = next(r for r in b.ROWS["demo2048"] if r.variant == "cluster_tile")
    assert tile_row.overrides["postprocess.normalization"] == "tile"


def test_shared_rows_run_the_default_and_pin_each_stage() -> None:
    """Plain names run ``auto`` (no override); ``_image`` / ``_tile`` pin a stage; the one auto repeats on request.

    For clusters ``auto`` is decided at fit time (their sizes): both pinned rows run.
    """
    b = _bench()
    auto = {"neighbourhood": "image", "cluster": None, "cluster_oriented": None, "all_to_one": "image"}
    for dataset in ("bottle4x4", "demo2048"):
        rows = {r.variant: r for r in b.ROWS[dataset]}
        for mode, stage in auto.items():
            assert "postprocess.normalization" not in rows[mode].overrides
            assert rows[f"{mode}_image"].overrides["postprocess.normalization"] == "image"
            assert rows[f"{mode}_tile"].overrides["postprocess.normalization"] == "tile"
            assert rows[mode].by_default
            if stage is None:
                assert rows[f"{mode}_image"].by_default
                assert rows[f"{mode}_tile"].by_default
                continue
            other = "tile" if stage == "image" else "image"
            assert rows[f"{mode}_{other}"].by_default
            assert not rows[f"{mode}_{stage}"].by_default  # the plain row's run under 'auto'
            assert rows[mode].overrides["grid.assignment"] == rows[f"{mode}_tile"].overrides["grid.assignment"]
        assert "postprocess.normalization" not in rows["one_to_one"].overrides
        assert rows["one_to_one_tile"].by_default


def test_every_shared_row_is_marked_and_the_table_names_its_stage() -> None:
    b = _bench()
    rows = [
        {**_row("one_to_one", 0.990, 0.950, 300.0), "normalization": "image"},
        {**_row("neighbourhood", 0.988, 0.947, 90.0), "normalization": "tile"},
        {**_row("all_to_one_image", 0.950, 0.860, 20.0), "normalization": "image"},
        {**_row("cluster_oriented_tile", 0.991, 0.951, 90.0), "normalization": "tile"},
    ]
    b.mark_targets(rows)
    assert rows[1]["target"].startswith("met")
    assert rows[2]["target"].startswith("missed")
    assert rows[3]["target"].startswith("met")
    lines = b.table(rows).splitlines()
    assert "normalization" in lines[0]
    row_line = next(line for line in lines if "all_to_one_image" in line)
    assert "image" in row_line.split("all_to_one_image", 1)[1]
