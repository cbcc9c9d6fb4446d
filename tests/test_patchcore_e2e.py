"""PatchCore end to end on tiny synthetic data: train, resume, export, Predictor vs eager PyTorch.

Two bundles of one fitted run: the map's max as image score (``postprocess.image_score: max``), and the
paper's reweighted score deployed (``detector``: re-validated with ``--resume``, no refit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tilead.runtime.backends.tensorrt_modules import TensorRTUnavailableError
from tilead.trainer.detectors.patchcore.model import PatchCoreLocationModel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def patchcore_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(run folder, bundle, config)`` of a 2x2 PatchCore ensemble on 160x160 synthetic images."""
    import yaml

    from tilead.demo.synthetic import SyntheticSpec, generate
    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    tmp = tmp_path_factory.mktemp("patchcore")
    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=6, test_good=2, test_per_defect=1, seed=3))
    cfg = {
        "name": "tiny_patchcore",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"family": "patchcore", "coreset_ratio": 0.1, "blur_sigma": 1.0},
        "postprocess": {"weights": "feather"},
        "validation": {"force": True},  # fewer test images than validation.min_images
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), tmp / "run", progress=False)
    bundle = export_bundle(result.paths.root, tmp / "bundle", progress=False).bundle
    return result.paths.root, bundle, path


