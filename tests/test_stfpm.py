"""STFPM: loss and map against NumPy, training, early stopping, resume, config, checkpoints, export."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference as ref
import torch
from torch import nn

from tilead.trainer.backbones import BackboneInfo, FeatureExtractor
from tilead.trainer.config import ConfigError, parse_config
from tilead.trainer.detectors.base import LocationState, load_state, save_state
from tilead.trainer.detectors.stfpm.config import StfpmConfig
from tilead.trainer.detectors.stfpm.detector import PROGRESS_FILE, StfpmDetector
from tilead.trainer.detectors.stfpm.model import freeze_batchnorm, make_student, stfpm_loss

TILE = (32, 32)

# -- helpers ---------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    """Two stages at strides 4 and 8 (8 and 16 channels), BatchNorm and ReLU as in a real backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.s1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.s1(self.stem(x))
        return {"s1": a, "s2": self.s2(a)}


def _teacher(seed: int = 0) -> FeatureExtractor:
    torch.manual_seed(seed)
    net = _TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a pretrained teacher has
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    info = BackboneInfo("tiny", ("s1", "s2"), (8, 16), (4, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return FeatureExtractor(net, info)


class _Tiles:
    """A re-iterable :class:`~tilead.trainer.detectors.base.TileSource` over tensors in memory."""

    def __init__(self, tiles: torch.Tensor, batch_size: int = 3, label: str = "fit test") -> None:
        self.tiles = tiles
        self.batch_size = batch_size
        self.label = label
        self.num_images = int(tiles.shape[0])

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for lo in range(0, self.num_images, self.batch_size):
            yield self.tiles[lo : lo + self.batch_size]


def _smooth_tiles(n: int, seed: int) -> torch.Tensor:
    """``(n, 3, 32, 32)`` smooth random images (a learnable 'normal' distribution)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=TILE, mode="bilinear", align_corners=False)


def _detector(teacher: FeatureExtractor | None = None, **settings: Any) -> StfpmDetector:
    base: dict[str, Any] = {"epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "patience": 0, "blur_sigma": 0.0}
    base.update(settings)
    return StfpmDetector(StfpmConfig(**base), teacher or _teacher(), TILE, seed=0)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Unit vectors over axis 1; an all-zero vector (ReLU features) stays zero."""
    out: np.ndarray = x / np.maximum(np.sqrt((x**2).sum(axis=1, keepdims=True)), 1e-12)
    return out


# -- loss and map ----------------------------------------------------------------------------------


def test_loss_matches_numpy_oracle() -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 5, 4, 4), (2, 7, 2, 3)]
    t = [torch.randn(*s, generator=g) for s in shapes]
    s = [torch.randn(*s, generator=g) for s in shapes]
    expected = 0.0
    for a, b in zip(t, s, strict=True):
        d = _normalize(a.double().numpy()) - _normalize(b.double().numpy())
        expected += float((0.5 * (d**2).sum(axis=1)).mean())  # the paper's 1/(2wh) sum, averaged over the batch
    assert float(stfpm_loss(t, s)) == pytest.approx(expected, rel=1e-5)
    assert float(stfpm_loss(t, [x.clone() * 3.0 for x in t])) == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    with pytest.raises(ValueError, match="stages"):
        stfpm_loss(t, s[:1])


