"""train.backend: ray on a real local Ray cluster: a worker killed mid-fit is retried, results equal local training.

The cluster runs in processes of its own and the driver is ``tilead-train`` in a child process
(tests/ray_head.py says why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("ray")

from ray_head import RayCluster, ray_head, run_tool

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.config import load_config
from tilead.trainer.faults import FAULT_FLAG_ENV, FAULT_LOCATION_ENV
from tilead.trainer.io import load_tensors
from tilead.trainer.pipeline import train
from tilead.trainer.run_dir import RunPaths

pytestmark = pytest.mark.integration

KILLED = "r0c1"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_fit")
    data = generate(root / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=5))
    cfg = {
        "name": "tiny_ray",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"feature_stride": 8, "n_features": 16, "blur_sigma": 1.0},
        "train": {"batch_size": 2, "threads": 1, "task_cpus": 1, "max_retries": 2},
        "validation": {"force": True},  # 5 test images, below min_images
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def ray_cluster(work: Path) -> Iterator[tuple[RayCluster, Path]]:
    """A real one-node Ray cluster whose workers kill themselves on their first attempt at location ``KILLED``.

    Yields:
        ``(cluster, flag file)``: the flag holds the pid of the worker that died, once one did.
    """
    flag = work / "fault.flag"
    # The node's raylet, and so every worker it starts, gets the variables; this process and the drivers never do.
    with ray_head(work / "r", num_cpus=2, env={FAULT_LOCATION_ENV: KILLED, FAULT_FLAG_ENV: str(flag)}) as running:
        yield running, flag


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    paths = RunPaths(run)
    return {p.stem: load_tensors(p)[0] for p in sorted(paths.locations.glob("*.safetensors"))}


def _assert_identical(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype
            assert torch.equal(a[name][key], b[name][key]), f"{name}/{key} differs"


def _stats(run: Path) -> Any:
    return json.loads(RunPaths(run).stats.read_text())["normalization"]


def test_ray_fit_survives_a_killed_worker_and_equals_local(work: Path, ray_cluster: tuple[RayCluster, Path]) -> None:
    cluster, flag = ray_cluster
    config = work / "tiny.yaml"
    local = train(load_config(config), work / "local", progress=False)
    assert local.fitted_now == 4
    assert not flag.exists()  # no fault variables in this process: the local fit ran through

    # The driver is tilead-train in a child process (tests/ray_head.py says why), as on a factory's machines.
    args = ["tilead-train", "--config", str(config), "--output", str(work / "ray"), "--ray-address", cluster.address]
    res = run_tool([*args, "--no-eval", "--no-progress"], env=cluster.env)
    assert res.returncode == 0, res.stderr
    assert "4 fitted now" in res.stdout
    # The first attempt at KILLED really died (os._exit in the middle of its fit): its pid is in the flag,
    # and it is neither this process nor the driver.
    assert flag.is_file()
    assert int(flag.read_text()) != os.getpid()
    _assert_identical(_tensors(work / "local"), _tensors(work / "ray"))
    assert _stats(work / "local") == _stats(work / "ray")
    run_json = json.loads(RunPaths(work / "ray").run_json.read_text())
    assert run_json["status"] == "trained"
    assert sorted(run_json["fit_locations"]) == ["r0c0", "r0c1", "r1c0", "r1c1"]

    # Resume on the same cluster: only the missing location is fitted again, the rest is kept byte for byte.
    paths = RunPaths(work / "ray")
    kept = paths.checkpoint("r0c0").read_bytes()
    paths.checkpoint("r1c1").unlink()
    res = run_tool([*args, "--resume", "--no-eval", "--no-progress"], env=cluster.env)
    assert res.returncode == 0, res.stderr
    assert "1 fitted now" in res.stdout
    assert load_config(paths.config).train.backend == "ray"
    assert paths.checkpoint("r0c0").read_bytes() == kept
    _assert_identical(_tensors(work / "local"), _tensors(work / "ray"))


def test_a_worker_that_keeps_dying_fails_the_run_naming_the_location(
    work: Path, ray_cluster: tuple[RayCluster, Path]
) -> None:
    cluster, flag = ray_cluster
    flag.unlink(missing_ok=True)  # arm the fault again; no retries this time
    args = ["tilead-train", "--config", str(work / "tiny.yaml"), "--output", str(work / "no_retry")]
    args += ["--ray-address", cluster.address, "--set", "train.max_retries=0", "--no-eval", "--no-progress"]
    res = run_tool(args, env=cluster.env)
    assert res.returncode != 0
    assert "location index 1" in res.stderr, res.stderr
    assert "Ray task failed" in res.stderr
    assert flag.is_file()
    # The other locations' checkpoints that finished are kept for --resume; the killed one has none.
    assert not RunPaths(work / "no_retry").checkpoint(KILLED).exists()


def test_backend_is_not_part_of_the_fit_key(work: Path) -> None:
    # A run started locally resumes on Ray and back: the backend does not change what a location's fit is.
    cfg = load_config(work / "tiny.yaml", {"train.backend": "ray", "train.ray_address": "auto", "train.task_cpus": 2})
    assert cfg.train.backend == "ray"
    assert cfg.train.ray_address == "auto"
    assert cfg.fit_key() == load_config(work / "tiny.yaml").fit_key()