@pytest.fixture(scope="module")
def detector_score_run(
    patchcore_run: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """``(run folder, bundle)``: the same fitted run re-validated with ``postprocess.image_score: detector``."""
    import shutil

    from tilead.exporter.bundle import export_bundle
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    run, _, config = patchcore_run
    tmp = tmp_path_factory.mktemp("patchcore_detector_score")
    shutil.copytree(run, tmp / "run")
    cfg = load_config(config, {"postprocess.image_score": "detector"})
    result = train(cfg, tmp / "run", resume=True, progress=False)
    assert result.fitted_now == 0  # the image score is post-processing: nothing is refitted
    bundle = export_bundle(result.paths.root, tmp / "bundle", progress=False).bundle
    return result.paths.root, bundle


def _test_images(run: Path) -> tuple[Any, np.ndarray]:
    from tilead.trainer.data import discover
    from tilead.trainer.eager import load_eager_ensemble
    from tilead.trainer.images import ImageLoader

    eager = load_eager_ensemble(run)
    loader = ImageLoader(eager.cfg.data)
    return eager, np.stack([loader.load_image(s) for s in discover(eager.cfg.data).test])


@pytest.mark.parametrize("image_score", ["max", "detector"])
def test_bundle_matches_the_eager_ensemble(
    patchcore_run: tuple[Path, Path, Path], detector_score_run: tuple[Path, Path], image_score: str
) -> None:
    from tilead.runtime import Predictor, read_manifest

    run, bundle = patchcore_run[:2] if image_score == "max" else detector_score_run
    manifest = read_manifest(bundle)
    assert manifest.model["family"] == "patchcore"
    assert manifest.model["detector"]["bank_dtype"] == "float16"
    assert manifest.image_score == image_score
    eager, images = _test_images(run)
    _, ref = eager.predict(images)
    with Predictor(bundle) as predictor:
        got = predictor.predict(images, input_order=eager.cfg.data.channel_order)
    assert isinstance(got, list)
    maps = np.stack([p.anomaly_map for p in got])
    assert np.abs(maps - ref.maps).max() < 1e-4
    np.testing.assert_array_equal([p.label for p in got], ref.labels)
    np.testing.assert_allclose([p.score for p in got], ref.scores, atol=1e-4)
    np.testing.assert_allclose([p.raw_score for p in got], ref.raw_scores, rtol=1e-4)


def test_the_deployed_detector_score_is_the_reweighted_score(
    patchcore_run: tuple[Path, Path, Path], detector_score_run: tuple[Path, Path]
) -> None:
    """Predictor raw scores = max over tiles of PatchCore's reweighted score, not the map's max; ONNX has 2 outputs."""
    import onnx
    import torch

    from tilead.runtime import Predictor
    from tilead.trainer.tiles import _location_tiles, _to_torch

    run, bundle = detector_score_run
    eager, images = _test_images(run)
    tiles = _location_tiles(images, eager.grid, eager.prep, eager.cfg.data.channel_order)
    with torch.inference_mode():
        own = np.stack([m.forward_with_score(_to_torch(tiles[i]))[1].numpy() for i, m in enumerate(eager.models)])
    with Predictor(bundle) as predictor:
        got = predictor.predict(images, input_order=eager.cfg.data.channel_order)
        _, scores = predictor.location_outputs(images, input_order=eager.cfg.data.channel_order)
    assert isinstance(got, list)
    assert scores is not None
    assert scores.shape == own.shape
    np.testing.assert_allclose(scores, own, rtol=1e-4)
    raw = np.array([p.raw_score for p in got])
    np.testing.assert_allclose(raw, own.max(axis=0), rtol=1e-4)
    map_max = np.array([p.anomaly_map.max() for p in got])
    assert not np.allclose(raw, map_max)
    # Graph outputs: map + score with the reweighting; map only (and no neighbour table, fewer bytes) without it.
    with_score = onnx.load(str(bundle / "tiles" / "r0c0.onnx"))
    map_only = onnx.load(str(patchcore_run[1] / "tiles" / "r0c0.onnx"))
    assert [o.name for o in with_score.graph.output] == ["map", "score"]
    assert [o.name for o in map_only.graph.output] == ["map"]
    assert (bundle / "tiles" / "r0c0.onnx").stat().st_size > (patchcore_run[1] / "tiles" / "r0c0.onnx").stat().st_size
    with Predictor(patchcore_run[1]) as predictor:
        assert predictor.location_outputs(images, input_order=eager.cfg.data.channel_order)[1] is None
    # The native TensorRT backend takes this bundle too (#18.8); without a GPU what stops it is the GPU.
    with pytest.raises(TensorRTUnavailableError):
        Predictor(bundle, device="cuda", backend="tensorrt")


def test_resume_skips_fitted_locations(patchcore_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    run, _, config = patchcore_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "locations" / "r1c1.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in (copy / "locations").iterdir()}
    result = train(load_config(config), copy, resume=True, progress=False)
    assert result.fitted_now == 1
    for name, blob in before.items():
        assert (copy / "locations" / name).read_bytes() == blob  # untouched
    # Fitting is deterministic: the refitted location's tensors equal the original ones (metadata holds timings).
    from tilead.trainer.io import load_tensors

    new, _ = load_tensors(copy / "locations" / "r1c1.safetensors")
    old, _ = load_tensors(run / "locations" / "r1c1.safetensors")
    assert new.keys() == old.keys()
    for key, value in old.items():
        assert (new[key] == value).all()


def _max_distance(model: Any, tiles: Any) -> np.ndarray:
    """``s*`` per tile: the largest nearest-neighbour distance, before any blur."""
    assert isinstance(model, PatchCoreLocationModel)
    dist, _ = model.head.nearest(model.head.patches(model.embedding(tiles)))
    return dist.amax(dim=1).numpy()


def test_eager_evaluation_reports_the_reweighted_image_score(patchcore_run: tuple[Path, Path, Path]) -> None:
    """Eager eval scores each image by PatchCore's reweighted score (max over tiles) next to the map's max."""
    import torch

    from tilead.trainer.data import discover
    from tilead.trainer.eager import load_eager_ensemble
    from tilead.trainer.evaluation import evaluate
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.metrics import auroc
    from tilead.trainer.tiles import _location_tiles, _to_torch

    run, bundle, _ = patchcore_run
    eager = load_eager_ensemble(run)
    samples = list(discover(eager.cfg.data).test)
    loader = ImageLoader(eager.cfg.data)
    images = np.stack([loader.load_image(s) for s in samples])
    tiles = _location_tiles(images, eager.grid, eager.prep, eager.cfg.data.channel_order)
    with torch.inference_mode():
        per_tile = np.stack([m.forward_with_score(_to_torch(tiles[i]))[1].numpy() for i, m in enumerate(eager.models)])
        s_star = np.stack([_max_distance(m, _to_torch(tiles[i])) for i, m in enumerate(eager.models)])
    assert ((per_tile > 0) & (per_tile < s_star)).all()  # the weight lies in (0, 1): it shrinks the max distance
    labels = np.array([s.label for s in samples], dtype=bool)
    metrics = evaluate(run, run / "eval_scores", progress=False).metrics["metrics"]
    assert metrics["image_auroc_detector_score"] == pytest.approx(auroc(per_tile.max(axis=0), labels), abs=1e-6)
    bundle_metrics = evaluate(run, run / "eval_bundle_scores", bundle=bundle, progress=False).metrics["metrics"]
    assert "image_auroc_detector_score" not in bundle_metrics  # the exported graph has the map only


def test_evaluation_with_the_deployed_detector_score(
    patchcore_run: tuple[Path, Path, Path], detector_score_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Eager and bundle evaluation agree; image AUROC is the reweighted score's, the map max's is kept beside it."""
    from tilead.trainer.evaluation import evaluate

    run, bundle = detector_score_run
    plain = evaluate(patchcore_run[0], tmp_path / "plain", progress=False).metrics
    eager = evaluate(run, tmp_path / "eager", progress=False).metrics
    via_bundle = evaluate(run, tmp_path / "bundle", bundle=bundle, progress=False).metrics
    assert eager["image_score"] == via_bundle["image_score"] == "detector"
    m, b = eager["metrics"], via_bundle["metrics"]
    assert m["image_auroc"] == pytest.approx(plain["metrics"]["image_auroc_detector_score"], abs=1e-6)
    assert m["image_auroc_map_max"] == pytest.approx(plain["metrics"]["image_auroc"], abs=1e-6)
    for key in ("image_auroc", "image_auroc_map_max", "pixel_auroc", "aupro", "image_f1"):
        assert b[key] == pytest.approx(m[key], abs=1e-3), key
    # A bundle of the other image score is refused: its statistics would not fit.
    with pytest.raises(ValueError, match="its image score is 'max'"):
        evaluate(run, tmp_path / "mismatch", bundle=patchcore_run[1], progress=False)
