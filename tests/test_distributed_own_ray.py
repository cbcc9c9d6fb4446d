"""train.backend: ray without a cluster: the run starts a local Ray for its tasks and stops it afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.config import load_config
from tilead.trainer.pipeline import train
from tilead.trainer.run_dir import RunPaths

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def test_ray_backend_starts_and_stops_its_own_local_ray(tmp_path: Path) -> None:
    assert not ray.is_initialized()
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
    result = train(load_config(path), tmp_path / "run", progress=False)
    assert result.fitted_now == 4
    assert sorted(p.stem for p in RunPaths(tmp_path / "run").locations.glob("*.safetensors")) == [
        "r0c0",
        "r0c1",
        "r1c0",
        "r1c1",
    ]
    assert not ray.is_initialized()  # the run's own Ray was shut down
