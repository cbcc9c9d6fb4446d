"""The non-finite rule (issue #16 item 1): NaN or infinity in a model's output never passes a part.

Fast tests run the shared post-processing (what the Predictor, the eager
ensemble and evaluation call) on maps with poisoned locations; the integration
test poisons one location's ONNX model of a real bundle (the issue's
reproduction: r1c1 set to NaN on a defective image) and runs the Predictor and
``tilead-predict`` on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import NormalizationStats, PostProcessor, Prediction, TileGrid, TileStats, postprocess_maps
from tilead.runtime.postprocess import SeamSmoothing
from tilead.trainer.validation import compute_stats

GRID = TileGrid((100, 120), (64, 64), (36, 56))  # 2x2 locations with overlaps


def _stats(stage: str) -> NormalizationStats:
    if stage == "none":
        return NormalizationStats(stage="none", pixel_threshold=2.0, image_threshold=2.5)
    if stage == "tile":
        n = GRID.num_locations
        return NormalizationStats(
            stage="tile",
            pixel_threshold=0.5,
            image_threshold=0.7,
            pixel_range=(0.0, 1.0),
            image_range=(0.2, 1.0),
            tile_stats=TileStats((2.0,) * n, (0.0,) * n, (4.0,) * n),
        )
    return NormalizationStats(
        stage="image", pixel_threshold=2.0, image_threshold=2.5, pixel_range=(0.0, 4.0), image_range=(1.0, 4.0)
    )


def _maps(n: int, seed: int = 0) -> np.ndarray:
    # Low values: every clean image is OK under every stage's statistics.
    return np.random.default_rng(seed).uniform(0.0, 1.0, (GRID.num_locations, n, 8, 8)).astype(np.float32)


@given(
    st.sampled_from(["image", "tile", "none"]),
    st.integers(0, GRID.num_locations - 1),
    st.integers(0, 2),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.booleans(),
)
def test_a_poisoned_location_makes_its_image_anomalous(
    stage: str, loc: int, image: int, value: float, whole_map: bool
) -> None:
    maps = _maps(3)
    if whole_map:
        maps[loc, image] = value
    else:
        maps[loc, image, 3, 5] = value
    stats = _stats(stage)
    _, result = postprocess_maps(maps, GRID, stats, weights="feather", seam=SeamSmoothing(2.0, 0.1))
    clean = [i for i in range(3) if i != image]
    name = GRID.location_names()[loc]
    assert bool(result.labels[image]) is True
    assert math.isnan(float(result.raw_scores[image]))
    assert float(result.scores[image]) == (math.inf if stage == "none" else 1.0)
    assert result.errors is not None
    assert f"location {name} (map)" in (result.error(image) or "")
    assert result.masks[image].any()  # the poisoned tile is marked where it is
    # The other images are untouched and OK.
    assert not result.labels[clean].any()
    assert np.isfinite(result.raw_scores[clean]).all()
    assert all(result.error(i) is None for i in clean)


def test_detector_scores_and_maps_are_both_checked() -> None:
    maps = _maps(2)
    tile_scores = np.full((GRID.num_locations, 2), 1.5, dtype=np.float32)
    tile_scores[2, 0] = np.nan
    stats = _stats("image")
    _, result = postprocess_maps(maps, GRID, stats, tile_scores=tile_scores)
    assert result.labels.tolist() == [True, False]
    assert result.error(0) == "non-finite model output (NaN or infinity) at location r1c0 (score)"
    # A finite detector score does not rescue a NaN map.
    maps[3, 1, 0, 0] = np.nan
    tile_scores[2, 0] = 1.5
    _, result = postprocess_maps(maps, GRID, stats, tile_scores=tile_scores)
    assert result.labels.tolist() == [False, True]
    assert math.isnan(float(result.raw_scores[1]))
    assert result.scores[1] == 1.0
    assert result.error(1) == "non-finite model output (NaN or infinity) at location r1c1 (map)"
    maps[0, 1, 0, 0] = np.inf
    tile_scores[0, 1] = -np.inf
    _, result = postprocess_maps(maps, GRID, stats, tile_scores=tile_scores)
    assert result.error(1) == "non-finite model output (NaN or infinity) at locations r0c0 (map and score), r1c1 (map)"


def test_prediction_carries_the_error_and_a_short_repr() -> None:
    big = np.zeros((900, 900), dtype=np.float32)
    p = Prediction(0.25, False, big, big > 0, 12.5)
    text = repr(p)
    assert len(text) < 200
    assert "900x900" in text
    assert "label=OK" in text
    assert p.finite
    bad = Prediction(1.0, True, big, big >= 0, math.nan, "non-finite model output (NaN or infinity) at location r1c1")
    assert not bad.finite
    assert "r1c1" in repr(bad)
    assert "label=NG" in repr(bad)
    assert "810000 anomalous" in repr(bad)


def test_validation_refuses_nonfinite_maps() -> None:
    maps = _maps(4)
    masks = np.zeros((4, *GRID.image_size), dtype=bool)
    labels = np.zeros(4, dtype=bool)
    kw = {"stage": "image", "good_quantile": 0.99}
    post = PostProcessor(GRID)
    stats, _ = compute_stats(maps, masks, labels, post, **kw)  # type: ignore[arg-type]
    assert math.isfinite(stats.image_threshold)
    maps[1, 2, 4, 4] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values .* location r0c1 for validation image 2 \(1 location"):
        compute_stats(maps, masks, labels, post, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite detector score for validation image 3"):
        compute_stats(_maps(4), masks, labels, post, image_scores=np.array([1, 2, 3, np.inf], dtype=np.float32), **kw)  # type: ignore[arg-type]


def _poison_location(bundle: Path, target: Path, location: str) -> Path:
    """Copy ``bundle`` with ``location``'s ONNX model multiplying its map by NaN (hash and size updated)."""
    import shutil

    import onnx
    from onnx import helper

    from tilead.runtime.bundle import OUTPUT_NAME, sha256_file, write_manifest

    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    entry = next(loc for loc in manifest["locations"] if loc["name"] == location)
    path = target / entry["file"]
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = ["map_before_nan" if o == OUTPUT_NAME else o for o in node.output]
    nan = helper.make_tensor("nan_factor", onnx.TensorProto.FLOAT, [], [math.nan])
    model.graph.initializer.append(nan)
    model.graph.node.append(helper.make_node("Mul", ["map_before_nan", "nan_factor"], [OUTPUT_NAME]))
    onnx.save(model, str(path))
    entry["sha256"] = sha256_file(path)
    entry["bytes"] = path.stat().st_size
    write_manifest(target, manifest)  # a re-export of the poisoned model: hashes and digest refreshed
    return target


