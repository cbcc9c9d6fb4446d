"""train.backend: ray without a cluster: the run starts a local Ray for its tasks and stops it afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.run_dir import RunPaths

pytest.importorskip("ray")

from ray_head import child_env

pytestmark = pytest.mark.integration


DRIVER = """
import sys
import ray
from pathlib import Path
from tilead.trainer.config import load_config
from tilead.trainer.pipeline import train
assert not ray.is_initialized()
result = train(load_config(sys.argv[1]), Path(sys.argv[2]), progress=False)
print(result.fitted_now, ray.is_initialized())
"""


def test_ray_backend_starts_and_stops_its_own_local_ray(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", SyntheticSpec(image_size=128, train_good=4, test_good=1, test_per_defect=1))
    cfg = {
        "name": "own_ray",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 32},
        "model": {"feature_stride": 8, "n_features": 8, "blur_sigma": 1.0},
        "train": {"backend": "ray", "task_cpus": 1, "batch_size": 4},
        "validation": {"force": True},  # 4 test images, below min_images
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # The run is the Ray driver: a child process (tests/ray_head.py says why), which reports what it saw.
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    fitted, initialized = res.stdout.split()[-2:]
    assert fitted == "4"
    assert initialized == "False"  # the run's own Ray was shut down
    assert sorted(p.stem for p in RunPaths(tmp_path / "run").locations.glob("*.safetensors")) == [
        "r0c0",
        "r0c1",
        "r1c0",
        "r1c1",
    ]