@pytest.mark.parametrize(("reduction", "blur"), [("product", 0.0), ("sum", 0.0), ("product", 0.5)])
def test_map_matches_numpy_oracle(reduction: str, blur: float) -> None:
    teacher = _teacher()
    det = _detector(teacher, reduction=reduction, blur_sigma=blur)
    student = make_student(teacher, seed=5).eval()
    model = det.build(LocationState(student.state_dict()))
    x = _smooth_tiles(2, seed=2)
    with torch.no_grad():
        got = model(x).numpy()
        t_out, s_out = teacher.graph(x), student(x)
    h, w = det.map_size
    assert got.shape == (2, 1, h, w) == (2, 1, 4, 4)
    maps = []
    for layer in ("s1", "s2"):
        d = _normalize(t_out[layer].double().numpy()) - _normalize(s_out[layer].double().numpy())
        maps.append(ref.resize(0.5 * (d**2).sum(axis=1), h, w))
    expected = maps[0] * maps[1] if reduction == "product" else maps[0] + maps[1]
    if blur > 0:
        expected = ref.gaussian_blur(expected, blur)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_student_is_a_seeded_random_trainable_copy() -> None:
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    rng = torch.random.get_rng_state()
    a, b, c = make_student(teacher, 3), make_student(teacher, 3), make_student(teacher, 4)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global generator is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == teacher.graph.state_dict().keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])
    assert not torch.equal(sa["stem.0.weight"], before["graph.stem.0.weight"])
    assert all(p.requires_grad for p in a.parameters())
    assert a.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_export_variant_matches_eager_and_keeps_keys_per_location() -> None:
    teacher = _teacher()
    det = _detector(teacher, blur_sigma=1.0)
    states = []
    for seed in (1, 2):
        student = make_student(teacher, seed)
        student(_smooth_tiles(4, seed))  # train-mode pass: running statistics move away from 0 / 1
        states.append(LocationState({k: v.detach().clone() for k, v in student.state_dict().items()}))
    x = _smooth_tiles(3, 9)
    exported = [det.build(s, export=True) for s in states]
    with torch.no_grad():
        for state, model in zip(states, exported, strict=True):
            eager = det.build(state)(x)
            np.testing.assert_allclose(model(x).numpy(), eager.numpy(), rtol=1e-5, atol=1e-7)
    assert exported[0].state_dict().keys() == exported[1].state_dict().keys()
    frozen = exported[0].student
    assert isinstance(frozen, nn.Module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert freeze_batchnorm(make_student(teacher, 1)).training is False


# -- training --------------------------------------------------------------------------------------


def test_training_reduces_the_train_and_holdout_loss() -> None:
    teacher = _teacher()
    det = _detector(teacher, epochs=5, batch_size=2)  # 30 steps: enough for BatchNorm's running statistics
    fit, holdout = _Tiles(_smooth_tiles(12, 0)), _Tiles(_smooth_tiles(4, 1), label="holdout test")
    state = det.fit(fit, holdout, progress=False)
    history = state.meta["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["holdout_loss"] < 0.8 * history[0]["holdout_loss"]
    assert state.tiles == 12
    assert state.meta["holdout_tiles"] == 4


def test_early_stopping_keeps_the_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    det = _detector(epochs=8, patience=2)
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.1])
    monkeypatch.setattr(StfpmDetector, "_holdout_loss", lambda self, *a: next(losses))
    snapshots: list[dict[str, torch.Tensor]] = []
    save = StfpmDetector._save_progress

    def record(self: StfpmDetector, state: Any, student: nn.Module, *args: Any) -> None:
        snapshots.append({k: v.clone() for k, v in student.state_dict().items()})
        save(self, state, student, *args)

    monkeypatch.setattr(StfpmDetector, "_save_progress", record)
    state = det.fit(_Tiles(_smooth_tiles(6, 0)), _Tiles(_smooth_tiles(2, 1)), progress=False)
    assert state.meta["epochs_run"] == 4  # epochs 3 and 4 did not beat epoch 2
    assert state.meta["stopped_early"] is True
    assert state.meta["best_epoch"] == 2
    best = snapshots[1]  # after epoch 2
    assert all(torch.equal(state.tensors[k], v) for k, v in best.items())
    assert not torch.equal(state.tensors["stem.0.weight"], snapshots[3]["stem.0.weight"])


def test_without_holdout_every_epoch_runs_and_the_last_is_kept() -> None:
    det = _detector(epochs=2, holdout_fraction=0.0)
    empty = _Tiles(torch.zeros(0, 3, *TILE), label="holdout none")
    state = det.fit(_Tiles(_smooth_tiles(4, 0)), empty, progress=False)
    assert state.meta["epochs_run"] == 2
    assert state.meta["best_epoch"] == 2
    assert "holdout_loss" not in state.meta["history"][0]
    with pytest.raises(ValueError, match="at least 1 training tile"):
        det.fit(empty, empty, progress=False)


def test_streaming_when_the_cache_limit_is_exceeded_trains_the_same_epochs() -> None:
    det = _detector(epochs=2, cache_mib=0)
    state = det.fit(_Tiles(_smooth_tiles(6, 0), batch_size=4), _Tiles(_smooth_tiles(2, 1)), progress=False)
    assert [h["epoch"] for h in state.meta["history"]] == [1, 2]
    assert state.meta["history"][1]["train_loss"] < state.meta["history"][0]["train_loss"]


