"""ServeOptions: validation and the Ray resources of a replica (no cluster started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from tilead.serve.app import ServeOptions, build_app


def test_replica_resources() -> None:
    assert ServeOptions("b", threads=3).actor_options() == {"num_cpus": 3}
    assert ServeOptions("b", threads=2, device="cuda").actor_options() == {"num_cpus": 2, "num_gpus": 1}


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("replicas", 0, "replicas: expected a positive integer"),
        ("max_batch", -1, "max_batch: expected a positive integer"),
        ("threads", 1.5, "threads: expected a positive integer"),
        ("max_body_bytes", True, "max_body_bytes: expected a positive integer"),
        ("batch_wait_ms", -0.5, "batch_wait_ms: expected >= 0"),
        ("batch_wait_ms", float("nan"), "batch_wait_ms: expected >= 0"),
        ("device", "tpu", "device: expected 'cpu' or 'cuda'"),
    ],
)
def test_bad_options(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServeOptions("b", **{field: value})


def test_build_app_needs_a_bundle_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        build_app(ServeOptions(str(tmp_path / "missing")))
