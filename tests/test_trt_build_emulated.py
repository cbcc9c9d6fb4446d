"""build_engines' orchestration against a TensorRT builder stand-in (tests/fake_tensorrt.py).

Checks what tilead decides, not what TensorRT builds: the key, the flags per
TensorRT major version (FP16 flag on 10, an FP16 ONNX on 11), the batch
profile, one timing cache threaded through every location and saved, resuming
after an interruption, and the manifest entry with each engine's hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import fake_tensorrt
import pytest

from tilead.exporter import engines as build
from tilead.runtime.backends.tensorrt_modules import missing_api
from tilead.runtime.bundle import read_manifest, sha256_file, write_manifest

NAMES = ["r0c0", "r0c1", "r1c0", "r1c1"]
HEAD_NAMES = frozenset({"node_sub_97", "diff2", "node_sum_1", "sum_1", "tilead_node_3", "sqrt", "head.mean"})


def _bundle(root: Path) -> Path:
    """A bundle whose 'ONNX' files are small byte strings (the stand-in builder only hashes them)."""
    locations = []
    for name in NAMES:
        path = root / "tiles" / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"model {name}".encode())
        locations.append({"name": name, "file": f"tiles/{name}.onnx", "sha256": sha256_file(path),
                          "bytes": path.stat().st_size})  # fmt: skip
    manifest: dict[str, Any] = {
        "schema_version": 2,
        "grid": {"image_size": [64, 64], "tile_size": [48, 40], "stride": [16, 24]},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3, "color_order": "RGB"},
        "model": {"family": "padim", "map_size": [6, 5]},
        "locations": locations,
        "postprocess": {"weights": "uniform"},
        "normalization": {"stage": "none", "pixel_threshold": 1.0, "image_threshold": 1.0},
    }
    write_manifest(root, manifest)
    return root


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(major: int, **failures: bytes) -> list[str]:
        log: list[str] = []
        module = fake_tensorrt.make_builder_module(major, log, **failures)
        monkeypatch.setattr(build, "import_builder", lambda: module)
        monkeypatch.setattr(build, "require_gpu", lambda: ("Fake GPU", "8.7"))
        monkeypatch.setattr(build, "fp16_onnx_bytes", lambda path: b"fp16 " + Path(path).read_bytes())
        # What fp32_layer_names finds in a PaDiM export's head (tests/test_fp16_head.py runs the real one).
        monkeypatch.setattr(build, "fp32_layer_names", lambda path: HEAD_NAMES)
        return log

    return install


def test_the_stand_in_has_the_builder_api_tilead_uses() -> None:
    from tilead.exporter.engines import BUILDER_API, BUILDER_ENUMS

    for major in (10, 11):
        module = fake_tensorrt.make_builder_module(major, [])
        assert missing_api(module, BUILDER_API + BUILDER_ENUMS[major]) == []


def test_fp32_build_shares_one_timing_cache_and_lists_the_set(builder: Any, tmp_path: Path) -> None:
    log = builder(11)
    root = _bundle(tmp_path / "b")
    engines = build.build_engines(root, precision="fp32", opt_batch=2, max_batch=4, workspace_mib=64, progress=False)
    assert engines.key.startswith("fake-gpu-sm87-trt11.4.0-fp32-b4-")
    builds = [line for line in log if line.startswith("build")]
    # Every location is version-compatible without the lean runtime, strongly typed (11), without TensorRT's default
    # TF32 (FP32 engines compute in FP32, #18.6), and starts from the cache the previous one left: one timing cache.
    assert builds == [f"build flags=VERSION_COMPATIBLE,EXCLUDE_LEAN_RUNTIME network={1 << 5} cache={'+' * i}"
                      for i in range(4)]  # fmt: skip
    assert "workspace 64" in log
    folder = root / "engines" / engines.key
    assert (folder / "timing.cache").read_bytes() == b"++++"
    plan = (folder / "r1c0.engine").read_bytes()
    assert plan.endswith(b"|model r1c0")  # the location's own model, in float32
    assert b"((1, 3, 48, 40), (2, 3, 48, 40), (4, 3, 48, 40))" in plan  # the batch profile
    listed = read_manifest(root).engine_sets
    assert listed == (engines,)
    assert [f.sha256 for f in engines.files] == [hashlib.sha256((folder / f"{n}.engine").read_bytes()).hexdigest()
                                                 for n in NAMES]  # fmt: skip
    # Asking again finds the set; nothing is rebuilt.
    assert build.build_engines(root, precision="fp32", opt_batch=2, max_batch=4, progress=False) == engines
    assert len([line for line in log if line.startswith("build")]) == 4


def test_fp16_is_a_flag_on_tensorrt_10_and_an_fp16_onnx_on_11(builder: Any, tmp_path: Path) -> None:
    log10 = builder(10)
    e10 = build.build_engines(_bundle(tmp_path / "a"), precision="fp16", progress=False)
    builds = [line for line in log10 if line.startswith("build")]
    assert len(builds) == 4
    assert all("FP16,OBEY_PRECISION_CONSTRAINTS" in line.split()[1] for line in builds)
    assert (tmp_path / "a" / e10.files[0].file).read_bytes().endswith(b"|model r0c0")
    log11 = builder(11)
    e11 = build.build_engines(_bundle(tmp_path / "b"), precision="fp16", progress=False)
    assert "FP16" not in log11[-1].split()[1]
    assert (tmp_path / "b" / e11.files[0].file).read_bytes().endswith(b"|fp16 model r0c0")
    assert not [line for line in log11 if line.startswith("fp32 layers")]  # 11: the converted graph's types rule


def test_tensorrt_10_fp16_pins_the_distance_head_to_fp32(builder: Any, tmp_path: Path) -> None:
    log = builder(10)
    build.build_engines(_bundle(tmp_path / "a"), precision="fp16", progress=False)
    pinned = [line for line in log if line.startswith("fp32 layers")]
    assert len(pinned) == 4  # every location
    # By exact node name, by "<node>_" prefix (a node of several layers), by output name, the constant by name;
    # node_sub_9 is another node (a prefix of node_sub_97 without the "_") and the backbone stays free.
    assert pinned[0].split()[2:] == [
        f"{n}:float32/float32" for n in ("head.mean", "node_sub_97", "node_sum_1_reduce", "node_sum_1", "node_sqrt")
    ]
    log.clear()
    build.build_engines(_bundle(tmp_path / "b"), precision="fp32", progress=False)
    assert not [line for line in log if line.startswith("fp32 layers")]
    assert all("OBEY" not in line for line in log)


def test_tensorrt_10_fp16_fails_when_no_layer_matches_the_head(
    builder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder(10)
    monkeypatch.setattr(build, "fp32_layer_names", lambda path: frozenset({"/head/Sub"}))
    with pytest.raises(RuntimeError, match="no TensorRT layer matches the distance head"):
        build.build_engines(_bundle(tmp_path / "a"), precision="fp16", progress=False)


def test_tf32_only_when_asked(builder: Any, tmp_path: Path) -> None:
    """TensorRT turns TF32 on by default; the builder clears it unless tf32=True (issue #18.6)."""
    for major in (10, 11):
        log = builder(major)
        build.build_engines(_bundle(tmp_path / f"plain{major}"), progress=False)
        assert "TF32" not in log[-1].split()[1]
        build.build_engines(_bundle(tmp_path / f"tf32{major}"), progress=False, tf32=True)
        assert log[-1].split()[1].split("=")[1].split(",")[0] == "TF32"


def test_an_interrupted_build_resumes(builder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = builder(11)
    root = _bundle(tmp_path / "b")
    real = build._build_one
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_build_one", failing)
    with pytest.raises(RuntimeError, match=r"location r1c0 .*out of memory"):
        build.build_engines(root, progress=False)
    assert read_manifest(root).engine_sets == ()  # nothing listed until complete
    partial = next((root / "engines").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["r0c0.engine", "r0c1.engine", "timing.cache"]
    monkeypatch.setattr(build, "_build_one", real)
    engines = build.build_engines(root, progress=False)
    builds = [line for line in log if line.startswith("build")]
    assert len(builds) == 4  # two before the failure, two after: r0c0 and r0c1 were not built again
    assert builds[-1].endswith("cache=+++")  # the saved cache was picked up again
    assert not partial.exists()
    assert read_manifest(root).engine_sets == (engines,)


def test_bad_build_arguments(builder: Any, tmp_path: Path) -> None:
    builder(11)
    root = _bundle(tmp_path / "b")
    with pytest.raises(ValueError, match="precision"):
        build.build_engines(root, precision="int8")
    with pytest.raises(ValueError, match=r"opt \(8\) <= max \(4\)"):
        build.build_engines(root, opt_batch=8, max_batch=4)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            "reject_parse",
            r"TensorRT's ONNX parser rejected the model: node 3 \(Einsum\): unsupported equation; "
            r"network has no output",
        ),
        ("reject_build", r"TensorRT's builder returned no engine"),
    ],
)
def test_a_location_that_does_not_parse_or_build_is_a_clear_error_and_nothing_is_listed(
    builder: Any, tmp_path: Path, failure: str, message: str
) -> None:
    """The stand-in fails like TensorRT (parse False, build None), so these error branches are reached."""
    builder(11, **{failure: b"model r1c0"})
    root = _bundle(tmp_path / "b")
    with pytest.raises(RuntimeError, match=r"location r1c0 \(.*r1c0\.onnx\): " + message):
        build.build_engines(root, progress=False)
    assert read_manifest(root).engine_sets == ()
    partial = next((root / "engines").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["r0c0.engine", "r0c1.engine", "timing.cache"]
    builder(11)  # the model fixed (here: a builder that takes it): the build resumes and completes
    engines = build.build_engines(root, progress=False)
    assert [f.name for f in engines.files] == NAMES
    assert not partial.exists()


def test_tf32_is_an_engine_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tilead.cli.export import main

    run = tmp_path / "run"
    run.mkdir()
    result = CliRunner().invoke(main, [str(run), "-o", str(tmp_path / "bundle"), "--tf32"])
    assert result.exit_code == 2
    assert "--tf32 sets how TensorRT engines compute: add --trt" in result.output


def test_a_bundle_that_deploys_the_detector_score_builds(builder: Any, tmp_path: Path) -> None:
    """#18.8: the builder no longer refuses ``image_score: detector`` (the engine keeps the graph's second output)."""
    log = builder(11)
    root = _bundle(tmp_path / "b")
    data = dict(read_manifest(root).raw)
    data["model"] = {**data["model"], "score_output": "score"}
    data["postprocess"] = {**data["postprocess"], "image_score": "detector"}
    write_manifest(root, data)
    assert read_manifest(root).image_score == "detector"
    engines = build.build_engines(root, progress=False)
    assert len(engines.files) == 4
    assert len([line for line in log if line.startswith("build")]) == 4


def test_shared_models_and_the_thumbnail_get_one_engine_each(builder: Any, tmp_path: Path) -> None:
    """#20: one engine per shared model (not per location), then the thumbnail model at its own input size."""
    from tilead.runtime.thumbnail import BranchStats, ThumbnailBranch

    log = builder(11)
    root = _bundle(tmp_path / "b")
    data = dict(read_manifest(root).raw)
    models = []
    for name in ("m0", "m1"):
        path = root / "tiles" / f"{name}.onnx"
        path.write_bytes(f"model {name}".encode())
        models.append({"name": name, "file": f"tiles/{name}.onnx", "sha256": sha256_file(path),
                       "bytes": path.stat().st_size})  # fmt: skip
    for name in NAMES:
        (root / "tiles" / f"{name}.onnx").unlink()
    small = root / "thumbnail.onnx"
    small.write_bytes(b"model thumbnail")
    stats = BranchStats(1.0, 0.0, 2.0)
    branch = ThumbnailBranch(32, "max", None, (4, 4), stats, stats)
    data.update(
        assignment="cluster",
        models=models,
        locations=[{"name": n, "model": m} for n, m in zip(NAMES, ("m0", "m1", "m1", "m0"), strict=True)],
        thumbnail={
            **branch.to_dict(),
            "file": "thumbnail.onnx",
            "sha256": sha256_file(small),
            "bytes": small.stat().st_size,
        },
    )
    write_manifest(root, data)
    engines = build.build_engines(root, max_batch=4, progress=False)
    assert [f.name for f in engines.files] == ["m0", "m1"]
    assert engines.thumbnail is not None
    assert engines.thumbnail.name == "thumbnail"
    assert len([line for line in log if line.startswith("build")]) == 3  # one timing cache through all three
    folder = root / "engines" / engines.key
    assert (folder / "m1.engine").read_bytes().endswith(b"|model m1")
    plan = (folder / "thumbnail.engine").read_bytes()
    assert plan.endswith(b"|model thumbnail")
    assert b"((1, 3, 32, 32), (1, 3, 32, 32), (4, 3, 32, 32))" in plan  # the thumbnail's input, not a tile's
    assert read_manifest(root).engine_sets == (engines,)
    # The key covers the thumbnail model: another thumbnail, another set.
    small.write_bytes(b"model thumbnail 2")
    data["thumbnail"] = {**data["thumbnail"], "sha256": sha256_file(small), "bytes": small.stat().st_size}
    data.pop("engines", None)
    write_manifest(root, data)
    assert build.build_engines(root, max_batch=4, progress=False).key != engines.key
