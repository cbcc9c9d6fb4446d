"""The thumbnail branch in the runtime (issue #20): manifest entry, fusion, backends running it beside the tiles.

Runtime tests use small real bundles (ONNX graphs from :mod:`bundle_factory`, real ONNX Runtime and OpenVINO)
and check the Predictor against the float64 NumPy oracle of ``tests/reference.py``.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference
from bundle_factory import PREP_MEAN, PREP_STD, make_bundle, manifest_data, onnx_model, reference_location_maps
from hypothesis import given, settings
from hypothesis import strategies as st

from tilead import _kernels
from tilead.runtime import Predictor
from tilead.runtime.backends.base import run_with_thumbnail
from tilead.runtime.backends.tensorrt_modules import require_per_location
from tilead.runtime.bundle import BundleError, read_manifest, sha256_file, write_manifest
from tilead.runtime.thumbnail import (
    THUMBNAIL_FILE,
    BranchStats,
    ThumbnailBranch,
    thumbnail_tiles,
    upsample,
)
from tilead.runtime.timing import StageTimes

SIZE = 32
THUMB_MAP = (4, 4)
THUMB_GAIN = 2.0
TILED = BranchStats(threshold=1.0, min=-2.5, max=3.0)
SMALL = BranchStats(threshold=0.5, min=-4.0, max=5.0)


def branch(fusion: str = "max", weight: float | None = None) -> ThumbnailBranch:
    return ThumbnailBranch.from_dict(
        {
            "size": SIZE,
            "fusion": fusion,
            "weight": weight,
            "map_size": list(THUMB_MAP),
            "stats": {"tiled": TILED.to_dict(), "thumbnail": SMALL.to_dict()},
        },
        with_file=False,
    )


def entry(root: Path, fusion: str = "max", weight: float | None = None) -> dict[str, Any]:
    path = root / THUMBNAIL_FILE
    return {
        **branch(fusion, weight).to_dict(),
        "file": THUMBNAIL_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


def make_thumbnail_bundle(root: Path, fusion: str = "max", weight: float | None = None) -> Path:
    """:func:`make_bundle`'s 2x2 bundle plus ``thumbnail.onnx`` (channel mean, 8x8 pooling, gain 2) and its entry."""
    make_bundle(root)
    (root / THUMBNAIL_FILE).write_bytes(onnx_model(THUMB_GAIN, tile=(SIZE, SIZE), map_size=THUMB_MAP))
    data = manifest_data(root)
    data["thumbnail"] = entry(root, fusion, weight)
    write_manifest(root, data)
    return root


def reference_thumbnail(images: np.ndarray, swap_rb: bool) -> np.ndarray:
    """float64 ``(n, 64, 64)``: the thumbnail model's map of uint8 ``(n, 64, 64, 3)``, upsampled, by the oracle."""
    small = np.stack([reference.area_resize(img, SIZE, SIZE) for img in images])
    tiles = reference.tile(small, (SIZE, SIZE), (SIZE, SIZE), "shift", PREP_MEAN, PREP_STD, 3, swap_rb)[0]
    pooled = tiles.mean(axis=1).reshape(len(images), 4, 8, 4, 8).mean(axis=(2, 4)) * THUMB_GAIN
    out: np.ndarray = reference.resize(pooled, 64, 64)
    return out


def reference_fused(images: np.ndarray, fusion: str, weight: float | None, swap_rb: bool) -> np.ndarray:
    merged = reference.untile(
        reference_location_maps(images, swap_rb), (64, 64), (40, 40), (24, 24), "shift", "feather"
    )
    a = (merged - TILED.threshold) / (TILED.max - TILED.min) + 0.5
    b = (reference_thumbnail(images, swap_rb) - SMALL.threshold) / (SMALL.max - SMALL.min) + 0.5
    if fusion == "max":
        fused: np.ndarray = np.maximum(a, b)
    else:
        assert weight is not None
        fused = weight * a + (1 - weight) * b
    return fused


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    out[0, 5:30, 8:40] = 255  # a bright patch larger than a tile's share
    return out


# -- the manifest entry ----------------------------------------------------------------------------------------


def test_a_bundle_without_thumbnail_has_none(tmp_path: Path) -> None:
    manifest = read_manifest(make_bundle(tmp_path / "b"))
    assert manifest.thumbnail is None
    assert [f.file for f in manifest.files] == [loc.file for loc in manifest.locations]


