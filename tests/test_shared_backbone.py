"""The ``shared_backbone`` layout (issue #21): one backbone graph for every tile, a head per location.

Real ONNX Runtime and OpenVINO on small ``onnx.helper`` graphs (tests/bundle_factory.py): a
shared bundle whose ``head(backbone(x))`` equals a per-location bundle's graphs must give the
same predictions; malformed layouts, entries and graphs fail at load with a BundleError.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import backbone_model, head_model, make_bundle, make_shared_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import json_paths

from tilead.runtime import BundleError, Prediction, Predictor, read_manifest
from tilead.runtime.backends.base import BufferPool, backbone_chunks
from tilead.runtime.backends.tensorrt_modules import require_per_location
from tilead.runtime.bundle import parse_manifest, read_verified, write_manifest


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return make_bundle(root / "per_location"), make_shared_bundle(root / "shared")


@pytest.fixture
def shared(pair: tuple[Path, Path], tmp_path: Path) -> Path:
    target = tmp_path / "shared"
    shutil.copytree(pair[1], target)
    return target


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _data(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


# -- the same predictions as the per-location layout -------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize(("threads", "workers", "max_batch"), [(1, 1, 8), (2, 2, 8), (2, 2, 2), (4, 3, 3)])
def test_shared_layout_predicts_what_the_per_location_graphs_predict(
    pair: tuple[Path, Path], backend: str, threads: int, workers: int, max_batch: int
) -> None:
    images = _images(5)
    options: dict[str, Any] = {"threads": threads, "location_workers": workers, "max_batch": max_batch}
    with Predictor(pair[0], backend=backend, **options) as old, Predictor(pair[1], backend=backend, **options) as new:
        assert new.manifest.layout == "shared_backbone"
        assert old.manifest.layout == "per_location"
        np.testing.assert_allclose(new.location_maps(images), old.location_maps(images), rtol=1e-6, atol=1e-6)
        olds, news = old.predict(list(images)), new.predict(list(images))
        assert isinstance(olds, list)
        assert isinstance(news, list)
        for a, b in zip(olds, news, strict=True):
            np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-6)
            assert b.label == a.label
            assert b.score == pytest.approx(a.score, abs=1e-6)
        # Buffers are reused across calls: a second call of another size gives the same maps again.
        one = new.predict(images[2])
        assert isinstance(one, Prediction)
        np.testing.assert_allclose(one.anomaly_map, news[2].anomaly_map)


def test_concurrent_calls_on_a_shared_bundle_give_the_serial_results(pair: tuple[Path, Path]) -> None:
    batches = [_images(n, seed=n) for n in (1, 2, 3, 4, 5, 6)]
    with Predictor(pair[1], threads=2, location_workers=2, max_batch=4) as predictor:
        serial = [predictor.location_maps(b) for b in batches]
        with ThreadPoolExecutor(6) as pool:
            parallel = list(pool.map(predictor.location_maps, batches))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_predict_timed_reports_the_backbone_under_inference(pair: tuple[Path, Path]) -> None:
    with Predictor(pair[1], threads=1) as predictor:
        _, times = predictor.predict_timed(_images(2))
    stages = times.seconds
    assert "location:backbone" in stages
    assert "location:r0c0" in stages
    assert stages["inference"] >= stages["location:backbone"] > 0


def test_read_verified_returns_the_backbone_first(shared: Path) -> None:
    manifest = read_manifest(shared)
    models = read_verified(shared, manifest)
    assert list(models) == ["backbone", "r0c0", "r0c1", "r1c0", "r1c1"]
    assert models["backbone"] == (shared / "backbone.onnx").read_bytes()
    assert manifest.features == (2, 5, 5)
    assert [f.file for f in manifest.locations] == [f"heads/{name}.onnx" for name in ("r0c0", "r0c1", "r1c0", "r1c1")]


# -- refused at load ----------------------------------------------------------------------------------------


def _rewrite(bundle: Path, change: Any) -> None:
    data = _data(bundle)
    change(data)
    write_manifest(bundle, data)


def _set(path: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        keys = path.split(".")
        node = data
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("layout", "shared", "layout: expected one of per_location, shared_backbone"),
        ("layout", 1, "layout: expected one of"),
        ("layout", "per_location", "only a 'shared_backbone' layout has a backbone entry"),
        ("backbone", _DELETE, "backbone: expected a mapping"),
        ("backbone.file", "tiles/backbone.onnx", "must use its own file 'backbone.onnx'"),
        ("backbone.name", "r0c0", "backbone.name: expected 'backbone'"),
        ("backbone.sha256", "ab" * 31, "backbone.sha256: expected 64 lower-case hex digits"),
        ("backbone.bytes", -1, "backbone.bytes"),
        ("backbone.output", "map", "backbone.output: expected 'features'"),
        ("backbone.features", [2, 5], "backbone.features: expected [channels, height, width]"),
        ("backbone.features", [0, 5, 5], "backbone.features[0]"),
        ("backbone.features", [2, 50, 5], "at most the tile size"),
        ("backbone.features", [True, 5, 5], "backbone.features[0]"),
        ("backbone.extra", 1, "backbone"),
        ("locations.0.file", "tiles/r0c0.onnx", "must use its own file 'heads/r0c0.onnx'"),
    ],
)
def test_bad_layout_entries_are_one_error_naming_the_key(shared: Path, path: str, value: Any, message: str) -> None:
    _rewrite(shared, _set(path, value))
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        read_manifest(shared)


def test_a_shared_layout_cannot_deploy_the_detector_score(shared: Path) -> None:
    def detector(data: dict[str, Any]) -> None:
        data["postprocess"]["image_score"] = "detector"
        data["model"]["score_output"] = "score"

    _rewrite(shared, detector)
    with pytest.raises(BundleError, match=r"expected postprocess.image_score 'max'"):
        read_manifest(shared)


def test_a_per_location_bundle_with_heads_files_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    target = tmp_path / "b"
    shutil.copytree(pair[1], target)
    _rewrite(target, lambda d: (d.pop("layout"), d.pop("backbone")))
    with pytest.raises(BundleError, match=r"must use its own file 'tiles/r0c0.onnx'"):
        read_manifest(target)


def test_a_modified_backbone_fails_on_its_hash_naming_it(shared: Path) -> None:
    path = shared / "backbone.onnx"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"the shared backbone: sha256 of .*backbone.onnx"):
        Predictor(shared)
    path.unlink()
    with pytest.raises(BundleError, match=r"the shared backbone: model file .*backbone.onnx is missing"):
        Predictor(shared)


@pytest.mark.parametrize(
    ("backbone", "heads", "message"),
    [
        (backbone_model(output_name="feats"), None, "the shared backbone: model has outputs \\['feats'\\]"),
        (backbone_model(features=3), None, "the shared backbone: model: 'features' has shape"),
        (None, [head_model(1.0, input_name="tiles")] * 4, "location r0c0: model has inputs \\['tiles'\\]"),
        (None, [head_model(1.0, features=3)] * 4, "location r0c0: model: 'features' has shape"),
        (b"not onnx", None, "the shared backbone: ONNX Runtime cannot load"),
    ],
)
def test_graphs_that_disagree_with_the_manifest_fail_at_load(
    tmp_path: Path, backbone: bytes | None, heads: list[bytes] | None, message: str
) -> None:
    bundle = make_shared_bundle(tmp_path / "b", backbone=backbone, heads=heads)
    assert _data(bundle)["backbone"]["features"] == [2, 5, 5]  # the manifest's shape; the graphs above differ
    with pytest.raises(BundleError, match=message):
        Predictor(bundle, threads=1)


def test_openvino_refuses_a_broken_backbone(tmp_path: Path) -> None:
    bundle = make_shared_bundle(tmp_path / "b", backbone=b"not onnx")
    with pytest.raises(BundleError, match="the shared backbone: OpenVINO cannot load"):
        Predictor(bundle, backend="openvino", threads=1)


def test_tensorrt_refuses_the_shared_layout_with_what_to_do(shared: Path) -> None:
    with pytest.raises(BundleError, match=r"'shared_backbone' layout .* export the run with --layout per_location"):
        require_per_location(shared, read_manifest(shared))


# -- fuzz: a mutated shared manifest parses into something usable or is one BundleError ------------------------


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, 5, -1, 0.5, 2**62, "", "backbone", "backbone.onnx", "heads/r0c0.onnx", "features"]),
    st.sampled_from(["per_location", "shared_backbone", "tiles/r0c0.onnx", "map"]),
    st.lists(st.integers(min_value=-2, max_value=60), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def _mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    focus = [p for p in json_paths(data) if p[0] in ("layout", "backbone", "locations", "postprocess")]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(focus))
        parent: Any = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            key = path[-1]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[key] = draw(_VALUES)
            elif action == "delete":
                del parent[key]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(["layout", "backbone", "extra"]))] = draw(_VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    return data


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_shared_manifests(pair: tuple[Path, Path], data: st.DataObject) -> None:
    manifest = data.draw(_mutated(_data(pair[1])))
    try:
        parsed = parse_manifest(manifest)
    except BundleError:
        return
    # What parses is consistent: a backbone exactly for the shared layout, each location its own file.
    assert (parsed.backbone is None) == (parsed.layout == "per_location") == (parsed.features is None)
    folder = "heads" if parsed.layout == "shared_backbone" else "tiles"
    assert [loc.file for loc in parsed.locations] == [f"{folder}/{loc.name}.onnx" for loc in parsed.locations]
    if parsed.backbone is not None:
        assert parsed.backbone.file == "backbone.onnx"
        assert parsed.files[0] == parsed.backbone
        assert parsed.image_score == "max"


# -- the backbone's chunks and the buffer pool --------------------------------------------------------------


@given(
    total=st.integers(0, 300),
    tile_bytes=st.integers(1, 1 << 24),
    workers=st.integers(1, 8),
    limit=st.integers(1, 1 << 26),
)
def test_backbone_chunks_cover_every_tile_in_order(total: int, tile_bytes: int, workers: int, limit: int) -> None:
    chunks = backbone_chunks(total, tile_bytes, workers, limit)
    if total == 0:
        assert chunks == []
        return
    assert chunks[0][0] == 0
    assert chunks[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    sizes = [hi - lo for lo, hi in chunks]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert len(chunks) >= min(workers, total)  # every worker gets a share where there are enough tiles
    assert max(sizes) == 1 or max(sizes) * tile_bytes <= limit or len(chunks) == total


def test_buffer_pool_reuses_and_bounds_idle_buffers() -> None:
    pool = BufferPool(keep=2)
    a = pool.take((2, 3))
    pool.give(a)
    assert pool.take((2, 3)) is a  # the idle one comes back
    b, c = pool.take((2, 3)), pool.take((4,), "float16")
    assert b is not a
    assert c.dtype == np.float16
    assert c.shape == (4,)
    for buf in (a, b, c):
        pool.give(buf)
    # Three given, two kept: the least recently returned shape's oldest buffer was dropped.
    kept = [pool.take((2, 3)), pool.take((4,), "float16")]
    assert kept[0] is b
    assert kept[1] is c
    assert pool.take((2, 3)) is not a
    pool.clear()
    assert pool.take((4,), "float16") is not c


def test_recalibrating_a_shared_bundle_keeps_its_layout_and_backbone(shared: Path) -> None:
    from tilead.calibrate import Sample, calibrate

    before = read_manifest(shared)
    goods = [_images(1, seed=s)[0] // 4 + 90 for s in range(12)]
    calibrate(shared, [Sample(f"g{i}", g) for i, g in enumerate(goods)], target_false_alarm=0.1, min_good=10)
    after = read_manifest(shared)
    assert after.layout == "shared_backbone"
    assert after.backbone == before.backbone
    assert after.stats != before.stats
    with Predictor(shared, threads=1) as predictor:
        assert len(predictor.predict(goods)) == len(goods)  # type: ignore[arg-type]


def test_cpu_sessions_do_not_keep_the_model_bytes(pair: tuple[Path, Path]) -> None:
    from tilead.runtime.backends.onnxruntime import OnnxRuntimeBackend

    for bundle in pair:
        with Predictor(bundle, threads=1) as predictor:
            backend = predictor._backend
            assert isinstance(backend, OnnxRuntimeBackend)
            sessions = [*(backend._sessions or []), *([backend._backbone] if backend._backbone is not None else [])]
            assert len(sessions) == 4 + (bundle == pair[1])
            # ONNX Runtime would hold every file's bytes for the session's lifetime (its fallback copy).
            assert all(getattr(s, "_model_bytes", None) is None for s in sessions)
            assert predictor.predict(_images(1)[0]).anomaly_map.shape == (64, 64)  # type: ignore[union-attr]


def test_verified_models_read_each_file_when_indexed_and_check_it(shared: Path) -> None:
    from tilead.runtime.backends.base import VerifiedModels

    manifest = read_manifest(shared)
    models = VerifiedModels(shared, manifest.locations)
    assert len(models) == len(manifest.locations) == 4
    assert models[1] == (shared / manifest.locations[1].file).read_bytes()
    assert len(models[2:]) == 2
    assert models[2:][0] == models[2]
    # Nothing was read ahead: a file changed after the sequence was made fails when it is reached, naming it.
    target = shared / manifest.locations[3].file
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    assert models[0] == (shared / manifest.locations[0].file).read_bytes()
    with pytest.raises(BundleError, match=f"location {manifest.locations[3].name}: sha256"):
        models[3]


def test_a_bad_head_fails_the_load_naming_it(shared: Path) -> None:
    manifest = read_manifest(shared)
    target = shared / manifest.locations[2].file
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match=f"location {manifest.locations[2].name}: sha256"):
        Predictor(shared, threads=1)


def test_cpu_sessions_share_one_activation_arena(pair: tuple[Path, Path]) -> None:
    from tilead.runtime.backends.onnxruntime import OnnxRuntimeBackend

    first, second = (Predictor(bundle, threads=1) for bundle in pair)
    with first, second:
        for predictor in (first, second):
            backend = predictor._backend
            assert isinstance(backend, OnnxRuntimeBackend)
            sessions = [*(backend._sessions or []), *([backend._backbone] if backend._backbone is not None else [])]
            entries = {s.get_session_options().get_session_config_entry("session.use_env_allocators") for s in sessions}
            assert entries == {"1"}
        # Sessions of two Predictors on one arena still give each bundle its own results.
        images = _images(3, seed=4)
        a = [p.anomaly_map for p in first.predict(images)]  # type: ignore[union-attr]
        b = [p.anomaly_map for p in second.predict(images)]  # type: ignore[union-attr]
        np.testing.assert_allclose(np.stack(a), np.stack(b), rtol=0, atol=1e-5)


def test_returning_the_freed_heap_keeps_the_sessions_working() -> None:
    import sys

    from tilead.runtime.backends.onnxruntime import _malloc_trim, return_freed_heap

    assert (_malloc_trim() is not None) == sys.platform.startswith("linux")
    return_freed_heap()
    return_freed_heap()


# -- the opt-in bf16 backbone (OpenVINO) ---------------------------------------------------------------------


def _openvino_cpu_has_bf16() -> bool:
    import openvino as ov

    from tilead.runtime.backends.openvino import has_bf16_units

    return has_bf16_units([str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")])


def test_has_bf16_units_reads_the_plugin_capabilities() -> None:
    from tilead.runtime.backends.openvino import has_bf16_units

    assert has_bf16_units(["FP32", "BF16", "INT8"])
    assert not has_bf16_units(["FP32", "INT8", "FP16"])
    assert not has_bf16_units([])


def test_bf16_backbone_on_openvino_compiles_the_backbone_alone_in_bf16(pair: tuple[Path, Path]) -> None:
    """On a CPU with bf16 units: backbone bf16, heads f32, maps within bf16 rounding; elsewhere a RuntimeError."""
    images = _images(3)
    if not _openvino_cpu_has_bf16():
        with pytest.raises(RuntimeError, match=r"bf16_backbone=True needs a CPU with bfloat16 units"):
            Predictor(pair[1], backend="openvino", bf16_backbone=True)
        return
    with (
        Predictor(pair[1], backend="openvino", threads=2) as f32,
        Predictor(pair[1], backend="openvino", threads=2, bf16_backbone=True) as bf16,
    ):
        assert bf16.bf16_backbone
        assert bf16.providers[0].endswith("CPU, backbone bf16")
        assert f32.providers[0].endswith("CPU")
        backend: Any = bf16._backend
        hint = "INFERENCE_PRECISION_HINT"
        assert backend._backbone.compiled.get_property(hint).get_type_name() == "bf16"
        assert {loc.compiled.get_property(hint).get_type_name() for loc in backend._locations} == {"f32"}
        want, got = f32.location_maps(images), bf16.location_maps(images)
    # bf16 keeps 8 significant bits: about 0.4 % per value.
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)


def test_bf16_backbone_is_refused_where_it_cannot_run(pair: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"backend='onnxruntime' cannot run the backbone in bfloat16; use 'openvino'"):
        Predictor(pair[1], backend="onnxruntime", bf16_backbone=True)
    with pytest.raises(ValueError, match=r"layout 'per_location'.*needs a shared_backbone bundle"):
        Predictor(pair[0], backend="openvino", bf16_backbone=True)
    with pytest.raises(ValueError, match=r"bf16_backbone: expected True or False, got"):
        Predictor(pair[1], backend="openvino", bf16_backbone="yes")  # type: ignore[arg-type]


def test_openvino_refuses_an_int8_bundle_saying_what_to_use(shared: Path) -> None:
    """OpenVINO's int8 kernels miss the INT8 heads' quality bounds on bottle (docs/cpu_speed.md): refused at load."""
    _rewrite(shared, _set("model.precision", "int8"))
    with pytest.raises(ValueError, match=r"backend='openvino' does not run INT8 bundles.*use backend='onnxruntime'"):
        Predictor(shared, backend="openvino", threads=1)
    with Predictor(shared, backend="onnxruntime", threads=1) as predictor:  # the same bundle on ONNX Runtime
        assert predictor.manifest.model["precision"] == "int8"
        assert predictor.location_maps(_images(1)).shape[0] == 4
