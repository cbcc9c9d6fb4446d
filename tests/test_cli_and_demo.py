"""tilead-info, the synthetic data generator and the demo run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tilead.cli.info import main as info_main
from tilead.demo.synthetic import DEFECT_TYPES, SyntheticSpec, generate
from tilead.runtime import cuda_status

SMALL = SyntheticSpec(image_size=128, train_good=3, test_good=2, test_per_defect=1, seed=7)


def test_info_reports_build_and_cuda_status() -> None:
    result = CliRunner().invoke(info_main, ["--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    status = cuda_status()
    assert info["cuda_built"] == status.built
    assert info["cpu_tile_path"] in ("avx2+f16c", "portable")
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


@pytest.mark.integration
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    from tilead.demo.pipeline import run

    result = run(tmp_path, SyntheticSpec(image_size=256, train_good=8, test_good=4, test_per_defect=3), overlays=2)
    m = result.metrics
    assert m["test_images"] == 4 + 3 * len(DEFECT_TYPES)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert len(result.overlays) == 2
    assert all(p.exists() for p in result.overlays)
    # The stand-in model finds these synthetic defects; a broken runtime would not.
    assert m["image_auroc"] > 0.8
    assert m["pixel_auroc"] > 0.9
