"""benchmarks/bench_post_python.py on a tiny synthetic bundle, in a subprocess: both forms give the same maps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bundle_factory import make_shared_bundle
from test_bench_side_by_side import _images

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_post_python.py"


def test_before_and_after_give_the_same_maps_and_a_row_each(tmp_path: Path) -> None:
    bundle = make_shared_bundle(tmp_path / "b")
    images = _images(tmp_path / "images", 4)
    out = tmp_path / "post.json"
    cmd = [sys.executable, str(SCRIPT), str(bundle), "--images", str(images), "--count", "4", "--batch", "1", "2",
           "--repeats", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["form"]) for r in rows] == [(1, "before"), (1, "after"), (2, "before"), (2, "after")]
    for row in rows:
        assert row["max_map_diff"] == 0.0  # the same pass, whichever form
        assert 0.0 < row["outside_ms"] < row["ms"]
        assert row["untile_ms"] > 0
    assert "before/after outside" in done.stdout