def _fit_counting(det: StfpmDetector, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> Any:
    """Fit on fixed tiles; count epochs trained in this call; raise KeyboardInterrupt after ``stop_after``."""
    calls: list[int] = []
    save = StfpmDetector._save_progress

    def counted(self: StfpmDetector, *args: Any) -> None:
        save(self, *args)
        calls.append(1)
        if stop_after is not None and len(calls) >= stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(StfpmDetector, "_save_progress", counted)
    try:
        return det.fit(_Tiles(_smooth_tiles(8, 0)), _Tiles(_smooth_tiles(3, 1)), progress=False), len(calls)
    finally:
        monkeypatch.setattr(StfpmDetector, "_save_progress", save)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (bit-reproducible training), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")  # the resumed run must reproduce the uninterrupted one exactly
def test_an_interrupted_location_resumes_from_its_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = _fit_counting(_detector(epochs=4), monkeypatch)
    det = _detector(epochs=4)
    det.work_dir = tmp_path / "partial" / "r0c0"
    with pytest.raises(KeyboardInterrupt):
        _fit_counting(det, monkeypatch, stop_after=2)
    assert (det.work_dir / PROGRESS_FILE).is_file()
    again = _detector(epochs=4)
    again.work_dir = det.work_dir
    state, trained_now = _fit_counting(again, monkeypatch)
    assert trained_now == 2  # epochs 3 and 4 only
    assert [h["epoch"] for h in state.meta["history"]] == [1, 2, 3, 4]
    assert state.tensors.keys() == reference.tensors.keys()
    for k, v in reference.tensors.items():
        torch.testing.assert_close(state.tensors[k], v, rtol=1e-6, atol=1e-7)
    # Progress of other settings is not resumed: the location starts afresh.
    other = _detector(epochs=4, learning_rate=5e-3)
    other.work_dir = det.work_dir
    assert _fit_counting(other, monkeypatch)[1] == 4


# -- config and checkpoints ------------------------------------------------------------------------


def _cfg(**model: Any) -> dict[str, Any]:
    model = {"family": "stfpm", **model}
    return {"data": {"format": "mvtec", "root": "data"}, "grid": {"tile_size": 64}, "model": model}


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_config(_cfg(), base_dir=tmp_path)
    assert isinstance(cfg.model, StfpmConfig)
    assert (cfg.model.reduction, cfg.model.optimizer, cfg.model.holdout_fraction) == ("product", "adam", 0.1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"patience": 2, "holdout_fraction": 0.0}, "set holdout_fraction > 0"),
        ({"optimizer": "rmsprop"}, "model.optimizer: Input should be 'adam' or 'sgd'"),
        ({"epoch": 3}, "model.epoch: unknown key; allowed keys here: family, backbone, feature_stride"),
        ({"epochs": 0}, "model.epochs"),
        ({"learning_rate": 0}, "model.learning_rate"),
        ({"reduction": "max"}, "model.reduction"),
        ({"holdout_fraction": 1.0}, "model.holdout_fraction"),
    ]
    for patch, expected in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(_cfg(**patch), base_dir=tmp_path, source="s.yaml")
        assert expected in str(err.value), str(err.value)
    no_holdout = parse_config(_cfg(patience=0, holdout_fraction=0.0), base_dir=tmp_path).model
    assert isinstance(no_holdout, StfpmConfig)
    assert no_holdout.patience == 0


def test_checkpoint_roundtrip_and_mismatches(tmp_path: Path) -> None:
    from tilead.trainer.detectors.padim.config import PadimConfig
    from tilead.trainer.detectors.padim.detector import PadimDetector

    teacher = _teacher()
    det = _detector(teacher, epochs=1)
    state = det.fit(_Tiles(_smooth_tiles(4, 0)), _Tiles(_smooth_tiles(2, 1)), progress=False)
    path = tmp_path / "r0c0.safetensors"
    save_state(path, det, state, {"location": "r0c0", "images": str(state.tiles)})
    loaded, meta = load_state(path, det)
    assert meta["format"] == "tilead.stfpm.v1"
    assert loaded.meta == state.meta
    assert loaded.tiles == state.tiles
    assert all(torch.equal(loaded.tensors[k], v) for k, v in state.tensors.items())
    x = _smooth_tiles(2, 3)
    with torch.no_grad():
        np.testing.assert_array_equal(det.build(loaded)(x).numpy(), det.build(state)(x).numpy())
    padim = PadimDetector(PadimConfig(n_features=4), teacher, TILE, seed=0)
    with pytest.raises(ValueError, match=r"tilead\.stfpm\.v1"):
        load_state(path, padim)
    broken = LocationState({k: v for k, v in state.tensors.items() if not k.startswith("s2.")})
    with pytest.raises(ValueError, match="does not fit backbone tiny"):
        det.build(broken)


# -- export and the whole pipeline -----------------------------------------------------------------


