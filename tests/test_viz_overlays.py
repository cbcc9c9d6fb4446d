"""Overlay pictures (#19 item 4): full resolution, uncoloured normal regions, outlines, header and footer, no OpenCV."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from tilead.viz.overlays import MIN_SPAN, PRED_RGB, TRUE_RGB, HeatScale, frame, heat_layer, outline, overlay


def _layout(pic: np.ndarray, h: int, w: int) -> tuple[int, int]:
    """(header height, footer height) of an overlay of an ``h x w`` image."""
    assert pic.shape[1] == 2 * w
    head, foot = frame(h, w)
    assert head >= 11
    assert foot >= 11
    assert pic.shape[0] == head + h + foot
    return head, foot


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_normal_regions_stay_uncoloured_and_anomalies_are_coloured() -> None:
    h, w = 90, 120
    image = _image(h, w)
    norm = np.full((h, w), 0.25, dtype=np.float32)  # below the floor (0.3): normal
    norm[20:40, 30:60] = 0.9  # well above the threshold
    pic = overlay(image, norm, np.zeros((h, w), bool), None, "x", output_order="RGB", channel_order="RGB")
    head, _ = _layout(pic, h, w)
    left, right = pic[head : head + h, :w], pic[head : head + h, w:]
    np.testing.assert_array_equal(left, image)  # the plain panel is the image itself
    normal = np.ones((h, w), bool)
    normal[20:40, 30:60] = False
    np.testing.assert_array_equal(right[normal], image[normal])  # not tinted at all
    assert np.abs(right[25:35, 35:55].astype(int) - image[25:35, 35:55]).mean() > 20


def test_heat_fades_in_between_floor_and_threshold() -> None:
    v = np.array([[0.0, 0.3, 0.4, 0.5, 0.8, 1.0, np.nan]], dtype=np.float32)
    rgb, opacity = heat_layer(v, HeatScale(0.3, 0.5, 1.0), alpha=0.6)
    np.testing.assert_allclose(opacity[0], [0.0, 0.0, 0.3, 0.6, 0.6, 0.6, 0.0], atol=1e-6)
    assert rgb[0, 5, 2] < rgb[0, 3, 2]  # darker (less blue, redder) towards the top
    hard = heat_layer(v, HeatScale(0.5, 0.5, 1.0), alpha=1.0)[1]
    np.testing.assert_array_equal(hard[0], [0, 0, 0, 1, 1, 1, 0])


def test_heat_scale_follows_the_map() -> None:
    # Min-max normalization squeezes normal pixels just below 0.5 (bottle: 0.47-0.50): the floor follows them.
    v = np.full((10, 10), 0.48, np.float32)
    v[0, 0] = 0.52
    scale = HeatScale.of(v)
    assert scale == HeatScale(pytest.approx(0.49), 0.5, pytest.approx(0.52))  # type: ignore[arg-type]
    assert heat_layer(v, scale, alpha=0.5)[1][5, 5] == 0.0  # the normal level stays uncoloured
    assert HeatScale.of(np.full((4, 4), 0.7, np.float32)).floor == 0.5  # median above the threshold: hard edge
    assert HeatScale.of(np.zeros((4, 4), np.float32)).top == 0.5 + MIN_SPAN
    assert HeatScale.of(v, floor=0.2).floor == 0.2
    with pytest.raises(ValueError, match="floor"):
        HeatScale.of(v, floor=0.6)


def test_full_resolution_with_small_maps_and_bgr_order() -> None:
    h, w = 120, 160
    image = _image(h, w)  # BGR
    norm = np.zeros((30, 40), np.float32)
    pred = np.zeros((30, 40), bool)
    pred[5:15, 10:30] = True  # upsampled x4: rows 20:60, cols 40:120
    truth = np.zeros((h, w), bool)
    truth[70:110, 20:60] = True
    pic = overlay(image, norm, pred, truth, "a/b.png", score=0.7, label=True)
    head, _ = _layout(pic, h, w)
    np.testing.assert_array_equal(pic[head : head + h, :w], image)  # BGR in, BGR out, not resized
    right = pic[head : head + h, w:]
    assert tuple(right[20, 80]) == PRED_RGB[::-1]  # top edge of the upsampled prediction, BGR
    assert tuple(right[40, 40]) == PRED_RGB[::-1]  # left edge
    assert tuple(right[70, 40]) == TRUE_RGB[::-1]
    np.testing.assert_array_equal(right[40, 80], image[40, 80])  # the inside is not painted
    np.testing.assert_array_equal(right[90, 40], image[90, 40])


def test_header_and_footer_carry_text_and_the_legend_follows_the_truth() -> None:
    h, w = 100, 200
    image = np.zeros((h, w), np.uint8)  # gray input
    norm = np.zeros((h, w), np.float32)
    none = np.zeros((h, w), bool)
    with_truth = overlay(image, norm, none, none, "good/000.png", score=0.2, label=False)
    without = overlay(image, norm, none, None, "good/000.png", score=0.2, label=False)
    head, foot = _layout(with_truth, h, w)
    np.testing.assert_array_equal(with_truth[: head + h], without[: head + h])
    assert (with_truth[-foot:] != without[-foot:]).any()  # the "ground truth" legend entry
    header = with_truth[:head]
    assert (header > 200).any()  # white text on the dark bar
    ok_verdict = overlay(image, norm, none, None, "good/000.png", score=0.2, label=False)[:head]
    ng_verdict = overlay(image, norm, none, None, "good/000.png", score=0.2, label=True)[:head]
    assert (ok_verdict != ng_verdict).any()
    footer = with_truth[-foot:]
    assert len({tuple(p) for p in footer.reshape(-1, 3)}) > 50  # the colour bar's gradient


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"floor": 0.6}, "floor"),
        ({"alpha": 0.0}, "alpha"),
        ({"channel_order": "HSV"}, "channel_order"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        overlay(image, np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), None, "x", **kwargs)  # type: ignore[arg-type]


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"normalized: expected a 2-D"):
        overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8), np.float32), np.zeros((8, 8), bool), None, "x")
    with pytest.raises(ValueError, match=r"expected uint8"):
        overlay(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), None, "x")
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 4\)"):
        overlay(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), None, "x")


@settings(max_examples=60, deadline=None)
@given(mask=arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))), thickness=st.integers(1, 4))
def test_outline_is_the_mask_minus_its_erosion(mask: np.ndarray, thickness: int) -> None:
    # Border pixels: the mask minus its erosion by a (2t+1)^2 square, the image's outside counting as background.
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=thickness, border_value=0)
    np.testing.assert_array_equal(outline(mask, thickness), mask & ~eroded)


def test_outline_thickness_must_be_positive() -> None:
    with pytest.raises(ValueError, match="thickness"):
        outline(np.ones((3, 3), bool), 0)


NO_CV2 = textwrap.dedent(
    """
    import importlib.abc, sys
    import numpy as np

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("cv2", "torch", "torchvision", "timm") or name.startswith("tilead.trainer"):
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    from tilead.viz.overlays import overlay

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    norm = rng.random((16, 24), dtype=np.float32)
    pic = overlay(image, norm, norm > 0.7, norm > 0.8, "d/x.png", score=0.61, label=True, extra="raw 3.2")
    sys.stdout.buffer.write(pic.tobytes())
    """
)


def test_overlays_are_drawn_without_opencv_the_same_as_in_process() -> None:
    # No OpenCV in the drawing: the picture is the same whichever OpenCV (4, 5 or none) is installed.
    proc = subprocess.run([sys.executable, "-c", NO_CV2], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    norm = rng.random((16, 24), dtype=np.float32)
    pic = overlay(image, norm, norm > 0.7, norm > 0.8, "d/x.png", score=0.61, label=True, extra="raw 3.2")
    assert proc.stdout == pic.tobytes()
