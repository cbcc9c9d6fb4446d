"""Dataset discovery and image loading for the trainer (tilead.trainer.data)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import BOTTLE
from pydantic import ValidationError

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.runtime.image_resize import resize_uint8
from tilead.trainer.data import DataConfig, DatasetError, Sample, UnreadableFileError, discover
from tilead.trainer.images import Batch, ImageLoader, _header_size

H, W = 40, 48
LOGGER = "tilead.trainer.data"
DEFAULT_TYPES = {"good": 2, "scratch": 2, "dent": 1}


# -- fixtures -----------------------------------------------------------------------------------------


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(encoded.tobytes())  # (works for non-ASCII paths too)
    return path


def color(i: int, h: int = H, w: int = W) -> np.ndarray:
    """A BGR image whose B, G, R values are (i, 100, 200)."""
    image = np.empty((h, w, 3), dtype=np.uint8)
    image[...] = (i, 100, 200)
    return image


def rect_mask(h: int = H, w: int = W, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:20, 12:24] = value
    return mask


def make_mvtec(root: Path, *, train: int = 5, types: dict[str, int] | None = None) -> Path:
    """Train images 000..: B = index; test images: B = 50 + index; masks: a 10 x 12 rectangle."""
    for i in range(train):
        write(root / "train" / "good" / f"{i:03d}.png", color(i))
    for kind, n in (types if types is not None else DEFAULT_TYPES).items():
        for i in range(n):
            write(root / "test" / kind / f"{i:03d}.png", color(50 + i))
            if kind != "good":
                write(root / "ground_truth" / kind / f"{i:03d}_mask.png", rect_mask())
    return root


def mvtec(root: Path, **kwargs: Any) -> DataConfig:
    return DataConfig(format="mvtec", root=root, **kwargs)


def unchanged(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return np.asarray(image)


def names(samples: tuple[Sample, ...]) -> list[str]:
    return [f"{s.path.parent.name}/{s.path.name}" for s in samples]


# -- discovery ----------------------------------------------------------------------------------------


def test_discover_mvtec_layout_order_labels_and_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    (root / "train" / "good" / "000.png.bak").write_bytes((root / "train" / "good" / "000.png").read_bytes())
    write(root / "train" / "good" / "._000.png", color(0))  # hidden (macOS metadata): ignored
    splits = discover(mvtec(root))
    assert names(splits.train) == [f"good/{i:03d}.png" for i in range(5)]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in splits.train)
    assert names(splits.test) == ["good/000.png", "good/001.png", "dent/000.png", "scratch/000.png", "scratch/001.png"]
    assert [s.label for s in splits.test] == [0, 0, 1, 1, 1]
    assert [s.defect_type for s in splits.test] == ["good", "good", "dent", "scratch", "scratch"]
    assert [s.mask_path for s in splits.test] == [
        None,
        None,
        root / "ground_truth" / "dent" / "000_mask.png",
        root / "ground_truth" / "scratch" / "000_mask.png",
        root / "ground_truth" / "scratch" / "001_mask.png",
    ]
    assert splits.defect_types == ("dent", "scratch")
    assert discover(mvtec(tmp_path, category="cat")) == splits


def test_discover_folder_layout_with_mask_rule(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write(root / "ok" / "b.png", color(1))
    write(root / "ok" / "a.png", color(0))
    write(root / "ok_test" / "c.jpg", color(2))
    write(root / "defects" / "scratch" / "s2.png", color(3))
    write(root / "defects" / "scratch" / "s1.bmp", color(4))
    write(root / "defects" / "dent" / "d1.PNG", color(5))
    for folder, stem in [("scratch", "s1"), ("scratch", "s2"), ("dent", "d1")]:
        write(root / "masks" / "defects" / folder / f"{stem}_gt.png", rect_mask())
    config = DataConfig(
        format="folder",
        root=root,
        good_dir="ok",
        test_good_dir="ok_test",
        defect_dirs=["defects/scratch", "defects/dent"],
        mask_dir="masks",
        mask_suffix="_gt",
    )
    splits = discover(config)
    assert names(splits.train) == ["ok/a.png", "ok/b.png"]
    assert names(splits.test) == ["ok_test/c.jpg", "dent/d1.PNG", "scratch/s1.bmp", "scratch/s2.png"]
    assert [(s.label, s.defect_type) for s in splits.test] == [(0, "good"), (1, "dent"), (1, "scratch"), (1, "scratch")]
    assert [s.mask_path for s in splits.test] == [
        None,
        root / "masks" / "defects" / "dent" / "d1_gt.png",
        root / "masks" / "defects" / "scratch" / "s1_gt.png",
        root / "masks" / "defects" / "scratch" / "s2_gt.png",
    ]


def test_extensions_are_case_insensitive_and_configurable(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for name in ["a.PNG", "b.JpEg", "c.tif", "d.txt"]:
        path = root / "train" / "good" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    make_mvtec(root, train=0)
    assert names(discover(mvtec(root)).train) == ["good/a.PNG", "good/b.JpEg", "good/c.tif"]
    config = mvtec(root, extensions=["PNG", " .Tif "])
    assert config.extensions == [".png", ".tif"]
    assert names(discover(config).train) == ["good/a.PNG", "good/c.tif"]


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        discover(mvtec(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"dataset root not found: .*bottle \(root .*, category 'bottle'\)"):
        discover(mvtec(tmp_path, category="bottle"))


def test_no_training_images_names_folder_and_extensions(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=0)
    (root / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no training images found in .*train/good \(looked for extensions .png, "):
        discover(mvtec(root))
    with pytest.raises(DatasetError, match=r"training folder .* not found: .*train/good"):
        discover(mvtec(make_mvtec(tmp_path / "ds2", train=0)))


def test_folder_layout_missing_defect_folder(tmp_path: Path) -> None:
    write(tmp_path / "good" / "a.png", color(0))
    config = DataConfig(format="folder", root=tmp_path, defect_dirs=["bad"], missing_masks="empty")
    with pytest.raises(DatasetError, match=r"defect folder \(defect_dirs\) not found: .*bad"):
        discover(config)


def test_missing_mask_is_an_error_naming_image_and_expected_path(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as info:
        discover(mvtec(root))
    message = str(info.value)
    assert f"{root / 'test' / 'scratch' / '001.png'} -> expected mask {root / 'ground_truth/scratch/001_mask.png'}" in (
        message
    )
    assert "1 defective image(s)" in message
    assert "missing_masks: empty" in message


def test_missing_mask_empty_warns_and_loads_all_false(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_mvtec(tmp_path / "ds")
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    splits = discover(mvtec(root, missing_masks="empty"))
    sample = splits.test[-1]
    assert (sample.label, sample.defect_type, sample.mask_path) == (1, "scratch", None)
    assert any("001_mask.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    mask = ImageLoader(mvtec(root, missing_masks="empty")).load_mask(sample)
    assert mask.shape == (H, W)
    assert mask.dtype == np.bool_
    assert not mask.any()


def test_folder_layout_without_mask_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "good" / "a.png", color(0))
    write(tmp_path / "bad" / "x.png", color(1))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    splits = discover(DataConfig(format="folder", root=tmp_path, defect_dirs=["bad"], missing_masks="empty"))
    assert [(s.label, s.defect_type, s.mask_path) for s in splits.test] == [(1, "bad", None)]
    assert any("no mask_dir configured" in r.getMessage() for r in caplog.records)


def test_max_images_evenly_spaced_and_deterministic(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=10)
    config = mvtec(root, max_train_images=4, max_test_images=3)
    splits = discover(config)
    assert names(splits.train) == ["good/000.png", "good/002.png", "good/005.png", "good/007.png"]
    assert names(splits.test) == ["good/000.png", "good/001.png", "scratch/000.png"]
    assert discover(config) == splits
    assert len(discover(mvtec(root, max_train_images=50)).train) == 10


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"format": "voc"}, ["format", "'mvtec' or 'folder'"]),
        ({"imgsize": 256}, ["imgsize", "Extra inputs are not permitted"]),
        ({"color": "bgr"}, ["color", "'rgb' or 'gray'"]),
        ({"channel_order": "rgb"}, ["channel_order", "'BGR' or 'RGB'"]),
        ({"missing_masks": "skip"}, ["missing_masks", "'error' or 'empty'"]),
        ({"image_size": 0}, ["image_size", "positive height and width, got [0, 0]"]),
        ({"image_size": [64, -1]}, ["image_size", "positive height and width, got [64, -1]"]),
        ({"image_size": [1, 2, 3]}, ["image_size", "[height, width] of positive integers, got [1, 2, 3]"]),
        ({"image_size": True}, ["image_size", "got True"]),
        ({"image_size": "256"}, ["image_size", "got '256'"]),
        ({"max_train_images": 0}, ["max_train_images", "greater than 0"]),
        ({"max_test_images": -2}, ["max_test_images", "greater than 0"]),
        ({"extensions": []}, ["extensions", "at least one file extension"]),
        ({"defect_dirs": ["scratch"]}, ["defect_dirs: only used with format 'folder'"]),
        ({"mask_suffix": "_gt"}, ["mask_suffix: only used with format 'folder'"]),
        ({"category": ""}, ["category", "expected a folder name"]),
        ({"format": "folder", "defect_dirs": ["x"]}, ["mask_dir: required with format 'folder'", "missing_masks"]),
        (
            {"format": "folder", "defect_dirs": ["x"], "mask_dir": "m", "category": "c"},
            ["category: only used with format 'mvtec'"],
        ),
        (
            {"format": "folder", "defect_dirs": ["a/scratch", "b/scratch"], "mask_dir": "m"},
            ["defect_dirs: 'a/scratch' and 'b/scratch' both have the defect type 'scratch'"],
        ),
        (
            {"format": "folder", "defect_dirs": ["bad/good"], "mask_dir": "m"},
            ["defect_dirs: 'bad/good' would have the defect type 'good'"],
        ),
        (
            {"format": "folder", "defect_dirs": ["x"], "mask_dir": "m", "test_good_dir": "good/"},
            ["test_good_dir: 'good/' is the training folder good_dir"],
        ),
        (
            {"format": "folder", "defect_dirs": ["x"], "mask_dir": "m", "good_dir": "x"},
            ["good_dir: 'x' is also listed in defect_dirs"],
        ),
    ],
)
def test_bad_config_names_key_and_allowed_values(kwargs: dict[str, Any], expected: list[str]) -> None:
    data: dict[str, Any] = {"format": "mvtec", "root": "data", **kwargs}
    with pytest.raises(ValidationError) as info:
        DataConfig.model_validate(data)
    for text in expected:
        assert text in str(info.value)


def test_config_normalizes_and_round_trips(tmp_path: Path) -> None:
    config = DataConfig.model_validate({"format": "mvtec", "root": "data/mvtec", "image_size": 256})
    assert config.image_size == (256, 256)
    assert config.output_size == (256, 256)
    pair = DataConfig.model_validate({"format": "mvtec", "root": "x", "image_size": [300, 400]})
    assert pair.output_size == (300, 400)
    assert DataConfig(format="mvtec", root=Path("x")).output_size is None
    # A dumped config (every field explicit, defaults included) validates again to the same config.
    folder = DataConfig(format="folder", root=Path("r"), defect_dirs=["a"], mask_dir="m", image_size=(8, 9))
    for cfg in (config, folder):
        assert DataConfig.model_validate_json(cfg.model_dump_json()) == cfg
        assert DataConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValidationError, match="frozen"):
        config.color = "gray"


def test_resolved_joins_relative_roots_only(tmp_path: Path) -> None:
    relative = DataConfig(format="mvtec", root=Path("data/mvtec"), category="bottle")
    resolved = relative.resolved(tmp_path)
    assert resolved.root == tmp_path / "data" / "mvtec"
    assert resolved.dataset_root == tmp_path / "data" / "mvtec" / "bottle"
    assert relative.root == Path("data/mvtec")
    absolute = DataConfig(format="mvtec", root=tmp_path / "abs")
    assert absolute.resolved(Path("/elsewhere")).root == tmp_path / "abs"
    assert DataConfig(format="mvtec", root=Path("~/d")).resolved(tmp_path).root == Path("~/d").expanduser()


# -- loading: pixels ----------------------------------------------------------------------------------


def test_bgr_and_rgb_channel_order(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", color(7))
    bgr = ImageLoader(mvtec(tmp_path)).load_image(path)
    assert bgr.shape == (H, W, 3)
    assert bgr.dtype == np.uint8
    assert bgr.flags.c_contiguous
    assert bgr[0, 0].tolist() == [7, 100, 200]
    rgb = ImageLoader(mvtec(tmp_path, channel_order="RGB")).load_image(str(path))
    assert rgb[5, 9].tolist() == [200, 100, 7]
    assert rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_gray_files_expand_to_three_channels_and_color_files_convert_to_gray(tmp_path: Path) -> None:
    gray_file = write(tmp_path / "g.png", np.full((H, W), 77, dtype=np.uint8))
    color_file = write(tmp_path / "c.png", color(10))
    for order in ("BGR", "RGB"):
        image = ImageLoader(mvtec(tmp_path, channel_order=order)).load_image(gray_file)
        assert image.shape == (H, W, 3)
        assert np.all(image == 77)
    gray = ImageLoader(mvtec(tmp_path, color="gray", channel_order="RGB")).load_image(color_file)
    assert gray.shape == (H, W, 1)
    assert gray.flags.c_contiguous
    assert np.all(gray == round(0.114 * 10 + 0.587 * 100 + 0.299 * 200))  # 120: BGR2GRAY weights
    assert np.all(ImageLoader(mvtec(tmp_path, color="gray")).load_image(gray_file) == 77)


def test_16_bit_images_keep_the_high_byte(tmp_path: Path) -> None:
    image = np.empty((H, W, 3), dtype=np.uint16)
    image[...] = (0x1234, 0xFF00, 0x00FF)
    path = write(tmp_path / "deep.png", image)
    assert unchanged(path).dtype == np.uint16
    assert ImageLoader(mvtec(tmp_path)).load_image(path)[3, 4].tolist() == [0x12, 0xFF, 0x00]
    gray16 = write(tmp_path / "gray16.png", np.full((H, W), 0xABCD, dtype=np.uint16))
    assert np.all(ImageLoader(mvtec(tmp_path, color="gray")).load_image(gray16) == 0xAB)


def test_bgra_images_drop_alpha(tmp_path: Path) -> None:
    image = np.empty((H, W, 4), dtype=np.uint8)
    image[...] = (1, 2, 3, 0)
    path = write(tmp_path / "alpha.png", image)
    assert unchanged(path).shape == (H, W, 4)
    loaded = ImageLoader(mvtec(tmp_path, channel_order="RGB")).load_image(path)
    assert loaded.shape == (H, W, 3)
    assert loaded[0, 0].tolist() == [3, 2, 1]


def test_non_ascii_paths(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "prüfung_画像", train=2)
    splits = discover(mvtec(root))
    assert ImageLoader(mvtec(root)).load_image(splits.train[1])[0, 0].tolist() == [1, 100, 200]


# -- loading: resizing --------------------------------------------------------------------------------


def test_resize_uses_area_for_shrinking_and_linear_for_growing(tmp_path: Path) -> None:
    stripes = np.zeros((8, 16), dtype=np.uint8)
    stripes[:, 3::4] = 255  # every 4th column
    path = write(tmp_path / "stripes.png", stripes)
    small = ImageLoader(mvtec(tmp_path, image_size=(2, 4))).load_image(path)
    assert small.shape == (2, 4, 3)
    assert np.all(small == 64)  # INTER_AREA averages 4x4 blocks: 255 / 4; INTER_LINEAR would give 0
    checker = write(tmp_path / "checker.png", np.array([[0, 255], [255, 0]], dtype=np.uint8))
    big = ImageLoader(mvtec(tmp_path, image_size=(5, 7), color="gray")).load_image(checker)
    # Growing: the runtime's bilinear resize, the one Predictor(resize=True) uses (issue #19).
    linear = resize_uint8(np.array([[0, 255], [255, 0]], dtype=np.uint8)[:, :, None], (5, 7))
    area = cv2.resize(np.array([[0, 255], [255, 0]], dtype=np.uint8), (7, 5), interpolation=cv2.INTER_AREA)
    assert not np.array_equal(linear[:, :, 0], area)  # the check below can tell them apart
    assert big.shape == (5, 7, 1)
    np.testing.assert_array_equal(big, linear)


def test_resize_image_and_mask_to_image_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    splits = discover(mvtec(root))
    sample = splits.test[3]  # scratch/000
    down = ImageLoader(mvtec(root, image_size=(20, 24)))
    image, mask = down.load_sample(sample)
    assert image.shape == (20, 24, 3)
    assert image[0, 0].tolist() == [50, 100, 200]
    expected = np.zeros((20, 24), dtype=bool)
    expected[5:10, 6:12] = True
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(down.load_mask(sample), expected)  # image size read from the header
    np.testing.assert_array_equal(down.load_mask(sample, (H, W, 3)), expected)
    up = ImageLoader(mvtec(root, image_size=80))
    image, mask = up.load_sample(sample)
    assert image.shape == (80, 80, 3)
    expected = np.zeros((80, 80), dtype=bool)
    rows = (np.arange(80) * H) // 80
    cols = (np.arange(80) * W) // 80
    expected[np.ix_((rows >= 10) & (rows < 20), (cols >= 12) & (cols < 24))] = True
    np.testing.assert_array_equal(mask, expected)
    good_mask = up.load_mask(splits.test[0])
    assert good_mask.shape == (80, 80)
    assert not good_mask.any()


def test_native_size_mismatch_names_file_and_both_sizes(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=3)
    write(root / "train" / "good" / "001.png", color(1, h=40, w=50))
    splits = discover(mvtec(root))
    first, odd = splits.train[0].path, splits.train[1].path
    pattern = rf"{odd}: image size 40x50 \(height x width\) differs from 40x48 of {first}"
    with pytest.raises(DatasetError, match=pattern):
        list(ImageLoader(mvtec(root)).iter_batches(splits.train, 2))
    with pytest.raises(DatasetError, match=pattern):
        ImageLoader(mvtec(root)).probe_size(splits.train)
    loader = ImageLoader(mvtec(root))
    loader.load_image(first)
    with pytest.raises(DatasetError, match=pattern):
        loader.load_image(odd)
    resized = ImageLoader(mvtec(root, image_size=(40, 48)))
    assert [b.images.shape for b in resized.iter_batches(splits.train, 3)] == [(3, 40, 48, 3)]


def test_probe_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=3)
    splits = discover(mvtec(root))
    assert ImageLoader(mvtec(root)).probe_size(splits.train) == (H, W)
    ghosts = [Sample(tmp_path / "missing.png", 0, "good", None)]
    assert ImageLoader(mvtec(root, image_size=(12, 34))).probe_size(ghosts) == (12, 34)
    with pytest.raises(UnreadableFileError, match=r"cannot read .*missing.png"):
        ImageLoader(mvtec(root)).probe_size(ghosts)
    tif = write(tmp_path / "x.tif", color(0, h=13, w=17))
    assert ImageLoader(mvtec(root)).probe_size([Sample(tif, 0, "good", None)]) == (13, 17)


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("a.png", [], (37, 53)),
        ("a.jpg", [], (37, 53)),
        ("p.jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], (37, 53)),
        ("a.bmp", [], (37, 53)),
        ("a.tif", [], (37, 53)),
    ],
)
def test_header_size(tmp_path: Path, name: str, params: list[int], expected: tuple[int, int]) -> None:
    path = tmp_path / name
    assert cv2.imwrite(str(path), color(0, h=37, w=53), params)
    assert _header_size(path) == expected


def test_header_size_of_a_non_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"not an image at all")
    assert _header_size(path) is None


# -- loading: bad files -------------------------------------------------------------------------------


def test_corrupt_image_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    bad = root / "train" / "good" / "002.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    empty = root / "train" / "good" / "003.png"
    empty.write_bytes(b"")
    splits = discover(mvtec(root))
    loader = ImageLoader(mvtec(root))
    with pytest.raises(DatasetError, match=rf"cannot read {bad}: not a decodable image"):
        loader.load_image(bad)
    with pytest.raises(DatasetError, match=rf"cannot read {empty}: the file is empty"):
        loader.load_image(empty)
    with pytest.raises(UnreadableFileError, match=rf"cannot read {bad}") as info:
        list(loader.iter_batches(splits.train, 2))
    assert info.value.path == bad
    assert isinstance(info.value, ValueError)


def test_skip_bad_files_skips_and_lists_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_mvtec(tmp_path / "ds")
    bad = root / "train" / "good" / "002.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated
    splits = discover(mvtec(root, skip_bad_files=True))
    loader = ImageLoader(mvtec(root, skip_bad_files=True))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    batches = list(loader.iter_batches(splits.train, 2))
    assert [len(b) for b in batches] == [2, 1, 1]
    assert [int(v) for b in batches for v in b.images[:, 0, 0, 0]] == [0, 1, 3, 4]
    assert [s.path.name for b in batches for s in b.samples] == ["000.png", "001.png", "003.png", "004.png"]
    assert all(b.images.flags.c_contiguous for b in batches)
    assert len(loader.skipped) == 1
    assert loader.skipped[0][0] == bad
    assert f"cannot read {bad}" in loader.skipped[0][1]
    assert [r.levelno for r in caplog.records if str(bad) in r.getMessage()] == [logging.WARNING]
    # Known-bad files are not read again, nor listed twice.
    assert loader.probe_size(splits.train) == (H, W)
    assert len(list(loader.iter_batches(splits.train, 5))) == 1
    assert len(loader.skipped) == 1


def test_batch_of_only_bad_files_is_not_yielded(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=4)
    for name in ("000.png", "001.png"):
        (root / "train" / "good" / name).write_bytes(b"not an image")
    loader = ImageLoader(mvtec(root, skip_bad_files=True))
    batches = list(loader.iter_batches(discover(mvtec(root)).train, 2))
    assert [s.path.name for b in batches for s in b.samples] == ["002.png", "003.png"]
    assert [p.name for p, _ in loader.skipped] == ["000.png", "001.png"]


def test_corrupt_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    splits = discover(mvtec(root))
    with pytest.raises(UnreadableFileError, match=rf"cannot read {mask}"):
        list(ImageLoader(mvtec(root)).iter_batches(splits.test, 2, with_masks=True))
    assert sum(len(b) for b in ImageLoader(mvtec(root)).iter_batches(splits.test, 2)) == 5  # masks not read
    loader = ImageLoader(mvtec(root, skip_bad_files=True))
    kept = [s for b in loader.iter_batches(splits.test, 2, with_masks=True) for s in b.samples]
    assert names(tuple(kept)) == ["good/000.png", "good/001.png", "dent/000.png", "scratch/001.png"]
    assert [p for p, _ in loader.skipped] == [root / "test" / "scratch" / "000.png"]
    assert (
        loader.skipped[0][1]
        == f"cannot read {mask}: not a decodable image (corrupt, truncated or an unsupported format)"
    )


def test_mask_size_mismatch_names_both_files_and_sizes(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    mask = write(root / "ground_truth" / "dent" / "000_mask.png", rect_mask(h=30, w=48))
    image = root / "test" / "dent" / "000.png"
    sample = discover(mvtec(root)).test[2]
    message = rf"mask {mask} is 30x48 \(height x width\) but its image {image} is 40x48"
    for config in (mvtec(root), mvtec(root, image_size=(30, 48)), mvtec(root, skip_bad_files=True)):
        with pytest.raises(DatasetError, match=message):
            ImageLoader(config).load_sample(sample)
    with pytest.raises(DatasetError, match=message):
        list(ImageLoader(mvtec(root, skip_bad_files=True)).iter_batches([sample], 1, with_masks=True))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((0, 255), [False, True]),
        ((100, 200), [False, True]),  # > 127
        ((0, 127), [False, False]),  # not above the threshold
        ((0, 1), [False, True]),  # 0/1 label masks
    ],
)
def test_mask_threshold(tmp_path: Path, values: tuple[int, int], expected: list[bool]) -> None:
    root = make_mvtec(tmp_path / "ds", train=1)
    mask = np.full((H, W), values[0], dtype=np.uint8)
    mask[:, W // 2 :] = values[1]
    write(root / "ground_truth" / "dent" / "000_mask.png", mask)
    loaded = ImageLoader(mvtec(root)).load_mask(discover(mvtec(root)).test[2])
    assert [bool(loaded[0, 0]), bool(loaded[0, -1])] == expected
    assert int(loaded.sum()) == (H * W // 2 if expected[1] else 0)


def test_color_and_16_bit_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=1)
    colored = np.zeros((H, W, 3), dtype=np.uint8)
    colored[10:20, 12:24, 2] = 255  # red
    write(root / "ground_truth" / "dent" / "000_mask.png", colored)
    write(root / "ground_truth" / "scratch" / "000_mask.png", rect_mask().astype(np.uint16) * 257)
    splits = discover(mvtec(root))
    loader = ImageLoader(mvtec(root))
    for sample in (splits.test[2], splits.test[3]):
        np.testing.assert_array_equal(loader.load_mask(sample), rect_mask() > 0)


# -- batches ------------------------------------------------------------------------------------------


def test_iter_batches_order_shapes_and_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds")
    splits = discover(mvtec(root))
    loader = ImageLoader(mvtec(root))
    batches = list(loader.iter_batches(splits.train, 2))
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.images.shape for b in batches] == [(2, H, W, 3), (2, H, W, 3), (1, H, W, 3)]
    assert all(b.images.dtype == np.uint8 and b.images.flags.c_contiguous and b.masks is None for b in batches)
    assert [int(v) for b in batches for v in b.images[:, 0, 0, 0]] == [0, 1, 2, 3, 4]
    assert tuple(s for b in batches for s in b.samples) == splits.train

    test = list(loader.iter_batches(splits.test, 3, with_masks=True))
    assert [len(b) for b in test] == [3, 2]
    masks = np.concatenate([b.masks for b in test if b.masks is not None])
    assert masks.shape == (5, H, W)
    assert masks.dtype == np.bool_
    assert not masks[:2].any()
    for i in (2, 3, 4):
        np.testing.assert_array_equal(masks[i], rect_mask() > 127)
    assert np.concatenate([b.labels for b in test]).tolist() == [0, 0, 1, 1, 1]
    for batch in test:
        for image, sample in zip(batch.images, batch.samples, strict=True):
            np.testing.assert_array_equal(image, loader.load_image(sample))


def test_iter_batches_gray_and_empty(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=3)
    loader = ImageLoader(mvtec(root, color="gray", image_size=(20, 24)))
    (batch,) = loader.iter_batches(discover(mvtec(root)).train, 8)
    assert batch.images.shape == (3, 20, 24, 1)
    assert loader.channels == 1
    assert list(loader.iter_batches([], 4)) == []


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_iter_batches_rejects_bad_batch_size_at_the_call(tmp_path: Path, batch_size: Any) -> None:
    with pytest.raises(ValueError, match=rf"batch_size: expected a positive integer, got {batch_size!r}"):
        ImageLoader(mvtec(tmp_path)).iter_batches([], batch_size)


def test_iter_batches_stops_cleanly_when_abandoned(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=5)
    loader = ImageLoader(mvtec(root))
    batches = loader.iter_batches(discover(mvtec(root)).train, 1)
    first = next(batches)
    assert first.images[0, 0, 0, 0] == 0
    batches.close()  # type: ignore[attr-defined]
    assert not [t for t in threading.enumerate() if t.name.startswith("tilead-data")]


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_mvtec(tmp_path / "ds", train=3)
    samples = discover(mvtec(root)).train
    loader = ImageLoader(mvtec(root))
    assert sum(len(b) for b in loader.iter_batches(samples, 2)) == 3
    assert capsys.readouterr().err == ""
    assert sum(len(b) for b in loader.iter_batches(samples, 2, progress="loading train")) == 3
    err = capsys.readouterr().err
    assert "loading train" in err
    assert "3/3" in err


# -- synthetic and real data --------------------------------------------------------------------------


def test_synthetic_dataset(tmp_path: Path) -> None:
    spec = SyntheticSpec(image_size=64, train_good=2, test_good=1, test_per_defect=1)
    root = generate(tmp_path / "synthetic", spec)
    splits = discover(mvtec(root))
    assert len(splits.train) == 2
    assert [s.defect_type for s in splits.test] == ["good", "scratch", "spot", "stain"]
    loader = ImageLoader(mvtec(root))
    (batch,) = loader.iter_batches(splits.test, 4, with_masks=True)
    assert batch.images.shape == (4, 64, 64, 3)
    assert batch.masks is not None
    assert [bool(m.any()) for m in batch.masks] == [False, True, True, True]


@pytest.mark.integration
@pytest.mark.skipif(not BOTTLE.exists(), reason=f"real data not found at {BOTTLE}")
def test_real_bottle_data() -> None:
    config = mvtec(BOTTLE)
    splits = discover(config)
    assert len(splits.train) == 209
    assert len(splits.test) == 83
    assert sum(s.label == 0 for s in splits.test) == 20
    assert sum(s.label == 1 for s in splits.test) == 63
    assert splits.defect_types == ("broken_large", "broken_small", "contamination")
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in splits.test if s.label == 1)
    loader = ImageLoader(config)
    assert loader.probe_size(splits.test) == (900, 900)
    sample = next(s for s in splits.test if s.defect_type == "broken_large")
    image, mask = loader.load_sample(sample)
    assert image.shape == (900, 900, 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, cv2.imread(str(sample.path), cv2.IMREAD_COLOR))
    assert 0 < mask.mean() < 0.5
    small = ImageLoader(mvtec(BOTTLE, image_size=256, max_test_images=8))
    (batch,) = small.iter_batches(discover(small.config).test, 8, with_masks=True)
    assert batch.images.shape == (8, 256, 256, 3)
    assert batch.masks is not None
    assert [bool(m.any()) for m in batch.masks] == [s.label == 1 for s in batch.samples]


# -- good images only (#17) ---------------------------------------------------------------------------


def test_mvtec_without_test_folder_is_a_good_only_dataset(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=4, types={})
    assert not (root / "test").exists()
    splits = discover(mvtec(root))
    assert names(splits.train) == [f"good/{i:03d}.png" for i in range(4)]
    assert splits.test == ()
    assert splits.defect_types == ()


def test_mvtec_with_only_good_test_images(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "ds", train=3, types={"good": 2})
    splits = discover(mvtec(root))
    assert [s.label for s in splits.test] == [0, 0]


def test_folder_layout_with_good_images_only(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / "ok" / f"{i}.png", color(i))
        write(tmp_path / "later" / f"{i}.png", color(10 + i))
    only_train = discover(DataConfig(format="folder", root=tmp_path, good_dir="ok"))
    assert (len(only_train.train), only_train.test) == (3, ())
    with_test = discover(DataConfig(format="folder", root=tmp_path, good_dir="ok", test_good_dir="later"))
    assert [s.path.parent.name for s in with_test.test] == ["later"] * 3
    assert all(s.label == 0 and s.mask_path is None for s in with_test.test)


def test_empty_defect_folder_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        write(tmp_path / "ok" / f"{i}.png", color(i))
    (tmp_path / "scratch").mkdir()
    cfg = DataConfig(format="folder", root=tmp_path, good_dir="ok", defect_dirs=["scratch"], missing_masks="empty")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        splits = discover(cfg)
    assert splits.test == ()
    assert f"no images in {tmp_path / 'scratch'}" in caplog.text
    assert "good training images only" in caplog.text


def test_good_only_still_needs_training_images(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    with pytest.raises(DatasetError, match="no training images found in"):
        discover(DataConfig(format="folder", root=tmp_path, good_dir="ok"))
