"""Area resize (issue #19 item 3): the runtime resizes as training does, OpenCV's INTER_AREA bit for bit."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import reference as ref
from bundle_factory import make_bundle
from hypothesis import given
from hypothesis import strategies as st

from tilead import _kernels
from tilead.runtime import Prediction, Predictor, cuda_status
from tilead.runtime.image_resize import resize_image, resize_uint8
from tilead.trainer.data import DataConfig
from tilead.trainer.images import ImageLoader

STATUS = cuda_status()


@st.composite
def shrinks(draw: st.DrawFn, max_size: int = 90) -> tuple[int, int, int, int, int]:
    """``(H, W, C, out_h, out_w)`` with out <= in; a third of the cases with whole-number factors."""
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    if draw(st.integers(0, 2)) == 0:
        fy, fx = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        oh, ow = draw(st.integers(1, max_size // fy)), draw(st.integers(1, max_size // fx))
        return oh * fy, ow * fx, channels, oh, ow
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    return h, w, channels, draw(st.integers(1, h)), draw(st.integers(1, w))


def _area(images: np.ndarray, size: tuple[int, int], family: object = _kernels) -> np.ndarray:
    out = np.empty((images.shape[0], *size, images.shape[3]), dtype=np.uint8)
    family.resize_area(images, out)  # type: ignore[attr-defined]
    return out


@given(shrinks(), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_area_kernel_matches_the_reference(case: tuple[int, int, int, int, int], n: int, seed: int) -> None:
    h, w, c, oh, ow = case
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    got = _area(images, (oh, ow))
    for i in range(n):
        np.testing.assert_array_equal(got[i], ref.area_resize(images[i], oh, ow))


@given(shrinks(max_size=120), st.integers(0, 2**32 - 1))
def test_area_kernel_is_opencv_inter_area(case: tuple[int, int, int, int, int], seed: int) -> None:
    h, w, c, oh, ow = case
    if c == 2:
        c = 3  # cv2.resize keeps 1, 3 and 4 channels as they are
    image = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    want = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_AREA).reshape(oh, ow, c)
    np.testing.assert_array_equal(_area(image[None], (oh, ow))[0], want)
    np.testing.assert_array_equal(ref.area_resize(image, oh, ow), want)  # the oracle is OpenCV's too


@pytest.mark.parametrize(
    ("size", "out"), [((900, 900), (512, 512)), ((1024, 1024), (512, 512)), ((700, 1000), (256, 333))]
)
def test_camera_sizes_are_opencv_inter_area(size: tuple[int, int], out: tuple[int, int]) -> None:
    image = np.random.default_rng(7).integers(0, 256, (*size, 3), dtype=np.uint8)
    image[100:300, 200:400] = 255  # edges, where rounding differences would show
    want = cv2.resize(image, out[::-1], interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_image(image, out), want)


def test_area_kernel_refuses_bad_arguments() -> None:
    images = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="only shrinks"):
        _kernels.resize_area(images, np.empty((1, 9, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="images: expected dtype uint8"):
        _kernels.resize_area(images.astype(np.float32), np.empty((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 4, 4, 3\)"):
        _kernels.resize_area(images, np.empty((1, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="4 dimensions"):
        _kernels.resize_area(images[0], np.empty((4, 4, 3), np.uint8))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int8])
def test_resize_image_names_a_wrong_dtype(dtype: type) -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_image(np.zeros((8, 8, 3), dtype=dtype), (4, 4))


def test_resize_image_dispatch() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(image, (20, 25)), ref.area_resize(image, 20, 25))
    for size in ((45, 50), (20, 50), (45, 30)):  # growing along either axis: bilinear
        np.testing.assert_array_equal(resize_image(image, size), resize_uint8(image, size))
    same = resize_image(image, (30, 40))
    np.testing.assert_array_equal(same, image)
    assert not np.shares_memory(same, image)
    strided = image[:, ::2]  # not contiguous
    np.testing.assert_array_equal(
        resize_image(strided, (10, 10)), ref.area_resize(np.ascontiguousarray(strided), 10, 10)
    )
    with pytest.raises(ValueError, match="at least 1x1"):
        resize_image(image, (0, 5))


def test_area_resize_allocates_only_its_output() -> None:
    image = np.random.default_rng(0).integers(0, 256, (3000, 2000, 3), dtype=np.uint8)  # 18 MB
    tracemalloc.start()
    try:
        out = resize_image(image, (512, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (512, 512, 3)
    assert peak < out.nbytes + (1 << 16)  # no float copy of the image, no bands


@pytest.mark.gpu
@pytest.mark.skipif(not STATUS.usable, reason=f"no usable CUDA device: {STATUS.error or 'not built'}")
@given(shrinks(max_size=150), st.integers(0, 2**32 - 1))
def test_area_cuda_twin_matches_cpu(case: tuple[int, int, int, int, int], seed: int) -> None:
    h, w, c, oh, ow = case
    images = np.random.default_rng(seed).integers(0, 256, (2, h, w, c), dtype=np.uint8)
    np.testing.assert_array_equal(_area(images, (oh, ow), _kernels.cuda), _area(images, (oh, ow)))


# -- training and the Predictor see the same pixels ------------------------------------------------------


def _one(predictor: Predictor, image: np.ndarray, **kwargs: Any) -> Prediction:
    result = predictor.predict(image, **kwargs)
    assert isinstance(result, Prediction)
    return result


def _camera_images(root: Path) -> list[Path]:
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    paths = []
    for i, (h, w) in enumerate([(90, 100), (128, 128), (64, 64), (150, 70)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 3 : h // 2, w // 4 : w // 2] = 250  # a bright patch the maps see
        path = root / f"{i}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def test_training_loader_and_predictor_resize_give_the_same_raw_scores(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")  # 64x64 image size
    paths = _camera_images(tmp_path / "images")
    loader = ImageLoader(
        DataConfig(format="folder", root=tmp_path / "images", image_size=(64, 64), channel_order="BGR")
    )
    with Predictor(bundle) as predictor:
        for path in paths:
            camera = np.asarray(cv2.imread(str(path)))
            trained_on = loader.load_image(path)  # what the trainer feeds its models
            old = cv2.resize(camera, (64, 64), interpolation=cv2.INTER_AREA)  # what it fed them before #19
            np.testing.assert_array_equal(trained_on, old)
            want = _one(predictor, trained_on, map_size="bundle")
            got = _one(predictor, camera, resize=True, map_size="bundle")
            assert got.raw_score == want.raw_score
            np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)


@pytest.mark.parametrize("stage", ["image", "none"])
def test_maps_and_masks_come_back_at_the_input_size(tmp_path: Path, stage: str) -> None:
    bundle = make_bundle(tmp_path / "bundle", stage=stage)
    image = np.random.default_rng(5).integers(0, 256, (150, 110, 3), dtype=np.uint8)
    image[20:70, 30:90] = 255
    with Predictor(bundle) as predictor:
        small = _one(predictor, image, resize=True, map_size="bundle")
        big = _one(predictor, image, resize=True)
        batch = predictor.predict([image, np.zeros((64, 64, 3), np.uint8)], resize=True)
    assert isinstance(batch, list)
    assert small.anomaly_map.shape == small.mask.shape == (64, 64)
    assert big.anomaly_map.shape == big.mask.shape == (150, 110)
    assert big.mask.dtype == np.bool_
    assert batch[0].anomaly_map.shape == (150, 110)
    assert batch[1].anomaly_map.shape == (64, 64)
    np.testing.assert_array_equal(batch[0].anomaly_map, big.anomaly_map)
    assert (big.score, big.raw_score, big.label) == (small.score, small.raw_score, small.label)
    np.testing.assert_allclose(big.anomaly_map, ref.resize(small.anomaly_map, 150, 110), atol=1e-5)
    threshold = 0.5 if stage == "image" else 1.0  # bundle_factory's pixel threshold for stage none
    np.testing.assert_array_equal(big.mask, big.anomaly_map > threshold)
    assert big.mask.any()
    assert not big.mask.all()
    # The mask at the input size is the bundle-size mask, upsampled: they agree on the mean.
    assert abs(big.mask.mean() - small.mask.mean()) < 0.05


def test_map_size_is_checked(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    with Predictor(bundle) as predictor, pytest.raises(ValueError, match="map_size: expected 'input' or 'bundle'"):
        predictor.predict(np.zeros((64, 64, 3), np.uint8), map_size="canvas")  # type: ignore[arg-type]