@pytest.mark.integration
def test_issue_reproduction_nan_location_never_passes(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    import cv2

    from tilead.runtime import Predictor

    run, bundle = tiny_trained
    data = run.parent / "data" / "test"
    defective = sorted((data / "scratch").glob("*.png"))[0]
    good = sorted((data / "good").glob("*.png"))[0]
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in (defective, good)]
    with Predictor(bundle) as predictor:
        before = predictor.predict(images)
    assert isinstance(before, list)
    assert all(p.error is None for p in before)
    poisoned = _poison_location(bundle, tmp_path / "poisoned", "r1c1")
    with Predictor(poisoned) as predictor:
        after = predictor.predict(images)
    assert isinstance(after, list)
    for p in after:
        assert p.label
        assert p.score == 1.0
        assert math.isnan(p.raw_score)
        assert p.error == "non-finite model output (NaN or infinity) at location r1c1 (map)"
        assert p.mask.any()
    # The CLI writes valid JSON (null, not NaN) with the error, and says so in its exit code.
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tilead.cli.predict", str(poisoned), str(defective), str(good), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert len(records) == 2, proc.stderr
    for record in records:
        assert record["label"] is True
        assert record["raw_score"] is None
        assert record["score"] == 1.0
        assert "r1c1" in record["error"]
    assert proc.returncode != 0


@pytest.mark.integration
def test_evaluation_through_a_poisoned_bundle_stops_naming_images(
    tiny_trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from tilead.trainer.evaluation import evaluate

    run, bundle = tiny_trained
    poisoned = _poison_location(bundle, tmp_path / "poisoned", "r0c1")
    with pytest.raises(ValueError, match=r"model output is not finite for \d+ test image\(s\), e\.g\. .*r0c1 \(map\)"):
        evaluate(run, tmp_path / "eval", bundle=poisoned, progress=False)


@pytest.mark.integration
def test_eager_ensemble_with_a_nan_location_never_passes(tiny_trained: tuple[Path, Path]) -> None:
    import cv2
    import torch

    from tilead.trainer.eager import load_eager_ensemble

    run, _ = tiny_trained
    paths = [sorted((run.parent / "data" / "test" / kind).glob("*.png"))[0] for kind in ("good", "scratch")]
    decoded = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    assert all(d is not None for d in decoded)
    images = np.stack(decoded)  # type: ignore[arg-type]
    ensemble = load_eager_ensemble(run)
    _, clean = ensemble.predict(images)
    assert clean.finite.all()
    assert clean.errors is None
    index = ensemble.grid.location_names().index("r1c1")
    with torch.no_grad():
        ensemble.models[index].head.mean.fill_(float("nan"))  # type: ignore[union-attr,operator]
    _, result = ensemble.predict(images)
    assert result.labels.all()
    assert np.isnan(result.raw_scores).all()
    assert (result.scores == 1.0).all()
    assert [result.error(i) for i in range(2)] == [
        "non-finite model output (NaN or infinity) at location r1c1 (map)"
    ] * 2