def test_the_thumbnail_entry_is_read_and_its_file_listed(tmp_path: Path) -> None:
    manifest = read_manifest(make_thumbnail_bundle(tmp_path / "b", "weighted", 0.7))
    assert manifest.thumbnail is not None
    assert manifest.thumbnail.fusion == "weighted"
    assert manifest.thumbnail.weight == 0.7
    assert manifest.thumbnail.map_size == THUMB_MAP
    assert manifest.files[-1].file == THUMBNAIL_FILE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fusion": "mean"}, "thumbnail.fusion"),
        ({"weight": 0.5}, "only fusion 'weighted' takes a weight"),
        ({"fusion": "weighted", "weight": 1.5}, "thumbnail.weight"),
        ({"fusion": "weighted"}, "thumbnail.weight"),
        ({"size": 8}, "thumbnail.size"),
        ({"map_size": [40, 4]}, "thumbnail.map_size"),
        ({"file": "tiles/r0c0.onnx"}, "thumbnail.file"),
        ({"sha256": "x" * 64}, "thumbnail.sha256"),
        ({"stats": {"tiled": {"threshold": 9.0, "min": 0.0, "max": 1.0}, "thumbnail": SMALL.to_dict()}}, "threshold"),
        ({"stats": {"tiled": TILED.to_dict()}}, "thumbnail.stats"),
        ({"extra": 1}, "thumbnail"),
    ],
)
def test_a_bad_thumbnail_entry_is_a_clear_bundle_error(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    root = make_thumbnail_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["thumbnail"].update(change)
    if change.get("fusion") == "weighted" and "weight" not in change:
        data["thumbnail"]["weight"] = None
    write_manifest(root, data)
    with pytest.raises(BundleError, match=message):
        read_manifest(root)


def test_a_thumbnail_with_the_detector_image_score_is_refused(tmp_path: Path) -> None:
    root = make_thumbnail_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["postprocess"]["image_score"] = "detector"
    data["model"]["score_output"] = "score"
    write_manifest(root, data)
    with pytest.raises(BundleError, match="image_score 'detector'"):
        read_manifest(root)


def test_a_modified_thumbnail_file_is_refused_before_loading(tmp_path: Path) -> None:
    root = make_thumbnail_bundle(tmp_path / "b")
    path = root / THUMBNAIL_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="the thumbnail model: sha256"):
        Predictor(root)


finite = st.floats(-1e3, 1e3, allow_nan=False)


