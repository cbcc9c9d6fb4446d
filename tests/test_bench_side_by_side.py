"""benchmarks/bench_bundles_side_by_side.py on two tiny synthetic shared bundles, in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_shared_bundle

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bundles_side_by_side.py"


def _images(folder: Path, count: int, size: int = 64) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_two_copies_of_one_bundle_give_the_same_maps_and_a_row_each(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    a = make_shared_bundle(tmp_path / "a")
    b = Path(shutil.copytree(a, tmp_path / "b"))
    images = _images(tmp_path / "images", 4)
    out = tmp_path / "sbs.json"
    done = _run(str(a), str(b), "--images", str(images), "--count", "4", "--batch", "1", "2", "--repeats", "2",
                "--backbone", "--backbone-calls", "5", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["bundles"] == [str(a), str(b)]
    assert sorted(report["batches"]) == ["1", "2"]
    for rows in report["batches"].values():
        assert [r["bundle"] for r in rows] == [str(a), str(b)]
        assert rows[0]["ratio_to_first"] == 1.0
        assert rows[1]["map_diff_to_first"] == 0.0  # the same bundle: the same maps
        assert all(r["ms_per_image"] > 0 and 0.0 <= r["outside_share"] <= 1.0 for r in rows)
    assert [r["bundle"] for r in report["backbone"]] == [str(a), str(b)]
    assert all(r["ms_per_tile"] > 0 for r in report["backbone"])
    assert "backbone alone, OpenVINO" in done.stdout


def test_bundles_of_other_grids_or_too_few_images_are_refused(tmp_path: Path) -> None:
    a = make_shared_bundle(tmp_path / "a")
    other = {"image_size": [64, 64], "tile_size": [32, 32], "stride": [32, 32], "edge": "shift"}
    b = make_shared_bundle(tmp_path / "b", grid_data=other)
    images = _images(tmp_path / "images", 2)
    done = _run(str(a), str(b), "--images", str(images), "--count", "2", "--batch", "1")
    assert done.returncode != 0
    assert "another grid" in done.stderr
    done = _run(str(a), str(a), "--images", str(images), "--count", "4", "--batch", "1")
    assert done.returncode != 0
    assert "--count asks for 4" in done.stderr
    done = _run(str(a), "--images", str(images))
    assert done.returncode != 0
    assert "at least two bundles" in done.stderr
