"""tilead.imagefile (issue #15 item 7): Pillow decoding gives the trainer's OpenCV pixels, and clear errors.

The reference is the trainer's own decoding (``tilead.trainer.images``: ``cv2.imdecode`` with
``IMREAD_UNCHANGED``, 16 to 8 bits, alpha dropped, ``COLOR_BGR2GRAY`` for gray runs).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tilead.imagefile import ImageFileError, bgr_to_gray, read_image, resize_nearest
from tilead.trainer.data import DataConfig
from tilead.trainer.images import ImageLoader


def trainer_pixels(path: Path, gray: bool) -> np.ndarray:
    """What the trainer's loader gives for ``path`` (native size, BGR or gray)."""
    config = DataConfig(format="folder", root=path.parent, color="gray" if gray else "rgb", channel_order="BGR")
    image = ImageLoader(config).load_image(str(path))
    return image[:, :, 0] if gray else image


sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))


def _image(draw: st.DrawFn, channels: int, dtype: type = np.uint8) -> np.ndarray:
    h, w = draw(sizes)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return draw(arrays(dtype, shape))


@st.composite
def images(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    channels = draw(st.sampled_from([1, 3, 4]))
    ext = draw(st.sampled_from([".png", ".bmp", ".tif", ".jpg"]))
    if ext in (".bmp", ".jpg") and channels == 4:
        channels = 3
    return _image(draw, channels), ext


@settings(max_examples=60, deadline=None)
@given(case=images(), gray=st.booleans())
def test_pillow_decodes_the_pixels_the_trainer_decodes(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[np.ndarray, str], gray: bool
) -> None:
    pixels, ext = case
    path = tmp_path_factory.mktemp("img") / f"x{ext}"
    assert cv2.imwrite(str(path), pixels)
    expected = trainer_pixels(path, gray)
    got = read_image(path, gray=gray)
    assert got.dtype == np.uint8
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


@st.composite
def gray16(draw: st.DrawFn) -> np.ndarray:
    return _image(draw, 1, np.uint16)


@settings(max_examples=30, deadline=None)
@given(pixels=gray16(), ext=st.sampled_from([".png", ".tif"]), gray=st.booleans())
def test_sixteen_bit_gray_keeps_the_high_byte_as_the_trainer(
    tmp_path_factory: pytest.TempPathFactory, pixels: np.ndarray, ext: str, gray: bool
) -> None:
    path = tmp_path_factory.mktemp("img") / f"x{ext}"
    assert cv2.imwrite(str(path), pixels)
    got = read_image(path, gray=gray)
    np.testing.assert_array_equal(got, trainer_pixels(path, gray))
    np.testing.assert_array_equal(got if gray else got[:, :, 0], (pixels >> 8).astype(np.uint8))


def test_sixteen_bit_colour_png_is_the_trainers_and_tiff_within_one_level(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 65536, (17, 23, 3), dtype=np.uint16)
    for ext, tolerance in ((".png", 0), (".tif", 1)):  # Pillow rounds 16-bit colour TIFF to 8 bits
        path = tmp_path / f"c16{ext}"
        assert cv2.imwrite(str(path), pixels)
        for gray in (False, True):
            diff = np.abs(read_image(path, gray=gray).astype(int) - trainer_pixels(path, gray).astype(int))
            assert diff.max() <= tolerance


@given(bgr=arrays(np.uint8, st.tuples(st.integers(1, 30), st.integers(1, 30), st.just(3))))
def test_bgr_to_gray_is_the_fixed_point_formula_and_within_one_level_of_opencv(bgr: np.ndarray) -> None:
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    exact = 0.114 * b + 0.587 * g + 0.299 * r
    got = bgr_to_gray(bgr)
    # BT.601 luma, rounded; each 14-bit weight is within 0.5/16384 of its real value
    assert np.abs(got - exact).max() <= 0.5 + 3 * 255 * 0.5 / 16384
    assert np.abs(got.astype(int) - cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(int)).max() <= 1


def test_bgr_to_gray_spot_values() -> None:
    bgr = np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 255], [134, 0, 178]]], np.uint8)
    # (4899 R + 9617 G + 1868 B + 8192) >> 14, worked by hand
    np.testing.assert_array_equal(bgr_to_gray(bgr), [[76, 150, 29, 255, 69]])


@given(
    image=arrays(np.uint8, st.tuples(st.integers(1, 50), st.integers(1, 50))),
    size=st.tuples(st.integers(1, 120), st.integers(1, 120)),
)
def test_resize_nearest_is_opencvs_inter_nearest(image: np.ndarray, size: tuple[int, int]) -> None:
    expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize_nearest(image, size), expected)
    mask = image > 127
    np.testing.assert_array_equal(resize_nearest(mask, size), expected > 127)


def test_resize_nearest_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="output size must be positive"):
        resize_nearest(np.zeros((4, 4), np.uint8), (0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        resize_nearest(np.zeros((0, 4), np.uint8), (3, 3))


def test_exif_orientation_is_ignored_as_in_training(tmp_path: Path) -> None:
    pixels = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100)
    got = read_image(path, gray=False)
    assert got.shape == (6, 4, 3)  # as stored, like cv2.IMREAD_UNCHANGED in the trainer
    np.testing.assert_array_equal(got, cv2.imread(str(path), cv2.IMREAD_UNCHANGED))


def test_palette_and_gray_alpha_images(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    palette = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", gray=False), palette[:, :, ::-1])
    la = np.random.default_rng(2).integers(0, 256, (9, 7, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png", gray=True), la[:, :, 0])
    np.testing.assert_array_equal(read_image(tmp_path / "la.png", gray=False), np.repeat(la[:, :, :1], 3, 2))


def test_bad_files_raise_errors_naming_the_file_and_cause(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7).save(good)
    blob = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "float.tif")
    cases = {
        "truncated.png": "cannot decode .*truncated.png",
        "empty.png": "cannot decode .*empty.png: the file is empty",
        "text.png": "cannot decode .*text.png: not an image",
        "missing.png": "cannot read .*missing.png",
        "float.tif": "float.tif: unsupported pixel type 'F'",
    }
    for name, message in cases.items():
        with pytest.raises(ImageFileError, match=message):
            read_image(tmp_path / name, gray=False)
    with pytest.raises(ImageFileError, match="cannot read"):
        read_image(tmp_path, gray=False)
    with pytest.raises(ImageFileError, match=r"32x32 .* more than the 1000 pixels allowed"):
        read_image(good, gray=False, max_pixels=1000)
    assert isinstance(ImageFileError("x"), ValueError)  # callers that catch ValueError keep working


def test_our_pixel_limit_replaces_pillows_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wide.png"
    Image.new("L", (300, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse this file as a bomb
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert read_image(path, gray=True, max_pixels=30_000).shape == (100, 300)
    assert Image.MAX_IMAGE_PIXELS == 1000
