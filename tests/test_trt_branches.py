"""The native TensorRT backend on shared models and the thumbnail branch (issue #20), through the CPU stand-in.

Fast: the bundles are tests/bundle_factory.py's ONNX graphs (a thumbnail
model beside them, or models shared by several locations), the "engines" are
those graphs run by ONNX Runtime and the device pipeline is the stand-in's
CPU twins (tests/fake_tensorrt.py). Checked here: the engine set lists one
engine per model plus the thumbnail's; every location gets a context of its
own model's engine, bound to its own tile block; the thumbnail engine reads
the pipeline's resized, preprocessed images and its maps are fused after the
crop; the results equal ONNX Runtime's on the CPU (maps, masks, scores,
per-location and thumbnail maps), with and without CUDA graphs. The CUDA
twins of the new stages run in the GPU checks (``tilead doctor``), never here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fake_tensorrt
import numpy as np
import pytest
import reference
from bundle_factory import make_bundle
from test_assignment import make_shared_model_bundle
from test_thumbnail import SIZE, THUMB_MAP, images, make_thumbnail_bundle, reference_fused

from tilead import _kernels
from tilead.runtime import BundleError, Predictor
from tilead.runtime.backends import tensorrt as backend
from tilead.runtime.bundle import read_manifest, sha256_file, write_manifest
from tilead.runtime.engines import THUMBNAIL_ENGINE, EngineFile, EngineSet


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt.install(monkeypatch)


def _inner(predictor: Predictor) -> backend.TensorRTBackend:
    inner = predictor._backend
    assert isinstance(inner, backend.TensorRTBackend)
    return inner


# -- the thumbnail branch ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fusion", "weight"), [("max", None), ("weighted", 0.3)])
def test_a_thumbnail_bundle_runs_on_tensorrt_as_on_onnxruntime(
    standin: None, tmp_path: Path, fusion: str, weight: float | None
) -> None:
    root = make_thumbnail_bundle(tmp_path / "b", fusion, weight)
    fake_tensorrt.add_engine_copies(root, (1, 4, 4))
    engine_set = read_manifest(root).engine_sets[0]
    assert [f.name for f in engine_set.files] == ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert engine_set.thumbnail is not None
    assert engine_set.thumbnail.file == f"engines/{engine_set.key}/{THUMBNAIL_ENGINE}.engine"
    batch = list(images(3))
    with Predictor(root, max_batch=4) as cpu:
        want = cpu.predict(batch)
        want_maps, _, want_small = cpu.branch_outputs(batch)
    with Predictor(root, device="cuda", backend="tensorrt", max_batch=4) as trt:
        inner = _inner(trt)
        assert inner.has_thumbnail
        first = trt.predict(batch)  # stage by stage, then captured
        again = trt.predict(batch)  # the captured graph replayed
        assert inner.pipeline.launches == 1
        got_maps, scores, got_small = trt.branch_outputs(batch)
        rgb = trt.predict([np.ascontiguousarray(im[..., ::-1]) for im in batch], input_order="RGB")
        _, times = trt.predict_timed(batch[:2])
        calls = list(inner._calls)
        pipeline = inner.pipeline
    assert scores is None
    assert got_small is not None
    assert want_small is not None
    assert got_small.shape == (3, *THUMB_MAP)
    np.testing.assert_allclose(got_small, want_small, atol=1e-5)
    np.testing.assert_allclose(got_maps, want_maps, atol=1e-5)
    for got in (first, again, rgb):
        fake_tensorrt.assert_same_predictions(got, want)
    # And the float64 oracle's (tests/reference.py): the fused map, normalized with the bundle's statistics.
    assert isinstance(first, list)
    fused = reference_fused(np.stack(batch), fusion, weight, swap_rb=True)
    norm, _, raw, _ = reference.normalize(fused, 1.0, 1.5, (-2.5, 3.0), (-2.5, 3.0))
    np.testing.assert_allclose(np.stack([p.anomaly_map for p in first]), norm, atol=1e-5)
    np.testing.assert_allclose([p.raw_score for p in first], raw, atol=1e-5)
    # Stages in pipeline order: the thumbnail input after the tiles, its engine after the locations' engines, the
    # fusion between crop and normalize; one context per location and one for the thumbnail.
    assert {"thumbnail", "fuse", "location:thumbnail"} <= set(times.seconds)
    order = [c for c in pipeline.calls if c in ("tile", "thumbnail", "engine", "crop", "fuse", "normalize")]
    assert order[:8] == ["tile", "thumbnail", "engine", "engine", "engine", "engine", "engine", "crop"]
    assert order[8:10] == ["fuse", "normalize"]
    assert [c.stage for c in calls] == [f"location:{n}" for n in ("r0c0", "r0c1", "r1c0", "r1c1")] + [
        "location:thumbnail"
    ]
    thumb = calls[-1].context
    assert thumb.addresses == {
        "tiles": pipeline.thumbnail_input_address(2),
        "map": pipeline.thumbnail_map_address(2),
    }
    assert thumb.shape == (2, 3, SIZE, SIZE)
    assert {c.context.memory for c in calls} == {(pipeline.bases["context"], inner._context_bytes)}


def test_an_engine_set_and_a_manifest_that_disagree_on_the_thumbnail_are_refused(tmp_path: Path) -> None:
    """A set built before the thumbnail was added (or for another bundle) is refused when the manifest is read."""
    root = make_bundle(tmp_path / "b")
    fake_tensorrt.add_engine_copies(root)
    data = json.loads((root / "manifest.json").read_text())
    thumbnailed = make_thumbnail_bundle(tmp_path / "t")
    data["thumbnail"] = json.loads((thumbnailed / "manifest.json").read_text())["thumbnail"]
    (root / "thumbnail.onnx").write_bytes((thumbnailed / "thumbnail.onnx").read_bytes())
    write_manifest(root, data)
    with pytest.raises(BundleError, match=r"engines\[0\]\.thumbnail: the bundle has a thumbnail branch"):
        read_manifest(root)


def test_the_thumbnail_engine_is_checked_against_the_thumbnail_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = make_thumbnail_bundle(tmp_path / "b")
    fake_tensorrt.add_engine_copies(root, (1, 4, 4))

    def shrink(engine: fake_tensorrt.FakeEngine) -> None:
        if engine.shapes["tiles"][2] == SIZE:  # the thumbnail model's input only
            engine.shapes["tiles"] = (-1, 3, SIZE // 2, SIZE // 2)

    fake_tensorrt.install(monkeypatch, edit=shrink)
    with pytest.raises(
        BundleError,
        match=rf"thumbnail\.engine: tensor 'tiles' has shape \(-1, 3, 16, 16\), expected \(batch, 3, {SIZE}",
    ):
        Predictor(root, device="cuda", backend="tensorrt", max_batch=4)


# -- shared models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [(0, 1, 1, 0), (0, 0, 1, 1), (0, 0, 0, 0)])
def test_shared_models_run_on_tensorrt_as_on_onnxruntime(standin: None, tmp_path: Path, table: tuple[int, ...]) -> None:
    mode = "all_to_one" if max(table) == 0 else "cluster"
    root = make_shared_model_bundle(tmp_path / "b", table, mode)
    fake_tensorrt.add_engine_copies(root, (1, 4, 4))
    models = [f"m{i}" for i in range(max(table) + 1)]
    engine_set = read_manifest(root).engine_sets[0]
    assert [f.name for f in engine_set.files] == models  # one engine per model, not per location
    assert sorted(p.name for p in (root / "engines" / engine_set.key).iterdir()) == [f"{m}.engine" for m in models]
    batch = list(np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    with Predictor(root, max_batch=4) as cpu:
        want = cpu.predict(batch)
        want_maps = cpu.location_maps(batch)
    with Predictor(root, device="cuda", backend="tensorrt", max_batch=4) as trt:
        inner = _inner(trt)
        got = trt.predict(batch)
        replayed = trt.predict(batch)
        got_maps = trt.location_maps(batch)
        one = trt.location_maps(batch[:1])
        engines = list(inner._engines)
        calls = list(inner._calls)
        pipeline = inner.pipeline
    assert len(engines) == len(models)
    np.testing.assert_allclose(got_maps, want_maps, atol=1e-5)
    np.testing.assert_allclose(one, want_maps[:, :1], atol=1e-5)
    fake_tensorrt.assert_same_predictions(got, want)
    fake_tensorrt.assert_same_predictions(replayed, want)
    # Location i's context comes from its model's engine and reads location i's own tile block.
    for index, call in enumerate(calls):
        assert call.context.engine is engines[table[index]]
        assert call.context.addresses["tiles"] == pipeline.tiles_address(index, 1)
        assert call.context.addresses["map"] == pipeline.maps_address(index, 1)


def test_a_shared_model_engine_set_needs_one_engine_per_model(tmp_path: Path) -> None:
    root = make_shared_model_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    per_location = [
        EngineFile(name, f"engines/k/{name}.engine", "0" * 64, 1) for name in ("r0c0", "r0c1", "r1c0", "r1c1")
    ]
    data["engines"] = [
        EngineSet(
            "k", "Fake GPU", "9.0", "11.4.0.106", "fp32", (1, 4, 4), 256, True, None, tuple(per_location)
        ).to_dict()
    ]
    write_manifest(root, data)
    with pytest.raises(BundleError, match=r"engines\[0\]\.files: expected one engine per model \['m0', 'm1'\]"):
        read_manifest(root)


def test_a_shared_backbone_bundle_is_still_refused(tmp_path: Path) -> None:
    from bundle_factory import make_shared_bundle

    from tilead.runtime.backends.tensorrt_modules import require_per_location

    root = make_shared_bundle(tmp_path / "s")
    with pytest.raises(BundleError, match=r"'shared_backbone' layout.*--layout per_location"):
        require_per_location(root, read_manifest(root))


# -- the selfcheck's thumbnail group, run on the stand-in ---------------------------------------------------


def test_the_gpu_thumbnail_checks_pass_on_the_cpu_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor's device thumbnail checks, with the stand-in's pipeline: they pass on correct twins ..."""
    import types

    from tilead import selfcheck

    cuda = types.SimpleNamespace(DevicePipeline=fake_tensorrt.FakePipeline)
    monkeypatch.setattr(selfcheck, "_kernels", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(selfcheck, "_read_device", lambda address, count: fake_tensorrt._view(address, count).copy())
    checks = selfcheck._thumbnail_checks(np.random.default_rng(0))
    assert len(checks) == 4 * len(selfcheck.GRIDS)
    assert all(c.status == "pass" for c in checks), [(c.name, c.detail) for c in checks]
    # ... and fail when the device fusion is wrong (here: the weights of a weighted sum swapped).
    real_fuse = _kernels.fuse_thumbnail

    def swapped(thumbnail: np.ndarray, maps: np.ndarray, spec: Any) -> None:
        if spec.weighted:
            spec = _kernels.FuseSpec(spec.tiled_threshold, spec.tiled_scale, spec.thumb_threshold, spec.thumb_scale,
                                     True, 1.0 - spec.weight)  # fmt: skip
        real_fuse(thumbnail, maps, spec)

    monkeypatch.setattr(_kernels, "fuse_thumbnail", swapped)  # the module the stand-in calls it from
    checks = selfcheck._thumbnail_checks(np.random.default_rng(0))
    failed = {c.name for c in checks if c.status == "fail"}
    assert failed == {f"device thumbnail fusion ({edge} grid, weighted)" for edge in selfcheck.GRIDS}


def test_sha256_of_the_engines_is_checked(standin: None, tmp_path: Path) -> None:
    """The thumbnail engine is read like the others: a modified file is refused before TensorRT sees it."""
    root = make_thumbnail_bundle(tmp_path / "b")
    fake_tensorrt.add_engine_copies(root, (1, 4, 4))
    small = read_manifest(root).engine_sets[0].thumbnail
    assert small is not None
    path = root / small.file
    path.write_bytes(path.read_bytes() + b"x")
    assert sha256_file(path) != small.sha256
    with pytest.raises(BundleError, match="thumbnail"):
        Predictor(root, device="cuda", backend="tensorrt", max_batch=4)


def test_oriented_locations_are_refused_clearly(tmp_path: Path) -> None:
    """Oriented clusters flip or rotate tiles before their model: the device kernels do not, so it is refused."""
    from tilead.runtime.backends.tensorrt_modules import require_per_location

    root = make_shared_model_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    for i, entry in enumerate(data["locations"]):  # every location of an oriented bundle has one
        entry["transform"] = 2 if i == 1 else 0  # r0c1: a half turn
    write_manifest(root, data)
    manifest = read_manifest(root)
    assert manifest.transform(1) == 2
    with pytest.raises(BundleError, match=r"orients the tiles of 1 locations \(r0c1\).*backend='onnxruntime'"):
        require_per_location(root, manifest)
    with pytest.raises(BundleError, match="orients the tiles"):
        Predictor(root, device="cuda", backend="tensorrt", max_batch=4)
