"""``tilead-calibrate``: thresholds from images at the line, on real bundles run by the real ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_bundle
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tilead.calibrate import Sample, calibrate, new_stats, score, synthetic_samples
from tilead.cli.calibrate import main
from tilead.runtime import NormalizationStats, Predictor, TileStats
from tilead.runtime.bundle import DIGEST_KEY, manifest_digest, read_manifest
from tilead.thresholds import false_alarm_threshold


def _good(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    level = 90 + 4 * (seed % 7)
    return np.clip(rng.normal(level, 6, (64, 64, 3)), 0, 255).astype(np.uint8)


def _defect(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image = _good(1000 + seed)
    y, x = 8 + 5 * (seed % 6), 10 + 3 * (seed % 9)
    image[y : y + 12, x : x + 12] = 250
    mask = np.zeros((64, 64), bool)
    mask[y : y + 12, x : x + 12] = True
    return image, mask


def _write(folder: Path, images: list[np.ndarray], suffix: str = "") -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        assert cv2.imwrite(str(folder / f"{i:03d}{suffix}.png"), image)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


def _labels(bundle: Path, images: list[np.ndarray]) -> np.ndarray:
    with Predictor(bundle, threads=1) as predictor:
        results = predictor.predict(images)
    assert isinstance(results, list)
    return np.array([r.label for r in results])


def test_good_only_calibration_meets_the_target_and_the_runtime_agrees(bundle: Path) -> None:
    goods = [_good(i) for i in range(40)]
    before = _labels(bundle, goods)
    with Predictor(bundle) as predictor:
        raw_before = [r.raw_score for r in predictor.predict(goods)]  # type: ignore[union-attr]
    old_bytes = (bundle / "manifest.json").read_bytes()
    result = calibrate(bundle, [Sample(f"g{i}", g) for i, g in enumerate(goods)], target_false_alarm=0.05)
    flagged = _labels(bundle, goods)
    # The rates reported are what the Predictor does with the new manifest, and meet the target.
    assert result.after.false_alarm == pytest.approx(flagged.mean())
    assert result.before.false_alarm == pytest.approx(before.mean())
    assert flagged.sum() <= 2  # floor(0.05 * 40) false alarms allowed
    assert result.after.miss is None
    assert result.revision == bundle / "manifest.1.json"
    assert result.revision.read_bytes() == old_bytes
    data = json.loads((bundle / "manifest.json").read_text())
    assert data[DIGEST_KEY] == manifest_digest(data)
    assert data["calibration"]["images"] == {"good": 40, "defective": 0}
    assert data["normalization"]["image_threshold"] == result.new.image_threshold
    # Good images only: the lower ends come from them, the exported upper ends (3.0) are kept.
    assert data["normalization"]["image_range"][1] == 3.0
    assert data["normalization"]["image_range"][0] == pytest.approx(min(raw_before))
    # Independently of the code: the image score is the map max; the threshold leaves <= 2 of 40 above it.
    with Predictor(bundle) as predictor:
        raw = np.array([r.raw_score for r in predictor.predict(goods)])  # type: ignore[union-attr]
    assert (raw > result.new.image_threshold).sum() <= 2
    assert (raw >= result.new.image_threshold).sum() >= 3
    first = (bundle / "manifest.json").read_bytes()
    calibrate(bundle, [Sample(f"g{i}", g) for i, g in enumerate(goods)], target_false_alarm=0.0)
    assert (bundle / "manifest.2.json").read_bytes() == first
    assert not _labels(bundle, goods).any()  # rate 0: none of these good images is flagged


def test_defects_and_masks_give_f1_thresholds_that_separate_them(bundle: Path) -> None:
    goods = [_good(i) for i in range(12)]
    defects = [_defect(i) for i in range(6)]
    result = calibrate(
        bundle,
        [Sample(f"g{i}", g) for i, g in enumerate(goods)],
        [Sample(f"d{i}", image, mask) for i, (image, mask) in enumerate(defects)],
    )
    assert result.rules["image_threshold"].startswith("f1_adaptive")
    assert result.rules["pixel_threshold"].startswith("f1_adaptive over pixels")
    assert result.after.false_alarm == 0.0
    assert result.after.miss == 0.0
    labels = _labels(bundle, goods + [d[0] for d in defects])
    assert not labels[:12].any()
    assert labels[12:].all()
    with Predictor(bundle) as predictor:
        hit = predictor.predict(defects[0][0])
    assert not isinstance(hit, list)
    assert (hit.mask & defects[0][1]).sum() > 0.5 * defects[0][1].sum()
    assert not hit.mask[~defects[0][1]].any() or (hit.mask & ~defects[0][1]).sum() < defects[0][1].sum()


def test_manual_thresholds_are_written_in_raw_units(bundle: Path) -> None:
    goods = [Sample(f"g{i}", _good(i)) for i in range(10)]
    result = calibrate(bundle, goods, image_threshold=2.9, pixel_threshold=-0.25)
    manifest = read_manifest(bundle)
    assert manifest.stats.image_threshold == 2.9
    assert manifest.stats.pixel_threshold == -0.25
    assert manifest.stats.image_range is not None
    assert manifest.stats.image_range[1] >= 2.9
    assert result.rules["image_threshold"] == "manual (raw units)"


def test_refusals_change_nothing(bundle: Path) -> None:
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="3 good images given, fewer than the 10 needed"):
        calibrate(bundle, [Sample(f"g{i}", _good(i)) for i in range(3)])
    with pytest.raises(ValueError, match="target false-alarm rate"):
        calibrate(bundle, [], target_false_alarm=1.0)
    with pytest.raises(ValueError, match=r"image_threshold: expected a number in"):
        calibrate(bundle, [Sample(f"g{i}", _good(i)) for i in range(10)], image_threshold=1e39)
    assert (bundle / "manifest.json").read_bytes() == before
    assert not list(bundle.glob("manifest.*.json"))


def test_tile_and_none_stages_keep_valid_shapes(bundle: Path) -> None:
    with Predictor(bundle) as predictor:
        scored = score(predictor, [Sample(f"g{i}", _good(i)) for i in range(10)], keep_maps=False)
    tile = NormalizationStats("tile", 0.5, 0.6, (0.0, 1.0), (0.1, 0.9), TileStats((1.0,) * 4, (0.0,) * 4, (2.0,) * 4))
    stats, rules = new_stats(tile, scored, target_false_alarm=0.1, pixel_threshold=0.4)
    assert stats.stage == "tile"
    assert stats.tile_stats == tile.tile_stats
    assert stats.pixel_range == (0.0, 1.0)
    assert "kept" in rules["tile_stats"]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] for a 'tile' stage"):
        new_stats(tile, scored, target_false_alarm=0.1, pixel_threshold=3.0)
    none, _ = new_stats(NormalizationStats("none", 1.0, 1.0), scored, target_false_alarm=0.1)
    assert none.stage == "none"
    assert none.image_range is None


@given(
    scores=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60),
    rate=st.floats(0.0, 0.99),
)
def test_false_alarm_threshold_is_the_smallest_data_value_meeting_the_rate(scores: list[float], rate: float) -> None:
    s = np.array(scores, dtype=np.float32)
    t = false_alarm_threshold(s, rate)
    allowed = int(np.floor(rate * s.size))
    assert t in s.tolist()
    assert int((s > t).sum()) <= allowed
    below = s[s < t]
    if below.size:  # any lower data value would flag too many
        assert int((s > below.max()).sum()) > allowed


def test_cli_from_folders_with_torch_and_the_trainer_unimportable(bundle: Path, tmp_path: Path) -> None:
    _write(tmp_path / "good", [_good(i) for i in range(12)])
    defects = [_defect(i) for i in range(4)]
    _write(tmp_path / "defects" / "spot", [d[0] for d in defects])
    _write(tmp_path / "masks" / "spot", [d[1].astype(np.uint8) * 255 for d in defects], suffix="_mask")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm") or name.startswith("tilead.trainer"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from tilead.cli.calibrate import main
        sys.argv = ["tilead-calibrate", {str(bundle)!r}, "--good", {str(tmp_path / "good")!r},
                    "--defects", {str(tmp_path / "defects")!r}, "--masks", {str(tmp_path / "masks")!r}]
        try:
            main()
        except SystemExit as end:
            print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm")
                  or m.startswith("tilead.trainer")))
            raise
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
    assert "misses on defective images:" in proc.stdout
    assert "-> 0.0 %" in proc.stdout
    assert read_manifest(bundle).raw["calibration"]["images"] == {"good": 12, "defective": 4}


def test_cli_errors_are_clear(bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, [str(bundle), "--good", str(tmp_path), "--defects", str(tmp_path)])
    assert out.exit_code == 2
    assert "--defects and --masks go together" in out.output
    _write(tmp_path / "good", [_good(i) for i in range(10)])
    _write(tmp_path / "defects", [_defect(0)[0]])
    (tmp_path / "masks").mkdir()
    out = runner.invoke(
        main, [str(bundle), "--good", str(tmp_path / "good"), "--defects", str(tmp_path / "defects"),
               "--masks", str(tmp_path / "masks")],
    )  # fmt: skip
    assert out.exit_code == 1
    assert "no mask for defective image" in out.output
    out = runner.invoke(main, [str(bundle), "--good", str(tmp_path / "good"), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "dry run" in out.output
    assert not list(bundle.glob("manifest.*.json"))


def test_synthetic_samples_are_deterministic_defects_of_the_good_images() -> None:
    good = [Sample(f"g{i}", _good(i)) for i in range(3)]
    gray = [Sample(f"gray{i}", _good(9 + i)[:, :, 0]) for i in range(2)]
    assert all(s.image.shape == (64, 64) for s in synthetic_samples(gray, seed=0, per_image=2))
    first = synthetic_samples(good, seed=3, per_image=2, tile_size=(32, 32))
    again = synthetic_samples(good, seed=3, per_image=2, tile_size=(32, 32))
    assert len(first) == 6
    for made, same in zip(first, again, strict=True):
        assert made.name == same.name
        assert np.array_equal(made.image, same.image)
        assert made.mask is not None
        assert same.mask is not None
        assert np.array_equal(made.mask, same.mask)
    for k, made in enumerate(first):
        source = good[k // 2]
        assert made.name.startswith(f"{source.name} [synthetic ")
        assert made.image.shape == source.image.shape  # gray stays (H, W)
        assert made.mask is not None
        assert made.mask.shape == source.image.shape[:2]
        assert made.mask.any()
        changed = made.image != source.image
        changed = changed if changed.ndim == 2 else changed.any(axis=-1)
        assert np.array_equal(changed, made.mask)  # exact masks: the changed pixels, nothing else
    other = synthetic_samples(good, seed=4, per_image=2, tile_size=(32, 32))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other, strict=True))


def test_cli_synthetic_defects_replace_real_ones(bundle: Path, tmp_path: Path) -> None:
    _write(tmp_path / "good", [_good(i) for i in range(12)])
    runner = CliRunner()
    out = runner.invoke(
        main, [str(bundle), "--good", str(tmp_path / "good"), "--synthetic", "--synthetic-per-image", "2", "--json"]
    )
    assert out.exit_code == 0, out.output
    calibration = read_manifest(bundle).raw["calibration"]
    assert calibration["images"] == {"good": 12, "defective": 24}
    assert any("synthetic defects: 2 per good image, seed 0" in s for s in calibration["sources"])
    assert calibration["rules"]["image_threshold"].startswith("f1_adaptive")
    out = runner.invoke(
        main, [str(bundle), "--good", str(tmp_path / "good"), "--synthetic", "--defects", str(tmp_path),
               "--masks", str(tmp_path)],
    )  # fmt: skip
    assert out.exit_code == 2
    assert "--synthetic replaces --defects/--masks" in out.output
