"""PatchCore: coreset, nearest-neighbour head, image score, state and config, against NumPy oracles."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tilead.trainer.config import ConfigError, parse_config
from tilead.trainer.detectors.base import (
    LocationState,
    create_detector,
    detector_class,
    families,
    load_state,
    save_state,
)
from tilead.trainer.detectors.patchcore.config import PatchCoreConfig
from tilead.trainer.detectors.patchcore.detector import PatchCoreDetector
from tilead.trainer.detectors.patchcore.model import (
    NearestNeighbourHead,
    PatchCoreLocationModel,
    bank_neighbors,
    greedy_coreset,
    reweighted_score,
    sparse_projection,
)


def _radius(x: np.ndarray, chosen: np.ndarray) -> float:
    """Covering radius: max over points of the distance to the nearest chosen point."""
    d = np.linalg.norm(x[:, None, :] - x[None, chosen, :], axis=2)
    return float(d.min(axis=1).max())


def _clustered(seed: int, n: int = 300, clusters: int = 6, dim: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + rng.normal(0, 0.5, (n, dim))).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_coreset_covers_better_than_random_subsets(seed: int) -> None:
    x = _clustered(seed)
    idx, radius = greedy_coreset(torch.from_numpy(x), 6, seed=seed)
    chosen = idx.numpy()
    assert len(set(chosen.tolist())) == 6
    assert radius == pytest.approx(_radius(x, chosen), rel=1e-4)  # the reported radius is the real one
    rng = np.random.default_rng(100 + seed)
    random_radii = [_radius(x, rng.choice(len(x), 6, replace=False)) for _ in range(50)]
    # One centre per cluster: the radius is within-cluster, far below any subset that misses a cluster.
    assert radius < 0.5 * float(np.median(random_radii))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_coreset_is_within_twice_the_optimal_k_center_radius(seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(11, 3)).astype(np.float32)
    k = 3
    optimal = min(_radius(x, np.array(c)) for c in itertools.combinations(range(len(x)), k))
    _, radius = greedy_coreset(torch.from_numpy(x), k, seed=seed)
    assert optimal <= radius + 1e-6
    assert radius <= 2 * optimal + 1e-5


def test_greedy_coreset_with_projection_and_bad_sizes() -> None:
    x = torch.from_numpy(_clustered(5, n=200, dim=40))
    idx, _ = greedy_coreset(x, 6, projection_dim=16, seed=0)
    # The projected distances still separate the clusters: one centre per cluster.
    assert _radius(x.numpy(), idx.numpy()) < 0.3 * _radius(x.numpy(), np.arange(6))
    with pytest.raises(ValueError, match=r"size must be in 1\.\.200"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="no features"):
        greedy_coreset(x[:0], 1)


def test_sparse_projection_preserves_squared_distances_on_average() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(400, 120)).astype(np.float32))
    r = sparse_projection(120, 64, seed=1)
    nonzero = float((r != 0).float().mean())
    assert nonzero == pytest.approx(1 / math.sqrt(120), rel=0.2)  # very sparse
    d_in = (x[:200] - x[200:]).square().sum(1)
    d_out = ((x[:200] - x[200:]) @ r).square().sum(1)
    assert float((d_out / d_in).mean()) == pytest.approx(1.0, abs=0.1)


def _numpy_nearest(x: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(x[:, :, None, :].astype(np.float64) - bank[None, None].astype(np.float64), axis=3)
    return d.min(axis=2), d.argmin(axis=2)


def test_nearest_neighbour_head_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 7)).astype(np.float32)
    center = rng.normal(size=7).astype(np.float32)
    emb = rng.normal(size=(3, 7, 4, 5)).astype(np.float32)
    emb[0, :, 0, 0] = bank[4] + center  # a patch exactly on a bank entry: distance 0, no cancellation
    head = NearestNeighbourHead(torch.from_numpy(bank), torch.from_numpy(center), (4, 5), blur_sigma=0.0)
    x = head.patches(torch.from_numpy(emb))
    dist, index = head.nearest(x)
    ref_d, ref_i = _numpy_nearest(emb.reshape(3, 7, 20).transpose(0, 2, 1) - center, bank)
    np.testing.assert_allclose(dist.numpy(), ref_d, atol=1e-5)
    np.testing.assert_array_equal(index.numpy(), ref_i)
    assert float(dist[0, 0]) == pytest.approx(0.0, abs=1e-6)
    out = head(torch.from_numpy(emb))
    assert out.shape == (3, 1, 4, 5)
    np.testing.assert_allclose(out.numpy().reshape(3, 20), ref_d, atol=1e-5)


def test_bank_neighbors_match_numpy_and_start_with_the_entry() -> None:
    bank = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    got = bank_neighbors(torch.from_numpy(bank), 5).numpy()
    d = np.linalg.norm(bank[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(got[:, 0], np.arange(30))
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(np.argsort(d, axis=1)[:, :5], axis=1))
    assert bank_neighbors(torch.from_numpy(bank[:3]), 9).shape == (3, 3)  # clipped to the bank size


def test_reweighted_score_matches_the_paper_formula() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    x = rng.normal(size=(2, 15, 6)).astype(np.float32) * 2
    dist, index = _numpy_nearest(x, bank)
    neighbors = bank_neighbors(torch.from_numpy(bank), 4)
    got = reweighted_score(
        torch.from_numpy(x),
        torch.from_numpy(dist.astype(np.float32)),
        torch.from_numpy(index),
        torch.from_numpy(bank),
        neighbors,
    ).numpy()
    for i in range(2):
        p = int(dist[i].argmax())
        m_test, s_star = x[i, p].astype(np.float64), dist[i, p]
        support = bank[neighbors[index[i, p]].numpy()].astype(np.float64)  # m* first
        e = np.exp(np.linalg.norm(m_test - support, axis=1))
        assert got[i] == pytest.approx((1 - e[0] / e.sum()) * s_star, rel=1e-5)
        assert 0 < got[i] < s_star


class _Tiles:
    """An in-memory re-iterable TileSource."""

    def __init__(self, batches: list[torch.Tensor], label: str = "test") -> None:
        self.batches = batches
        self.num_images = sum(int(b.shape[0]) for b in batches)
        self.batch_size = max((int(b.shape[0]) for b in batches), default=1)
        self.label = label

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _cfg(tmp_path: Path, **model: Any) -> Any:
    data = {
        "data": {"format": "mvtec", "root": str(tmp_path)},
        "grid": {"tile_size": 32},
        "model": {"family": "patchcore", **model},
    }
    return parse_config(data, base_dir=tmp_path)


@pytest.fixture(scope="module")
def backbone() -> Any:
    from tilead.trainer.backbones import build_backbone

    return build_backbone("efficientnet_lite0", ("blocks.2", "blocks.3"), "default")


def _fit(tmp_path: Path, backbone: Any, **model: Any) -> tuple[PatchCoreDetector, LocationState, torch.Tensor]:
    cfg = _cfg(tmp_path, **model)
    detector = create_detector(cfg, backbone, (32, 32))
    assert isinstance(detector, PatchCoreDetector)
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(6, 3, 32, 32, generator=g)
    state = detector.fit(_Tiles([tiles[:4], tiles[4:]]), _Tiles([]), progress=False)
    return detector, state, tiles


def test_fit_builds_a_coreset_bank_and_the_model_finds_training_patches(tmp_path: Path, backbone: Any) -> None:
    detector, state, tiles = _fit(tmp_path, backbone, coreset_ratio=0.25, blur_sigma=0.0)
    patches = 6 * 4 * 4  # 32 px tiles at stride 8
    assert state.tiles == 6
    assert state.meta["patches"] == patches
    assert state.meta["bank_size"] == math.ceil(0.25 * patches) == state.tensors["bank"].shape[0]
    assert state.tensors["bank"].dtype == torch.float16
    assert state.tensors["bank"].shape[1] == 120
    model = detector.build(state)
    assert isinstance(model, PatchCoreLocationModel)
    with torch.inference_mode():
        train_map, score = model.forward_with_score(tiles)
        other = model(torch.randn(2, 3, 32, 32) * 3)
    assert train_map.shape == (6, 1, 4, 4)
    assert score.shape == (6,)
    assert torch.all(score <= train_map.flatten(1).amax(1) + 1e-6)  # the reweighting only shrinks s*
    assert float(other.mean()) > float(train_map.mean())  # unseen noise is farther from the bank


def test_candidate_cap_limits_the_pool_and_the_bank(tmp_path: Path, backbone: Any) -> None:
    _, state, _ = _fit(tmp_path, backbone, coreset_ratio=0.5, max_candidates=20)
    assert state.meta["candidates"] == 20
    assert state.tensors["bank"].shape[0] == 20  # ceil(0.5 * 96) = 48 is capped by the pool


def test_state_roundtrip_and_wrong_family(tmp_path: Path, backbone: Any) -> None:
    detector, state, tiles = _fit(tmp_path, backbone, coreset_ratio=0.1)
    path = tmp_path / "r0c0.safetensors"
    save_state(path, detector, state, {"location": "r0c0", "images": str(state.tiles)})
    loaded, meta = load_state(path, detector)
    assert meta["family"] == "patchcore"
    assert meta["location"] == "r0c0"
    assert loaded.meta == state.meta
    assert loaded.tiles == state.tiles
    assert loaded.tensors.keys() == state.tensors.keys()
    for k, v in state.tensors.items():
        assert torch.equal(loaded.tensors[k], v)
    with torch.inference_mode():
        assert torch.equal(detector.build(loaded)(tiles), detector.build(state)(tiles))
    padim = detector_class("padim")(parse_config(
        {"data": {"format": "mvtec", "root": str(tmp_path)}, "grid": {"tile_size": 32}}, base_dir=tmp_path
    ).model, backbone, (32, 32), 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"format 'tilead\.patchcore\.v1'"):
        load_state(path, padim)
    bad = LocationState({**state.tensors, "center": torch.zeros(5)})
    with pytest.raises(ValueError, match="center"):
        detector.build(bad)


def _random_banks(state: LocationState, seed: int, neighbours: int) -> list[LocationState]:
    """Two locations' states with random banks and their neighbour tables.

    The banks are large enough to stay named initializers (the exporter inlines tiny tensors as constants).
    """
    g = torch.Generator().manual_seed(seed)
    banks = [torch.randn(256, 120, generator=g).half() for _ in range(2)]
    return [
        LocationState({**state.tensors, "bank": b, "neighbors": bank_neighbors(b.float(), neighbours)}) for b in banks
    ]


def test_patchcore_modules_export_with_weight_swap_and_match_onnxruntime(tmp_path: Path, backbone: Any) -> None:
    from tilead.exporter.onnx_export import compare_with_eager, export_like, export_location

    detector, state, _ = _fit(tmp_path, backbone, coreset_ratio=0.5, blur_sigma=1.0)
    first, second = (detector.build(s, export=True) for s in _random_banks(state, 1, 3))
    export_location(first, (3, 32, 32), tmp_path / "a.onnx")
    assert export_like(tmp_path / "a.onnx", first, second, tmp_path / "b.onnx")
    assert compare_with_eager(first, tmp_path / "a.onnx", (3, 32, 32)) < 1e-5
    assert compare_with_eager(second, tmp_path / "b.onnx", (3, 32, 32)) < 1e-5


def test_registry_and_config_errors(tmp_path: Path) -> None:
    assert {"padim", "patchcore"} <= set(families())
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        detector_class("nope")
    base = {"data": {"format": "mvtec", "root": str(tmp_path)}, "grid": {"tile_size": 32}}
    cfg = parse_config({**base, "model": {"family": "patchcore"}}, base_dir=tmp_path)
    assert isinstance(cfg.model, PatchCoreConfig)
    assert cfg.model.backbone.layers == ("blocks.2", "blocks.3")
    cases = [
        ({"family": "nope"}, "does not match any of the expected tags: 'padim', 'patchcore'"),
        ({"family": "patchcore", "n_features": 10}, "model.n_features: unknown key; allowed keys here: family"),
        ({"family": "patchcore", "local_kernel": 4}, "model.local_kernel: Value error, expected an odd"),
        ({"family": "patchcore", "coreset_ratio": 0}, "model.coreset_ratio: Input should be greater than 0"),
        ({"family": "patchcore", "storage_dtype": "int8"}, "model.storage_dtype"),
        ({"local_kernel": 3}, "model.local_kernel: unknown key; allowed keys here: family, backbone"),
    ]
    for model, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "model": model}, base_dir=tmp_path)
        assert message in str(err.value)


def test_the_reweighted_score_exports_as_a_second_output_and_swaps_weights(tmp_path: Path, backbone: Any) -> None:
    """``image_score: detector``: graphs ``map`` + ``score``, the neighbour table swapped per location."""
    import onnx
    import onnxruntime as ort

    from tilead.exporter.onnx_export import MapAndScore, compare_with_eager, export_like, export_location

    detector, state, tiles = _fit(tmp_path, backbone, coreset_ratio=0.5, blur_sigma=1.0)
    states = _random_banks(state, 2, 9)
    first, second = (MapAndScore(detector.build(s, export=True, with_score=True)) for s in states)
    export_location(first, (3, 32, 32), tmp_path / "a.onnx")
    assert export_like(tmp_path / "a.onnx", first, second, tmp_path / "b.onnx")
    proto = onnx.load(str(tmp_path / "b.onnx"))
    assert [o.name for o in proto.graph.output] == ["map", "score"]
    assert "model.neighbors" in {i.name for i in proto.graph.initializer}  # int32, swapped by name
    for model, name in ((first, "a.onnx"), (second, "b.onnx")):
        assert compare_with_eager(model, tmp_path / name, (3, 32, 32)) < 1e-5
    # Real tiles (not only the exporter's random check): ONNX Runtime's score is the eager reweighted score
    # of that location, and the second location's score differs from the first's (its own table and bank).
    x = (tiles * 2).numpy()
    scores = []
    for name, s in zip(("a.onnx", "b.onnx"), states, strict=True):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        got_map, got_score = session.run(["map", "score"], {"tiles": x})
        with torch.inference_mode():
            ref_map, ref_score = detector.build(s).forward_with_score(torch.from_numpy(x))
        np.testing.assert_allclose(got_map, ref_map.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_score, ref_score.numpy(), rtol=1e-4)
        assert got_score.shape == (6,)
        scores.append(got_score)
    assert not np.allclose(scores[0], scores[1])
    # A map-only export has no table (and no score): the bank's location model without it refuses scoring.
    map_only = detector.build(states[0], export=True)
    assert map_only.neighbors is None
    with pytest.raises(RuntimeError, match="map-only export"):
        map_only.forward_with_score(tiles)


def test_image_score_detector_needs_a_detector_with_its_own_score(tmp_path: Path) -> None:
    base = {"data": {"format": "mvtec", "root": str(tmp_path)}, "grid": {"tile_size": 32}}
    post = {"postprocess": {"image_score": "detector"}}
    cfg = parse_config({**base, **post, "model": {"family": "patchcore"}}, base_dir=tmp_path)
    assert cfg.postprocess.image_score == "detector"
    assert cfg.fit_key() == parse_config({**base, "model": {"family": "patchcore"}}, base_dir=tmp_path).fit_key()
    for family in ("padim", "stfpm"):
        with pytest.raises(ConfigError, match=rf"image_score 'detector': model\.family '{family}' has no image score"):
            parse_config({**base, **post, "model": {"family": family}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"postprocess\.image_score: Input should be 'max' or 'detector'"):
        parse_config({**base, "postprocess": {"image_score": "mean"}}, base_dir=tmp_path)