@pytest.mark.integration
def test_export_reuses_the_first_graph_with_parity(tmp_path: Path) -> None:
    from tilead.exporter.onnx_export import compare_with_eager, export_like, export_location

    teacher = _teacher()
    det = _detector(teacher, blur_sigma=1.0)
    states = []
    for seed in (1, 2):
        student = make_student(teacher, seed)
        student(_smooth_tiles(4, seed))
        states.append(LocationState({k: v.detach().clone() for k, v in student.state_dict().items()}))
    first, second = (det.build(s, export=True) for s in states)
    export_location(first, (3, *TILE), tmp_path / "r0c0.onnx")
    assert export_like(tmp_path / "r0c0.onnx", first, second, tmp_path / "r0c1.onnx")
    for state, name in zip(states, ("r0c0", "r0c1"), strict=True):
        assert compare_with_eager(det.build(state), tmp_path / f"{name}.onnx", (3, *TILE)) < 1e-5


def _tiny_stfpm_config(tmp: Path, **model: Any) -> Path:
    import yaml

    from tilead.demo.synthetic import SyntheticSpec, generate

    data = generate(tmp / "data", SyntheticSpec(image_size=160, train_good=8, test_good=2, test_per_defect=1, seed=3))
    cfg = {
        "name": "tiny_stfpm",
        "data": {"format": "mvtec", "root": str(data)},
        "grid": {"tile_size": 96, "stride": 64},
        "model": {"family": "stfpm", "epochs": 2, "batch_size": 4, "blur_sigma": 1.0, "patience": 1, **model},
        "train": {"threads": 1},
        "postprocess": {"weights": "feather"},
        "validation": {"force": True},  # fewer test images than validation.min_images
    }
    path = tmp / "tiny_stfpm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.integration
def test_train_export_predict_end_to_end_with_parity(tmp_path: Path) -> None:
    """Tiny synthetic STFPM run -> bundle -> Predictor vs the eager ensemble: 1e-4 on normalized maps, same labels."""
    import json

    from tilead.exporter.bundle import export_bundle
    from tilead.runtime import Predictor
    from tilead.trainer.config import load_config
    from tilead.trainer.data import discover
    from tilead.trainer.eager import load_eager_ensemble
    from tilead.trainer.evaluation import evaluate
    from tilead.trainer.images import ImageLoader
    from tilead.trainer.pipeline import train

    cfg = load_config(_tiny_stfpm_config(tmp_path))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.fitted_now == 4
    assert not (tmp_path / "run" / "partial").exists()  # progress removed once the checkpoints exist
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["family"] == "stfpm"
    assert run["model"]["reduction"] == "product"
    bundle = export_bundle(result.paths.root, tmp_path / "bundle", progress=False)
    assert bundle.manifest["model"]["family"] == "stfpm"
    assert bundle.manifest["model"]["detector"] == {
        "stages": ["blocks.1", "blocks.2", "blocks.3"],
        "reduction": "product",
    }
    assert max(bundle.manifest["source"]["parity_onnxruntime_vs_torch"].values()) < 1e-5

    samples = list(discover(cfg.data).test)
    images = np.stack([ImageLoader(cfg.data).load_image(s) for s in samples])
    _, eager = load_eager_ensemble(result.paths.root).predict(images)
    with Predictor(bundle.bundle) as predictor:
        got = predictor.predict(list(images))
    assert isinstance(got, list)
    maps = np.stack([r.anomaly_map for r in got])
    assert np.abs(maps - eager.maps).max() <= 1e-4
    assert [r.label for r in got] == eager.labels.tolist()
    via_bundle = evaluate(result.paths.root, bundle=bundle.bundle, progress=False).metrics["metrics"]
    via_torch = evaluate(result.paths.root, progress=False).metrics["metrics"]
    assert "image_auroc_detector_score" not in via_torch  # STFPM has no image score of its own
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"):
        assert via_bundle[key] == pytest.approx(via_torch[key], abs=1e-3), key


@pytest.mark.integration
def test_training_resumes_per_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilead.trainer.config import load_config
    from tilead.trainer.pipeline import train

    cfg = load_config(_tiny_stfpm_config(tmp_path, epochs=1, patience=0))
    fitted: list[str] = []
    fit = StfpmDetector.fit

    def fit_one_then_stop(self: StfpmDetector, source: Any, holdout: Any, **kw: Any) -> LocationState:
        if fitted:
            raise KeyboardInterrupt  # the second location is interrupted
        fitted.append(source.label)
        return fit(self, source, holdout, **kw)

    monkeypatch.setattr(StfpmDetector, "fit", fit_one_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "locations").iterdir()) == ["r0c0.safetensors"]

    def counting(self: StfpmDetector, source: Any, holdout: Any, **kw: Any) -> LocationState:
        fitted.append(source.label)
        return fit(self, source, holdout, **kw)

    monkeypatch.setattr(StfpmDetector, "fit", counting)
    result = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert result.fitted_now == 3
    assert fitted == ["fit r0c0", "fit r0c1", "fit r1c0", "fit r1c1"]
