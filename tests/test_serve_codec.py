"""The serving codec: request bodies to images, 4xx reasons for bad input, masks as PNG (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilead.serve.codec import (
    ImageSpec,
    RequestError,
    check_length,
    decode_image,
    decode_mask_png_base64,
    mask_png_base64,
    parse_flag,
    result_json,
)

SPEC = ImageSpec(image_size=(24, 32), channels=3, max_body_bytes=1 << 16)


def _encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def _image(h: int = 24, w: int = 32, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_png_decodes_to_the_exact_bgr_pixels() -> None:
    image = _image()
    out = decode_image(_encode(image), SPEC)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)
    assert SPEC.input_order == "BGR"


def test_jpeg_and_gray_bundles() -> None:
    image = _image()
    jpeg = decode_image(_encode(image, ".jpg"), SPEC)
    assert jpeg.shape == (24, 32, 3)
    gray_spec = ImageSpec(image_size=(24, 32), channels=1)
    gray = decode_image(_encode(image), gray_spec)
    assert gray.shape == (24, 32, 1)
    # The PNG decoder's own colour-to-gray conversion rounds differently from cvtColor by at most 1.
    expected = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(gray[:, :, 0].astype(int) - expected).max() <= 1
    assert gray_spec.input_order == "GRAY"
    # A gray PNG sent to a colour bundle becomes 3 equal channels.
    color = decode_image(_encode(image[:, :, 0]), SPEC)
    assert color.shape == (24, 32, 3)
    np.testing.assert_array_equal(color[:, :, 1], image[:, :, 0])


def test_wrong_size_is_422_unless_resizing() -> None:
    body = _encode(_image(20, 32))
    with pytest.raises(RequestError) as info:
        decode_image(body, SPEC)
    assert info.value.status == 422
    assert "20x32" in info.value.reason
    assert "24x32" in info.value.reason
    assert "--resize" in info.value.reason
    resized = ImageSpec(image_size=(24, 32), channels=3, resize=True)
    assert decode_image(body, resized).shape == (20, 32, 3)  # the Predictor resizes it


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 400, "empty body"),
        (b"not an image at all", 400, "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "not a decodable image"),
        (b"x" * ((1 << 16) + 1), 413, "exceeds the limit"),
    ],
)
def test_bad_bodies(body: bytes, status: int, words: str) -> None:
    with pytest.raises(RequestError) as info:
        decode_image(body, SPEC)
    assert info.value.status == status
    assert words in info.value.reason


def test_truncated_png_is_refused() -> None:
    body = _encode(_image())
    with pytest.raises(RequestError) as info:
        decode_image(body[: len(body) // 2], SPEC)
    assert info.value.status == 400


def _decoded_or_error(body: bytes) -> np.ndarray | RequestError:
    try:
        return decode_image(body, SPEC)
    except RequestError as err:
        return err


def _length_error(value: str | None) -> RequestError | None:
    try:
        check_length(value, SPEC)
    except RequestError as err:
        return err
    return None


@given(st.binary(max_size=2048))
def test_any_bytes_give_an_image_or_a_4xx(body: bytes) -> None:
    out = _decoded_or_error(body)
    if isinstance(out, RequestError):
        assert 400 <= out.status < 500
        assert out.reason
    else:
        assert out.shape == (24, 32, 3)
        assert out.dtype == np.uint8


@given(st.one_of(st.none(), st.text(max_size=30), st.integers(-(10**9), 10**9).map(str)))
def test_content_length_parser(value: str | None) -> None:
    err = _length_error(value)
    if err is not None:
        assert err.status in (400, 413)
        assert value is not None
        if err.status == 413:
            assert int(value) > SPEC.max_body_bytes
    else:
        assert value is None or 0 <= int(value) <= SPEC.max_body_bytes


@given(st.text(max_size=12))
def test_flag_parser(value: str) -> None:
    v = value.strip().lower()
    if v in ("", "1", "true", "yes"):
        assert parse_flag(value, "mask") is True
    elif v in ("0", "false", "no"):
        assert parse_flag(value, "mask") is False
    else:
        with pytest.raises(RequestError, match="mask"):
            parse_flag(value, "mask")
    assert parse_flag(None, "mask") is False


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_mask_png_round_trip(h: int, w: int, seed: int) -> None:
    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    np.testing.assert_array_equal(decode_mask_png_base64(mask_png_base64(mask)), mask)


def test_result_json_keeps_floats_exact() -> None:
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = True
    out = result_json(0.1 + 0.2, True, 82.53794860839844, {"predict_ms": 1.23456}, mask)
    assert out["score"] == 0.1 + 0.2
    assert out["raw_score"] == 82.53794860839844
    assert out["label"] is True
    assert out["timings"] == {"predict_ms": 1.235}
    assert out["mask_shape"] == [3, 4]
    np.testing.assert_array_equal(decode_mask_png_base64(out["mask_png"]), mask)
    assert "mask_png" not in result_json(0.0, False, 0.0, {}, None)


BOMB = """
import numpy as np
from tilead.serve.codec import MAX_DECODED_PIXELS, ImageSpec, RequestError, decode_image
import subprocess
import sys

import cv2

side = 8200  # 67.2 Mpx > 64 Mpx, a ~80 KB PNG
assert side * side > MAX_DECODED_PIXELS
ok, data = cv2.imencode(".png", np.zeros((side, side), np.uint8))
try:
    decode_image(data.tobytes(), ImageSpec((side, side), 3, max_body_bytes=1 << 30))
except RequestError as err:
    print("REFUSED", err.status, len(data))
ok, data = cv2.imencode(".png", np.zeros((8000, 8000), np.uint8))
print("DECODED", decode_image(data.tobytes(), ImageSpec((8000, 8000), 1, max_body_bytes=1 << 30)).shape)
"""


def test_a_small_body_declaring_a_huge_image_is_refused() -> None:
    # In a fresh process: OpenCV reads its pixel limit when cv2 is first imported, which the codec arranges.
    proc = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED 400" in proc.stdout
    assert "DECODED (8000, 8000, 1)" in proc.stdout