@given(
    lo=finite,
    width=st.floats(1e-2, 1e3),
    at=st.floats(0, 1),
    size=st.integers(32, 4096),
    weight=st.none() | st.floats(0, 1),
)
def test_branch_entry_round_trips(lo: float, width: float, at: float, size: int, weight: float | None) -> None:
    stats = BranchStats(threshold=lo + at * width, min=lo, max=lo + width)
    b = ThumbnailBranch(
        size=size,
        fusion="max" if weight is None else "weighted",
        weight=weight,
        map_size=(max(1, size // 8), max(1, size // 8)),
        tiled=stats,
        thumbnail=stats,
    )
    assert ThumbnailBranch.from_dict(json.loads(json.dumps(b.to_dict())), with_file=False) == b


# -- fusion -------------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31),
    weight=st.none() | st.floats(0, 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
)
def test_fuse_is_the_per_branch_affine_then_max_or_weighted_sum(
    seed: int, weight: float | None, shape: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 3, shape).astype(np.float32)
    b = rng.normal(0, 3, shape).astype(np.float32)
    got = branch("max" if weight is None else "weighted", weight).fuse(a, b)
    za = (a.astype(np.float64) - 1.0) / 5.5 + 0.5
    zb = (b.astype(np.float64) - 0.5) / 9.0 + 0.5
    want = np.maximum(za, zb) if weight is None else weight * za + (1 - weight) * zb
    assert got.dtype == np.float32
    assert got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fuse_keeps_a_non_finite_value_of_either_branch() -> None:
    a = np.zeros((1, 2, 2), np.float32)
    b = np.zeros((1, 2, 2), np.float32)
    a[0, 0, 0] = np.nan
    b[0, 1, 1] = np.inf
    for fused in (branch().fuse(a, b), branch("weighted", 0.5).fuse(a, b)):
        assert not np.isfinite(fused[0, 0, 0])
        assert not np.isfinite(fused[0, 1, 1])
        assert np.isfinite(fused[0, 0, 1])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    weight=st.none() | st.floats(0, 1),
    n=st.integers(1, 3),
    small=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    big=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    broken=st.booleans(),
)
def test_the_fuse_kernel_is_the_branch_fusion_of_the_upsampled_map(
    seed: int, weight: float | None, n: int, small: tuple[int, int], big: tuple[int, int], broken: bool
) -> None:
    """The CPU twin of the TensorRT pipeline's fusion (``_kernels.fuse_thumbnail``, shared with its CUDA twin).

    Against the float64 oracle (reference.resize, the affine maps, max or weighted sum) and against the CPU
    path (``ThumbnailBranch.fuse`` of ``upsample``) to float32 rounding; NaN stays NaN, infinity infinite.
    """
    rng = np.random.default_rng(seed)
    b = branch("max" if weight is None else "weighted", weight)
    thumb = rng.normal(0, 3, (n, *small)).astype(np.float32)
    tiled = rng.normal(0, 3, (n, *big)).astype(np.float32)
    if broken:
        tiled[0, 0, 0] = np.nan
        thumb[-1, -1, -1] = np.inf
    got = tiled.copy()
    _kernels.fuse_thumbnail(thumb, got, b.fuse_spec())
    cpu = b.fuse(tiled, upsample(thumb, big))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(cpu))
    np.testing.assert_allclose(got, cpu, rtol=1e-6, atol=1e-6)
    if broken:  # the oracle's matrix products spread a non-finite value further; the twins agree (above)
        assert np.isnan(got[0, 0, 0])  # a NaN of the tiled map stays NaN, whatever the thumbnail says
        return
    za = (tiled.astype(np.float64) - TILED.threshold) / (TILED.max - TILED.min) + 0.5
    zb = (reference.resize(thumb, *big) - SMALL.threshold) / (SMALL.max - SMALL.min) + 0.5
    want = np.maximum(za, zb) if weight is None else weight * za + (1 - weight) * zb
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_fuse_kernel_checks_its_arguments() -> None:
    spec = branch().fuse_spec()
    maps = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"maps: expected shape \(1, 8, 8\)"):
        _kernels.fuse_thumbnail(np.zeros((1, 4, 4), np.float32), maps, spec)
    with pytest.raises(ValueError, match="thumbnail: expected dtype float32"):
        _kernels.fuse_thumbnail(np.zeros((2, 4, 4), np.float64), maps, spec)
    with pytest.raises(ValueError, match="fuse: expected positive scales"):
        _kernels.FuseSpec(0.0, 0.0, 0.0, 1.0, False, 0.0)
    with pytest.raises(ValueError, match="expected a weight in"):
        _kernels.FuseSpec(0.0, 1.0, 0.0, 1.0, True, 1.5)
    assert branch("weighted", 0.25).fuse_spec() == _kernels.FuseSpec(
        1.0, float(np.float32(1 / 5.5)), 0.5, float(np.float32(1 / 9.0)), True, 0.25
    )
    spec_of = branch().native()
    assert (spec_of.map_h, spec_of.map_w, spec_of.grid.image_h, spec_of.grid.tile_h) == (*THUMB_MAP, SIZE, SIZE)
    with pytest.raises(ValueError, match="thumbnail grid: expected one tile"):
        _kernels.ThumbnailSpec(_kernels.Grid(64, 64, 32, 32, 32, 32, _kernels.EDGE_SHIFT), 4, 4, spec)


def test_fuse_refuses_maps_of_other_shapes() -> None:
    with pytest.raises(ValueError, match="expected the tiled maps' shape"):
        branch().fuse(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 5), np.float32))


def test_thumbnail_tiles_are_the_area_resized_images_preprocessed() -> None:
    batch = images(2)
    got = thumbnail_tiles(batch, SIZE, read_preprocessing(), input_order="BGR")
    small = np.stack([reference.area_resize(img, SIZE, SIZE) for img in batch])
    want = reference.tile(small, (SIZE, SIZE), (SIZE, SIZE), "shift", PREP_MEAN, PREP_STD, 3, True)
    assert got.shape == (1, 2, 3, SIZE, SIZE)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_upsample_is_bilinear_to_the_image() -> None:
    maps = np.random.default_rng(1).normal(size=(2, 1, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(upsample(maps, (17, 23)), reference.resize(maps[:, 0], 17, 23), atol=1e-5)


def read_preprocessing() -> Any:
    from tilead.runtime import Preprocessing

    return Preprocessing(mean=tuple(PREP_MEAN), std=tuple(PREP_STD), channels=3, color_order="RGB", dtype="float32")


# -- the Predictor and its backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize(("fusion", "weight"), [("max", None), ("weighted", 0.75)])
def test_predictor_fuses_the_thumbnail_as_the_oracle(
    tmp_path: Path, backend: str, fusion: str, weight: float | None
) -> None:
    root = make_thumbnail_bundle(tmp_path / "b", fusion, weight)
    batch = images(3)
    fused = reference_fused(batch, fusion, weight, swap_rb=True)
    norm, _masks, raw, scores = reference.normalize(fused, 1.0, 1.5, (-2.5, 3.0), (-2.5, 3.0))
    with Predictor(root, backend=backend, threads=2, location_workers=2) as predictor:
        results, times = predictor.predict_timed(batch)
        maps, _, small = predictor.branch_outputs(batch)
    assert small is not None
    assert small.shape == (3, *THUMB_MAP)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), norm, atol=1e-5)
    np.testing.assert_allclose([r.raw_score for r in results], raw, atol=1e-5)
    np.testing.assert_allclose([r.score for r in results], scores, atol=1e-5)
    assert maps.shape == (4, 3, 5, 5)
    assert "location:thumbnail" in times.seconds
    assert "fuse" in times.seconds


