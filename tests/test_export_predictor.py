"""Export a tiny trained run to a bundle and run it with ``runtime.Predictor``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tilead.runtime import BundleError, Prediction, Predictor
from tilead.runtime.bundle import manifest_digest, write_manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tiny_trained: tuple[Path, Path]) -> tuple[Path, Path]:
    """(run folder, bundle) of a 2x2 ensemble on 160x160 synthetic images (``conftest.train_tiny``)."""
    return tiny_trained


def _test_images(run: Path) -> tuple[list[Any], np.ndarray]:
    from tilead.trainer.data import discover
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.run import Run

    cfg = Run.open(run).config
    samples = list(discover(cfg.data).test)
    loader = ImageLoader(cfg.data)
    return samples, np.stack([loader.load_image(s) for s in samples])


def test_bundle_layout_and_manifest(trained: tuple[Path, Path]) -> None:
    import onnx

    _, bundle = trained
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    assert [loc["name"] for loc in manifest["locations"]] == ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert manifest["model"]["map_size"] == [12, 12]
    assert manifest["model"]["opset"] >= 17
    model = onnx.load(str(bundle / "tiles" / "r0c0.onnx"))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # dynamic batch dimension
    assert not list(bundle.parent.glob(".bundle.*"))  # no temporary directory left
    assert max(manifest["source"]["parity_onnxruntime_vs_torch"].values()) < 1e-5


def _random_padim_state(seed: int, positions: int, d: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(positions, d, d, generator=g, dtype=torch.float64)
    inv = torch.linalg.inv(a @ a.transpose(1, 2) + torch.eye(d, dtype=torch.float64))
    return {
        "mean": torch.randn(positions, d, generator=g),
        "inv_cov": ((inv + inv.transpose(1, 2)) / 2).half(),
        "channel_index": torch.arange(d),
    }


def test_a_reused_graph_is_byte_identical_to_a_fresh_export(tmp_path: Path) -> None:
    import torch

    from tilead.exporter.onnx_export import export_like, export_location
    from tilead.trainer.backbones import build_backbone
    from tilead.trainer.detectors.padim.detector import HEAD_BLOCKS
    from tilead.trainer.detectors.padim.model import PadimSettings, build_location_model

    def models(backbone: Any) -> list[Any]:
        # Tensors large enough to stay named initializers (the exporter inlines tiny ones as constants).
        settings = PadimSettings(feature_stride=8, n_features=64, blur_sigma=1.0)
        states = [_random_padim_state(i, 16 * 16, 64) for i in range(2)]
        return [build_location_model(backbone, t, (128, 128), settings, head_blocks=HEAD_BLOCKS) for t in states]

    layers = ("blocks.1", "blocks.2", "blocks.3")
    first, second = models(build_backbone("efficientnet_lite0", layers))
    export_location(first, (3, 128, 128), tmp_path / "r0c0.onnx")
    export_location(second, (3, 128, 128), tmp_path / "fresh.onnx")
    assert export_like(tmp_path / "r0c0.onnx", first, second, tmp_path / "reused.onnx")
    assert (tmp_path / "reused.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
    # A weight the exporter transforms (the stem convolution absorbs its batch norm) is never swapped.
    other = build_backbone("efficientnet_lite0", layers)
    with torch.no_grad():
        other.get_parameter("graph.conv_stem.weight").mul_(2.0)
    _, changed = models(other)
    assert not export_like(tmp_path / "r0c0.onnx", first, changed, tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()


def test_predictor_matches_the_trainers_pytorch_pipeline(trained: tuple[Path, Path]) -> None:
    """Bundle predictions vs the eager PyTorch forward + the same post-processing: 1e-4, identical labels."""
    from tilead.runtime.postprocessor import postprocess_maps
    from tilead.trainer.checkpoints import load_location_models
    from tilead.trainer.components import make_backbone, make_preprocessing
    from tilead.trainer.config import load_config
    from tilead.trainer.inference import location_maps
    from tilead.trainer.run_dir import RunPaths, load_stats

    run, bundle = trained
    paths = RunPaths(run)
    cfg = load_config(paths.config)
    samples, images = _test_images(run)
    grid = cfg.grid.build((160, 160))
    extractor = make_backbone(cfg)
    models = load_location_models(cfg, paths, grid, extractor)
    maps, _, _ = location_maps(cfg, models, samples, grid, make_preprocessing(cfg, extractor), batch_size=4)
    _, eager = postprocess_maps(maps, grid, load_stats(paths), weights="feather", seam=cfg.postprocess.seam_smoothing())
    with Predictor(bundle) as predictor:
        results = predictor.predict(list(images))
    assert isinstance(results, list)
    assert len(results) == len(samples)
    got = np.stack([r.anomaly_map for r in results])
    assert np.abs(got - eager.maps).max() <= 1e-4
    assert [r.label for r in results] == eager.labels.tolist()
    differ = np.stack([r.mask for r in results]) != eager.masks
    assert not differ.any() or float(np.abs(got[differ] - 0.5).max()) <= 1e-4  # only ties at the threshold


def test_single_batch_and_list_inputs_agree(trained: tuple[Path, Path]) -> None:
    run, bundle = trained
    _, images = _test_images(run)
    with Predictor(bundle, max_batch=2) as predictor:
        one = predictor.predict(images[0])
        batch = predictor.predict(images[:3])
        rgb = predictor.predict(np.ascontiguousarray(images[0][:, :, ::-1]), input_order="RGB")
    assert isinstance(one, Prediction)
    assert isinstance(batch, list)
    assert isinstance(rgb, Prediction)
    assert one.anomaly_map.shape == (160, 160)
    assert one.mask.dtype == np.bool_
    # The same image alone and in a batch of 2 (ONNX Runtime may block a batch differently: float noise only).
    np.testing.assert_allclose(one.anomaly_map, batch[0].anomaly_map, atol=1e-6)
    assert one.score == pytest.approx(batch[0].score, abs=1e-6)
    # RGB input with input_order="RGB" is the same image as BGR input.
    np.testing.assert_array_equal(one.anomaly_map, rgb.anomaly_map)


def test_concurrent_predict_equals_serial(trained: tuple[Path, Path]) -> None:
    run, bundle = trained
    _, images = _test_images(run)
    with Predictor(bundle) as predictor:
        serial = [predictor.predict(img) for img in images]
        results: dict[int, Any] = {}

        def work(i: int) -> None:
            results[i] = predictor.predict(images[i % len(images)])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, res in results.items():
        ref = serial[i % len(images)]
        assert isinstance(res, Prediction)
        assert isinstance(ref, Prediction)
        np.testing.assert_array_equal(res.anomaly_map, ref.anomaly_map)
        assert res.score == ref.score
        assert res.label == ref.label


def test_location_workers_and_threads_do_not_change_results(trained: tuple[Path, Path]) -> None:
    run, bundle = trained
    _, images = _test_images(run)
    outputs = []
    for workers, threads in ((1, 1), (2, 2), (4, 4)):
        with Predictor(bundle, location_workers=workers, threads=threads) as predictor:
            assert predictor.location_workers == workers
            results = predictor.predict(images[:2])
            assert isinstance(results, list)
            outputs.append(np.stack([r.anomaly_map for r in results]))
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], atol=1e-6)
    for bad in ({"threads": 0}, {"location_workers": -1}, {"location_workers": 1.5}, {"max_batch": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: expected a positive integer"):
            Predictor(bundle, **bad)


def test_predict_timed_reports_every_stage(trained: tuple[Path, Path]) -> None:
    import time

    run, bundle = trained
    _, images = _test_images(run)
    with Predictor(bundle, max_batch=2) as predictor:
        reference = predictor.predict(images[:3])
        start = time.perf_counter()
        results, times = predictor.predict_timed(images[:3])
        wall = time.perf_counter() - start
    assert isinstance(reference, list)
    for got, ref in zip(results, reference, strict=True):
        np.testing.assert_array_equal(got.anomaly_map, ref.anomaly_map)
    stages = times.seconds
    # On the CPU with the canvas equal to the image, "untile" is the fused pass (untile, seams, normalization).
    fused = predictor.manifest.grid.canvas_size == predictor.image_size
    host = ("input", "tile", "inference", "untile", "normalize") + (() if fused else ("seam", "crop"))
    assert set(stages) == set(host) | {f"location:r{r}c{c}" for r in (0, 1) for c in (0, 1)}
    assert all(v > 0 for v in stages.values())
    pipeline = sum(stages[k] for k in host)
    assert pipeline <= wall
    # Two chunks (max_batch=2): every location ran twice, within the inference wall time of both chunks.
    assert max(stages[f"location:r{r}c{c}"] for r in (0, 1) for c in (0, 1)) <= stages["inference"]


def test_bad_images(trained: tuple[Path, Path]) -> None:
    run, bundle = trained
    _, images = _test_images(run)
    with Predictor(bundle) as predictor:
        with pytest.raises(ValueError, match=r"expected image size 160x160 .* got 100x120; pass resize=True"):
            predictor.predict(np.zeros((100, 120, 3), np.uint8))
        resized = predictor.predict(np.zeros((100, 120, 3), np.uint8), resize=True)
        assert isinstance(resized, Prediction)
        assert resized.anomaly_map.shape == resized.mask.shape == (100, 120)  # at the input's size
        at_bundle = predictor.predict(np.zeros((100, 120, 3), np.uint8), resize=True, map_size="bundle")
        assert isinstance(at_bundle, Prediction)
        assert at_bundle.mask.shape == (160, 160)
        with pytest.raises(ValueError, match="expected dtype uint8, got float32"):
            predictor.predict(images[0].astype(np.float32))
        with pytest.raises(ValueError, match=r"got shape \(160, 160, 4\)"):
            predictor.predict(np.zeros((160, 160, 4), np.uint8))
        with pytest.raises(ValueError, match="the list is empty"):
            predictor.predict([])
        with pytest.raises(ValueError, match="expected a numpy array"):
            predictor.predict("image.png")
    with pytest.raises(RuntimeError, match="closed"):
        predictor.predict(images[0])


def _copy(bundle: Path, tmp: Path) -> Path:
    target = tmp / "copy"
    shutil.copytree(bundle, target)
    return target


def test_tampered_or_broken_bundles(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = trained
    with pytest.raises(BundleError, match="not a directory"):
        Predictor(tmp_path / "nothing")
    broken = _copy(bundle, tmp_path)
    data = (broken / "tiles" / "r0c1.onnx").read_bytes()
    (broken / "tiles" / "r0c1.onnx").write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=r"location r0c1: sha256 of .*r0c1.onnx is"):
        Predictor(broken)
    (broken / "tiles" / "r0c1.onnx").unlink()
    with pytest.raises(BundleError, match=r"location r0c1: model file .* is missing"):
        Predictor(broken)
    shutil.rmtree(broken)
    for patch, expected in [
        ({"schema_version": 99}, "unknown bundle schema_version 99"),
        ({"tilead_version": "999.0.0"}, "newer than this tilead"),
        ({"postprocess": {"weights": "gauss"}}, "postprocess.weights: expected 'uniform' or 'feather'"),
    ]:
        copy = _copy(bundle, tmp_path)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest.update(patch)
        write_manifest(copy, manifest)  # a valid digest: the values themselves are refused
        with pytest.raises(BundleError, match=expected):
            Predictor(copy)
        shutil.rmtree(copy)
    # By hand (no new digest): refused, pointing to tilead-calibrate.
    edited = _copy(bundle, tmp_path)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["normalization"]["image_threshold"] = manifest["normalization"]["image_range"][1]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"edited after it was written.*tilead-calibrate"):
        Predictor(edited)
    shutil.rmtree(edited)
    # A corrupt model whose hash was updated too: ONNX Runtime refuses it, the error names the file.
    from tilead.runtime.bundle import sha256_file

    garbled = _copy(bundle, tmp_path)
    model = garbled / "tiles" / "r1c0.onnx"
    model.write_bytes(b"not an onnx model" * 10)
    manifest = json.loads((garbled / "manifest.json").read_text())
    for loc in manifest["locations"]:
        if loc["name"] == "r1c0":
            loc["sha256"] = sha256_file(model)
            loc["bytes"] = model.stat().st_size
    write_manifest(garbled, manifest)
    with pytest.raises(BundleError, match=r"location r1c0: ONNX Runtime cannot load .*r1c0\.onnx"):
        Predictor(garbled)
    shutil.rmtree(garbled)
    corrupt = _copy(bundle, tmp_path)
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Predictor(corrupt)


def test_export_failure_leaves_no_bundle(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tilead.exporter import bundle as bundle_mod

    run, _ = trained
    monkeypatch.setattr(bundle_mod, "compare_with_eager", lambda *a, **k: 1.0)
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        bundle_mod.export_bundle(run, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError, match="--overwrite"):
        bundle_mod.export_bundle(run, tmp_path, progress=False)


def test_predictor_runs_without_torch(trained: tuple[Path, Path]) -> None:
    run, bundle = trained
    _, images = _test_images(run)
    np.save(bundle.parent / "image.npy", images[0])
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'timm', 'cv2'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from tilead.runtime import Predictor
with Predictor({str(bundle)!r}) as p:
    r = p.predict(np.load({str(bundle.parent / "image.npy")!r}))
print(round(r.score, 6), 'torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    score, torch_loaded = out.stdout.split()
    with Predictor(bundle) as predictor:
        ref = predictor.predict(images[0])
    assert isinstance(ref, Prediction)
    assert float(score) == pytest.approx(ref.score, abs=1e-6)
    assert torch_loaded == "False"


def test_eval_through_the_bundle_matches_eager_eval(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from tilead.trainer.evaluation import evaluate

    run, bundle = trained
    eager = evaluate(run, tmp_path / "eager", progress=False).metrics
    runtime = evaluate(run, tmp_path / "runtime", bundle=bundle, progress=False).metrics
    assert runtime["inference"].startswith("runtime.Predictor")
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"):
        assert runtime["metrics"][key] == pytest.approx(eager["metrics"][key], abs=1e-3)


def test_predict_cli_writes_results_and_overlays(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tilead.cli.predict import main as predict_main
    from tilead.trainer.run import Run

    run, bundle = trained
    cfg = Run.open(run).config
    folder = cfg.data.dataset_root / "test" / "good"
    res = CliRunner().invoke(predict_main, [str(bundle), str(folder), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(list(folder.glob("*.png")))
    assert all({"file", "score", "label", "ms"} <= set(r) for r in records)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == len(records)
    (tmp_path / "bad.png").write_bytes(b"broken")
    res = CliRunner().invoke(predict_main, [str(bundle), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 3  # recorded, not fatal: see tests/test_predict_cli.py
    (record,) = [json.loads(line) for line in (tmp_path / "o2" / "results.jsonl").read_text().splitlines()]
    assert "cannot decode" in record["error"]
