"""tilead-info, the synthetic data generator and the demo (train, export, runtime, evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tilead.cli.info import main as info_main
from tilead.demo.synthetic import DEFECT_TYPES, SyntheticSpec, generate
from tilead.runtime import cuda_status
from tilead.trainer.detectors.padim.config import PadimConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticSpec(image_size=128, train_good=3, test_good=2, test_per_defect=1, seed=7)


def test_info_reports_build_and_cuda_status() -> None:
    result = CliRunner().invoke(info_main, ["--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    status = cuda_status()
    assert info["cuda_built"] == status.built
    assert info["cpu_tile_path"] in ("avx2+f16c", "portable")
    from tilead.cli.info import INT8_PATHS
    from tilead.runtime.cpu_features import int8_arithmetic

    assert info["cpu_int8"] == INT8_PATHS[int8_arithmetic()]
    assert info["cpu_threads"] >= 1
    if not status.usable:
        assert info["cuda_devices"] == []
    table = CliRunner().invoke(info_main, [])
    assert table.exit_code == 0
    assert "cuda_built" in table.output


def test_synthetic_data_layout_and_determinism(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    a = generate(tmp_path / "a", SMALL)
    b = generate(tmp_path / "b", SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == SMALL.train_good + SMALL.test_good + 2 * len(DEFECT_TYPES) * SMALL.test_per_defect
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for kind in DEFECT_TYPES:
        mask = cv2.imread(str(a / "ground_truth" / kind / "000_mask.png"), cv2.IMREAD_GRAYSCALE)
        image = cv2.imread(str(a / "test" / kind / "000.png"), cv2.IMREAD_COLOR)
        assert mask.shape == image.shape[:2] == (128, 128)
        assert 0 < (mask > 0).sum() < mask.size // 4, kind
        assert set(np.unique(mask)) <= {0, 255}


def test_synthetic_data_is_reused_only_when_the_spec_matches(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", SMALL)
    marker = root / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    generate(tmp_path / "d", SMALL)
    assert marker.stat().st_mtime_ns == stamp
    other = SyntheticSpec(image_size=128, train_good=2, test_good=1, test_per_defect=1, seed=8)
    generate(tmp_path / "d", other)
    assert len(list((root / "train" / "good").glob("*.png"))) == 2
    assert not list(tmp_path.glob(".d.*")), "no temporary folder left behind"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 32}, "image_size: expected at least 64"),
        ({"train_good": 0}, "train_good: expected at least 1"),
    ],
)
def test_synthetic_spec_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**kwargs)


def test_demo_grid_is_2x2_with_overlap() -> None:
    from tilead.demo.pipeline import demo_grid
    from tilead.runtime import TileGrid

    assert demo_grid(1024) == (544, 480)
    for size in (256, 300, 512, 768, 1024, 2048, 4096):
        tile, stride = demo_grid(size)
        assert tile % 16 == 0, size
        assert 0 < stride < tile <= size, size
        grid = TileGrid(size, tile, stride)
        assert (grid.rows, grid.cols) == (2, 2), size
        assert stride + tile == size, size


def test_demo_config_is_shipped_and_points_at_the_data(tmp_path: Path) -> None:
    from tilead.demo.pipeline import DEFAULT_CONFIG, DEFAULT_IMAGE_SIZE, demo_grid, load_demo_config

    assert DEFAULT_CONFIG.is_file()
    cfg = load_demo_config(DEFAULT_CONFIG, tmp_path / "data", DEFAULT_IMAGE_SIZE)
    assert cfg.data.root == (tmp_path / "data").resolve()
    assert cfg.validation.split == "holdout"
    assert isinstance(cfg.model, PadimConfig)  # the default family
    assert cfg.model.backbone.name == "efficientnet_lite0"
    assert cfg.model.backbone.layers == ("blocks.1", "blocks.2", "blocks.3")
    assert (cfg.model.feature_stride, cfg.model.n_features, cfg.model.storage_dtype) == (8, 100, "float16")
    grid = cfg.grid.build((DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    assert (grid.rows, grid.cols) == (2, 2)
    assert grid.stride[0] < grid.tile_size[0], "tiles overlap"
    # The default spec leaves enough good images both to fit and to hold out.
    n_val = max(1, round(SyntheticSpec().train_good * cfg.validation.holdout_fraction))
    assert n_val >= 4
    assert SyntheticSpec().train_good - n_val >= 12
    small = load_demo_config(DEFAULT_CONFIG, tmp_path / "data", 256)
    assert small.grid.build((256, 256)).tile_size == (demo_grid(256)[0],) * 2
    assert small.fit_key() != cfg.fit_key()


def _fake_result(out: Path) -> Any:
    from tilead.demo.pipeline import DemoPaths, DemoResult

    metrics = {"image_auroc": 1.0, "pixel_auroc": 0.9876, "aupro": 0.95, "image_f1": 0.9, "pixel_f1": 0.4}
    report = {"grid": {"tile_size": [144, 144]}, "grid_shape": [2, 2], "validation": {"split": "holdout"}}
    return DemoResult(
        paths=DemoPaths(out),
        metrics=metrics,
        report=report,
        predictions=13,
        predict_ms=12.3,
        overlays=[out / "overlays" / "good_000.png"],
        train_step="reused",
        export_step="reused",
        timings={"data": 0.1, "train": 0.2},
        seconds=1.5,
    )


def test_demo_cli_passes_options_and_prints_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tilead.demo.pipeline as pipeline
    from tilead.cli.demo import main as demo_main

    calls: list[dict[str, Any]] = []

    def fake_run(out_dir: Path, spec: SyntheticSpec, **kwargs: Any) -> Any:
        calls.append({"out_dir": out_dir, "spec": spec, **kwargs})
        kwargs["echo"]("[1/5] step")
        return _fake_result(Path(out_dir))

    monkeypatch.setattr(pipeline, "run", fake_run)
    out = tmp_path / "demo"
    res = CliRunner().invoke(demo_main, ["--out", str(out), "--image-size", "256", "--overlays", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    (call,) = calls
    assert call["out_dir"] == out
    assert call["spec"].image_size == 256
    assert (call["overlays"], call["progress"], call["config"]) == (3, False, None)
    text = res.output
    assert "[1/5] step" in text
    for expected in (
        f"data:          {out / 'data'}",
        f"run:           {out / 'run'} (reused; PaDiM 2x2 tiles of 144x144 px, thresholds from the holdout split)",
        f"bundle:        {out / 'bundle'} (reused)",
        f"predictions:   {out / 'predictions.jsonl'} (13 images)",
        f"overlays:      {out / 'overlays'} (1 images)",
        f"metrics:       {out / 'eval' / 'metrics.json'}",
        "image AUROC:   1.0000   pixel AUROC: 0.9876   AUPRO: 0.9500",
        "runtime:       12 ms per image",
        "total 1.5 s",
    ):
        assert expected in text
    assert "stand-in" not in text.lower()


def test_demo_refuses_a_foreign_run_folder(tmp_path: Path) -> None:
    from tilead.cli.demo import main as demo_main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(demo_main, ["--out", str(tmp_path), "--quiet"])
    assert res.exit_code != 0
    assert "not written by tilead-demo" in res.output
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "data").exists(), "stops before generating anything"


def test_demo_reports_a_bad_config(tmp_path: Path) -> None:
    from tilead.cli.demo import main as demo_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {format: mvtec, root: .}\ngrid: {tile_size: 64}\nmodel: {n_features: 0}\n")
    res = CliRunner().invoke(demo_main, ["--out", str(tmp_path / "out"), "--config", str(bad), "--quiet"])
    assert res.exit_code != 0
    assert "model.n_features" in res.output


@pytest.mark.integration
def test_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path: Path) -> None:
    from tilead.demo.pipeline import run, summary_lines

    spec = SyntheticSpec(image_size=256, train_good=12, test_good=4, test_per_defect=3, seed=11)
    n_test = spec.test_good + spec.test_per_defect * len(DEFECT_TYPES)
    first = run(tmp_path, spec, overlays=4, progress=False)
    p = first.paths
    assert (first.train_step, first.export_step) == ("trained", "exported")
    for path in (p.data / "spec.json", p.run / "stats.json", p.bundle / "manifest.json", p.metrics):
        assert path.is_file(), path
    assert (p.eval / "per_image.csv").is_file()
    assert len(first.overlays) == 4
    assert all(o.is_file() and o.parent == p.overlays for o in first.overlays)
    assert {o.name.split("_")[0] for o in first.overlays} == {"good", *DEFECT_TYPES}

    records = [json.loads(line) for line in p.predictions.read_text().splitlines()]
    assert first.predictions == len(records) == n_test
    assert all({"file", "score", "label", "ms"} <= set(r) for r in records)
    assert all(0.0 <= r["score"] <= 1.0 and r["ms"] > 0 for r in records)
    assert first.predict_ms > 0

    report = json.loads(p.metrics.read_text())
    assert report["test_images"] == n_test
    assert report["validation"]["split"] == "holdout"
    assert report["grid_shape"] == [2, 2]
    assert "Predictor" in report["inference"]
    m = first.metrics
    assert {"image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"} <= set(m)
    # The Predictor's raw scores are the evaluation's raw scores (the same bundle, batched differently).
    raw_eval = {}
    for line in (p.eval / "per_image.csv").read_text().splitlines()[1:]:
        file, _, _, raw, *_ = line.split(",")
        raw_eval[file] = float(raw)
    for r in records:
        assert r["raw_score"] == pytest.approx(raw_eval[r["file"]], rel=1e-3)
    # PaDiM finds these synthetic defects; a broken pipeline would not.
    assert m["image_auroc"] >= 0.9, m
    assert m["pixel_auroc"] >= 0.9, m
    assert m["aupro"] >= 0.7, m
    assert not any("stand-in" in line.lower() for line in summary_lines(first))

    # A second run reuses the trained run and the bundle and gives the same results.
    stamp = (p.bundle / "manifest.json").stat().st_mtime_ns
    second = run(tmp_path, spec, overlays=4, progress=False)
    assert (second.train_step, second.export_step) == ("reused", "reused")
    assert (p.bundle / "manifest.json").stat().st_mtime_ns == stamp
    assert second.metrics == pytest.approx(m)
    again = [json.loads(line) for line in p.predictions.read_text().splitlines()]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in records], abs=1e-5)

    # Another dataset replaces the demo's run and bundle instead of failing or mixing them.
    third = run(tmp_path, SyntheticSpec(image_size=256, train_good=12, test_good=2, test_per_defect=1, seed=12),
                overlays=0, progress=False)  # fmt: skip
    assert (third.train_step, third.export_step) == ("trained", "exported")
    assert third.predictions == 2 + len(DEFECT_TYPES)
    assert not list(p.overlays.glob("*.png")), "stale overlays are removed"


def test_every_shipped_config_parses_and_names_its_family() -> None:
    from tilead.trainer.config import load_config

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = load_config(path)
        assert path.stem.startswith(cfg.model.family), (path.name, cfg.model.family)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["patchcore", "stfpm"])
def test_demo_runs_with_the_other_detectors(tmp_path: Path, family: str) -> None:
    """``tilead-demo --config configs/<family>_demo.yaml``: train, export, Predictor and evaluation."""
    from tilead.demo.pipeline import run

    spec = SyntheticSpec(image_size=256, train_good=12, test_good=4, test_per_defect=3, seed=11)
    result = run(tmp_path, spec, config=ROOT / "configs" / f"{family}_demo.yaml", overlays=0, progress=False)
    manifest = json.loads((result.paths.bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == family
    records = [json.loads(line) for line in result.paths.predictions.read_text().splitlines()]
    assert result.predictions == len(records) == spec.test_good + spec.test_per_defect * len(DEFECT_TYPES)
    # Both detectors find the synthetic defects through the bundle (measured: see the README's detector table).
    assert result.metrics["image_auroc"] >= 0.8, result.metrics
    assert result.metrics["pixel_auroc"] >= 0.8, result.metrics