def test_without_thumbnail_the_predictor_ignores_nothing_and_adds_nothing(tmp_path: Path) -> None:
    plain = make_bundle(tmp_path / "plain")
    batch = images(2)
    with Predictor(plain) as predictor:
        results, times = predictor.predict_timed(batch)
        _, _, small = predictor.branch_outputs(batch)
    assert small is None
    assert "fuse" not in times.seconds
    assert "location:thumbnail" not in times.seconds
    merged = reference.untile(reference_location_maps(batch, True), (64, 64), (40, 40), (24, 24), "shift", "feather")
    norm, _, _, _ = reference.normalize(merged, 1.0, 1.5, (-2.5, 3.0), (-2.5, 3.0))
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), norm, atol=1e-5)


def test_concurrent_calls_give_the_serial_results(tmp_path: Path) -> None:
    root = make_thumbnail_bundle(tmp_path / "b", "weighted", 0.4)
    batches = [images(2, seed) for seed in range(6)]
    with Predictor(root, threads=2, location_workers=2) as predictor:
        serial = [[r.anomaly_map for r in predictor.predict(b)] for b in batches]  # type: ignore[union-attr]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda b: [r.anomaly_map for r in predictor.predict(b)], batches))  # type: ignore[union-attr]
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_the_native_tensorrt_path_refuses_only_a_thumbnail_larger_than_the_image(tmp_path: Path) -> None:
    """The device pipeline resizes by area (shrinking) only; a thumbnail up to the image's size runs."""
    root = make_thumbnail_bundle(tmp_path / "b")
    require_per_location(root, read_manifest(root))  # 32 x 32 from 64 x 64: runs (tests/test_trt_branches.py)
    data = json.loads((root / "manifest.json").read_text())
    data["thumbnail"]["size"] = 80
    write_manifest(root, data)
    with pytest.raises(BundleError, match=r"resizes the 64 x 64 image up to 80 x 80.*by area only"):
        require_per_location(root, read_manifest(root))
    with pytest.raises(BundleError, match="by area only"):
        Predictor(root, device="cuda", backend="tensorrt")


# -- run_with_thumbnail ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_run_with_thumbnail_runs_both_and_checks_the_shape(tmp_path: Path, workers: int) -> None:
    manifest = read_manifest(make_thumbnail_bundle(tmp_path / "b"))
    tiles_out = (np.ones((4, 2, 5, 5), np.float32), None)
    small = np.zeros((1, 2, 3, SIZE, SIZE), np.float32)
    ran: list[str] = []
    lock = threading.Lock()

    def run_tiles() -> Any:
        with lock:
            ran.append("tiles")
        return tiles_out

    def good(x: np.ndarray) -> np.ndarray:
        with lock:
            ran.append("thumbnail")
        return np.full((x.shape[0], 1, *THUMB_MAP), 3.0, np.float32)

    pool = ThreadPoolExecutor(workers) if workers else None
    try:
        timer = StageTimes()
        outputs, maps = run_with_thumbnail(manifest, run_tiles, good, small, pool, timer)
        assert outputs is tiles_out
        assert maps.shape == (2, *THUMB_MAP)
        assert (maps == 3.0).all()
        assert sorted(ran) == ["thumbnail", "tiles"]
        assert "location:thumbnail" in timer.seconds
        with pytest.raises(BundleError, match=r"thumbnail model: output shape \(2, 1, 4, 5\)"):
            run_with_thumbnail(manifest, run_tiles, lambda x: np.zeros((2, 1, 4, 5), np.float32), small, pool, None)

        def broken() -> Any:
            raise RuntimeError("location failed")

        with pytest.raises(RuntimeError, match="location failed"):
            run_with_thumbnail(manifest, broken, good, small, pool, None)
    finally:
        if pool is not None:
            pool.shutdown()
