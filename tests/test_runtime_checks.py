"""The runtime's input checks, stage timer, device selection and Predictor, message by message.

Every boundary of the runtime reports bad input through ``tilead.runtime._checks``; these tests pin
the whole message (what was expected, what was given), the bounds (inclusive) and the values
returned, so that a check that is loosened, inverted or silenced fails here (issue #16: tests that
bite).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle, reference_location_maps, reference_outputs
from hypothesis import given
from hypothesis import strategies as st

from tilead.runtime import Prediction, Predictor, devices
from tilead.runtime._checks import as_float, as_int, as_pair, check_array, check_mapping, check_shape, describe
from tilead.runtime.image_resize import resize_image, resize_uint8
from tilead.runtime.timing import StageTimes, timed


def exactly(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern accepting exactly ``message``."""
    return "^" + re.escape(message) + "$"


# -- describe ---------------------------------------------------------------------------------------


def test_describe_names_dtype_and_shape_of_arrays() -> None:
    assert describe(np.zeros((2, 3), np.float32)) == "array of dtype float32 and shape (2, 3)"


def test_describe_keeps_short_reprs_and_cuts_long_ones_at_60_characters() -> None:
    assert describe("a" * 58) == "'" + "a" * 58 + "'"  # repr of 60 characters: kept whole
    assert describe("a" * 59) == "'" + "a" * 56 + "..."  # repr of 61 characters: 57 kept + "..."
    assert len(describe(list(range(100)))) == 60


# -- check_array ------------------------------------------------------------------------------------


def test_check_array_returns_the_same_object() -> None:
    a = np.zeros((2, 2), np.float32)
    assert check_array(a, "a", dtypes=[np.float32], ndims=[2]) is a


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ([1.0], {}, "x: expected a numpy array, got [1.0]"),
        (np.zeros((2, 2), np.float64), {}, "x: expected dtype float32 or uint8, got float64"),
        (np.zeros((2,), np.float32), {}, "x: expected 2 or 3 dimensions, got 1 with shape (2,)"),
        (np.zeros((0, 2), np.float32), {}, "x: expected a non-empty array, got shape (0, 2)"),
        (
            np.zeros((3, 4), np.float32)[:, ::2],
            {},
            "x: expected a C-contiguous array, got strides (16, 8) for shape (3, 2) (use numpy.ascontiguousarray)",
        ),
        (np.zeros((2, 2), np.float32), {"writable": True}, None),
    ],
)
def test_check_array_messages(value: object, kwargs: dict[str, bool], message: str | None) -> None:
    if message is None:  # the writable case: make the array read-only
        assert isinstance(value, np.ndarray)
        frozen = value.copy()
        frozen.flags.writeable = False
        value = frozen
        message = "x: expected a writable array, got a read-only one"
    with pytest.raises(ValueError, match=exactly(message)):
        check_array(value, "x", dtypes=[np.float32, np.uint8], ndims=[2, 3], **kwargs)


def test_check_array_switches() -> None:
    empty = np.zeros((0, 2), np.float32)
    assert check_array(empty, "x", dtypes=[np.float32], ndims=[2], nonempty=False) is empty
    strided = np.zeros((3, 4), np.float32)[:, ::2]
    assert check_array(strided, "x", dtypes=[np.float32], ndims=[2], contiguous=False) is strided
    frozen = np.zeros((2, 2), np.float32)
    frozen.flags.writeable = False
    assert check_array(frozen, "x", dtypes=[np.float32], ndims=[2]) is frozen  # writable defaults to False
    writable = np.zeros((2, 2), np.float32)
    assert check_array(writable, "x", dtypes=[np.float32], ndims=[2], writable=True) is writable


def test_check_shape() -> None:
    a = np.zeros((2, 3), np.float32)
    check_shape(a, "a", (2, 3), "(n, w)")
    with pytest.raises(ValueError, match=exactly("a: expected shape (3, 2) (n, w), got (2, 3)")):
        check_shape(a, "a", (3, 2), "(n, w)")


# -- as_int / as_pair / as_float ----------------------------------------------------------------------


@given(st.integers(-1000, 1000), st.integers(-1000, 1000), st.integers(-1000, 1000))
def test_as_int_bounds_are_inclusive(value: int, low: int, high: int) -> None:
    if low <= value <= high:
        assert as_int(value, "n", minimum=low, maximum=high) == value
        assert as_int(np.int64(value), "n", minimum=low, maximum=high) == value
        assert type(as_int(np.int64(value), "n", minimum=low)) is int
    elif value < low:
        with pytest.raises(ValueError, match=exactly(f"n: expected an integer >= {low}, got {value}")):
            as_int(value, "n", minimum=low, maximum=high)
    else:
        with pytest.raises(ValueError, match=exactly(f"n: expected an integer <= {high}, got {value}")):
            as_int(value, "n", minimum=low, maximum=high)


def test_as_int_defaults_and_refusals() -> None:
    assert as_int(1, "n") == 1
    assert as_int(10**30, "n") == 10**30  # no maximum by default
    with pytest.raises(ValueError, match=exactly("n: expected an integer >= 1, got 0")):
        as_int(0, "n")
    for bad, shown in ((True, "True"), (2.0, "2.0"), ("3", "'3'"), (None, "None")):
        with pytest.raises(ValueError, match=exactly(f"n: expected an integer >= 1, got {shown}")):
            as_int(bad, "n")


def test_as_pair() -> None:
    assert as_pair(4, "s") == (4, 4)
    assert as_pair((2, 3), "s") == (2, 3)
    assert as_pair([2, 3], "s") == (2, 3)
    assert as_pair(np.array([2, 3]), "s") == (2, 3)
    assert as_pair((0, 5), "s", minimum=0, maximum=5) == (0, 5)
    prefix = "s: expected an integer or a pair of integers (height, width), got "
    with pytest.raises(ValueError, match=exactly(prefix + "'ab'")):
        as_pair("ab", "s")
    with pytest.raises(ValueError, match=exactly(prefix + "b'ab'")):
        as_pair(b"ab", "s")
    with pytest.raises(ValueError, match=exactly(prefix + "array of dtype int64 and shape (1, 2)")):
        as_pair(np.array([[2, 3]], np.int64), "s")
    with pytest.raises(ValueError, match=exactly(prefix + "3 values")):
        as_pair((1, 2, 3), "s")
    with pytest.raises(ValueError, match=exactly("s[1]: expected an integer <= 5, got 6")):
        as_pair((5, 6), "s", maximum=5)
    with pytest.raises(ValueError, match=exactly("s[0]: expected an integer >= 2, got 1")):
        as_pair((1, 6), "s", minimum=2)
    with pytest.raises(ValueError, match=exactly("s: expected an integer <= 5, got 6")):
        as_pair(6, "s", maximum=5)


@given(st.floats(-10, 10), st.floats(-10, 10), st.floats(-10, 10))
def test_as_float_bounds_are_inclusive(value: float, low: float, high: float) -> None:
    if low <= value <= high:
        assert as_float(value, "v", low=low, high=high) == value
    else:
        message = f"v: expected a number in [{low:g}, {high:g}], got {value:g}"
        with pytest.raises(ValueError, match=exactly(message)):
            as_float(value, "v", low=low, high=high)


def test_as_float_refusals_and_open_bounds() -> None:
    assert as_float(3, "v") == 3.0
    assert type(as_float(3, "v")) is float
    assert as_float(np.float32(0.5), "v") == 0.5
    assert as_float(-1e300, "v", high=0.0) == -1e300
    assert as_float(1e300, "v", low=0.0) == 1e300
    with pytest.raises(ValueError, match=exactly("v: expected a number in [-inf, 0], got 1")):
        as_float(1.0, "v", high=0.0)
    with pytest.raises(ValueError, match=exactly("v: expected a number in [0, inf], got -1")):
        as_float(-1.0, "v", low=0.0)
    for bad, shown in ((True, "True"), ("1", "'1'"), (None, "None"), (1j, "1j")):
        with pytest.raises(ValueError, match=exactly(f"v: expected a number, got {shown}")):
            as_float(bad, "v")
    for bad_float in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=exactly(f"v: expected a finite number, got {bad_float}")):
            as_float(bad_float, "v")


# -- check_mapping ----------------------------------------------------------------------------------


def test_check_mapping() -> None:
    data = {"a": 1}
    assert check_mapping(data, "m", ("a", "b"), ("a",)) is data
    with pytest.raises(ValueError, match=exactly("m: expected a mapping with keys a, b, got [1]")):
        check_mapping([1], "m", ("a", "b"))
    with pytest.raises(ValueError, match=exactly("m: unknown keys ['c', 'd']; allowed keys are a, b")):
        check_mapping({"d": 1, "c": 2, "a": 3}, "m", ("a", "b"))
    with pytest.raises(ValueError, match=exactly("m: missing keys ['b']")):
        check_mapping({"a": 1}, "m", ("a", "b"), ("a", "b"))


# -- timing -----------------------------------------------------------------------------------------


def test_stage_times_accumulate_in_first_seen_order_and_total_by_prefix() -> None:
    t = StageTimes()
    t.add("predict.infer", 1.5)
    t.add("tile", 0.25)
    t.add("predict.infer", 0.5)
    t.add("predict.untile", 1.0)
    assert list(t.seconds) == ["predict.infer", "tile", "predict.untile"]
    assert t.seconds == {"predict.infer": 2.0, "tile": 0.25, "predict.untile": 1.0}
    assert t.total("predict.") == 3.0
    assert t.total() == 3.25
    assert t.total("none") == 0.0


def test_stage_context_times_the_block_also_when_it_raises() -> None:
    t = StageTimes()
    with t.stage("sleep"):
        time.sleep(0.02)
    assert 0.02 <= t.seconds["sleep"] < 5.0

    def failing_stage() -> None:
        with t.stage("fail"):
            time.sleep(0.01)
            raise KeyError("x")

    with pytest.raises(KeyError):
        failing_stage()
    assert 0.01 <= t.seconds["fail"] < 5.0
    with timed(t, "sleep"):
        time.sleep(0.01)
    assert t.seconds["sleep"] >= 0.03
    with timed(None, "ignored"):
        pass
    assert "ignored" not in t.seconds


# -- devices ----------------------------------------------------------------------------------------


def test_kernel_family() -> None:
    from tilead import _kernels

    assert devices.kernel_family("cpu") is _kernels
    with pytest.raises(ValueError, match=exactly("device: expected one of cpu, cuda, got 'tpu'")):
        devices.kernel_family("tpu")
    status = devices.cuda_status()
    if status.usable:
        assert devices.kernel_family("cuda") is _kernels.cuda
    elif not status.built:
        with pytest.raises(RuntimeError, match="was built without CUDA"):
            devices.kernel_family("cuda")
    else:
        with pytest.raises(
            RuntimeError, match=exactly(f"device='cuda' but no CUDA device is usable on this machine: {status.error}")
        ):
            devices.kernel_family("cuda")


def test_cuda_status_agrees_with_the_extension() -> None:
    from tilead import _kernels

    status = devices.cuda_status()
    count, error = _kernels.cuda.device_count()
    assert status.built is bool(_kernels.cuda.is_built())
    assert status.device_count == count
    assert status.error == error
    assert status.architectures == _kernels.cuda.architectures()
    assert len(status.devices) == (count if status.built else 0)
    assert status.usable is (status.built and count > 0)


def test_num_threads_round_trip() -> None:
    before = devices.get_num_threads()
    try:
        devices.set_num_threads(1)
        assert devices.get_num_threads() == 1
        devices.set_num_threads(2)
        assert devices.get_num_threads() == 2
    finally:
        devices.set_num_threads(before)
    assert devices.get_num_threads() == before


# -- Predictor: arguments, input checks and results against the NumPy reference ---------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2-location bundle of real ONNX models (tests/bundle_factory.py), image stage."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


def test_predictor_matches_the_numpy_reference(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    images[1, 10:30, 20:50] = 255  # a bright defect: a high score
    want_maps, want_raw, want_scores = reference_outputs(images, swap_rb=True)  # BGR input, RGB model
    with Predictor(tiny_bundle, threads=1, max_batch=2) as predictor:
        assert predictor.image_size == (64, 64)
        assert predictor.channels == 3
        assert predictor.device_memory_bytes is None
        assert predictor.providers == ["CPUExecutionProvider"]
        got = predictor.predict(images)
        assert isinstance(got, list)
        assert len(got) == 3
        for i, p in enumerate(got):
            np.testing.assert_allclose(p.anomaly_map, want_maps[i], atol=2e-5)
            assert p.anomaly_map.shape == (64, 64)
            assert p.anomaly_map.dtype == np.float32
            np.testing.assert_array_equal(p.mask, p.anomaly_map > 0.5)
            assert p.raw_score == pytest.approx(want_raw[i], abs=2e-5)
            assert p.score == pytest.approx(want_scores[i], abs=2e-5)
            assert p.label is bool(want_scores[i] > 0.5)
            assert p.error is None
            assert p.finite
        rgb = predictor.predict(images[0, :, :, ::-1].copy(), input_order="RGB")
        assert isinstance(rgb, Prediction)
        np.testing.assert_array_equal(rgb.anomaly_map, got[0].anomaly_map)
        want_rgb_maps, _, _ = reference_outputs(images[:1], swap_rb=False)
        as_rgb = predictor.predict(images[0], input_order="RGB")
        assert isinstance(as_rgb, Prediction)
        np.testing.assert_allclose(as_rgb.anomaly_map, want_rgb_maps[0], atol=2e-5)
        # Location maps: what the models output, before merging.
        maps = predictor.location_maps(list(images[:3]))
        want_loc = reference_location_maps(images, swap_rb=True)
        assert maps.shape == (4, 3, 5, 5)
        assert maps.dtype == np.float32
        np.testing.assert_allclose(maps, want_loc, atol=2e-5)
        maps2, scores = predictor.location_outputs(images[1])
        assert scores is None
        np.testing.assert_array_equal(maps2, maps[:, 1:2])
        times_results, times = predictor.predict_timed(images)
        for a, b in zip(times_results, got, strict=True):
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert {"input", "tile", "inference", "untile", "normalize"} <= set(times.seconds)
        predictor.warmup(2)
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        predictor.predict(images[0])
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        _ = predictor.providers
    predictor.close()  # twice is fine


def test_predictor_gray_images_on_a_color_bundle_are_repeated(tiny_bundle: Path) -> None:
    gray = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    color = np.repeat(gray[:, :, None], 3, axis=2)
    with Predictor(tiny_bundle, threads=1) as predictor:
        a = predictor.predict(gray)
        b = predictor.predict(gray[:, :, None])
        c = predictor.predict(color, input_order="RGB")
        assert isinstance(a, Prediction)
        assert isinstance(b, Prediction)
        assert isinstance(c, Prediction)
        np.testing.assert_array_equal(a.anomaly_map, c.anomaly_map)
        np.testing.assert_array_equal(b.anomaly_map, c.anomaly_map)


def test_predictor_resize_uses_the_runtime_resize(tiny_bundle: Path) -> None:
    big = np.random.default_rng(5).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    with Predictor(tiny_bundle, threads=1) as predictor:
        got = predictor.predict(big, resize=True, map_size="bundle")  # maps at the bundle's canvas
        want = predictor.predict(resize_image(big, (64, 64)))  # training's resize (area when shrinking)
        assert isinstance(got, Prediction)
        assert isinstance(want, Prediction)
        np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)
        assert got.score == want.score


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("abc", "images: expected a numpy array or a list of arrays, got 'abc'"),
        (b"abc", "images: expected a numpy array or a list of arrays, got b'abc'"),
        (7, "images: expected a numpy array or a list of arrays, got 7"),
        ([], "images: the list is empty; expected at least one image"),
        (
            np.zeros((64,), np.uint8),
            "images: expected (H, W), (H, W, C) or (n, H, W, C), got array of dtype uint8 and shape (64,)",
        ),
        (
            np.zeros((1, 1, 64, 64, 3), np.uint8),
            "images: expected (H, W), (H, W, C) or (n, H, W, C), got array of dtype uint8 and shape (1, 1, 64, 64, 3)",
        ),
        ([np.zeros((64, 64, 3), np.uint8), [1]], "images[1]: expected a numpy array, got [1]"),
        ([np.zeros((64, 64, 3), np.float32)], "images[0]: expected dtype uint8, got float32"),
        (
            [np.zeros((64, 64, 2), np.uint8)],
            "images[0]: expected (H, W), (H, W, 1) or (H, W, 3), got shape (64, 64, 2)",
        ),
        (
            [np.zeros((2, 64, 64, 3), np.uint8)],
            "images[0]: expected (H, W), (H, W, 1) or (H, W, 3), got shape (2, 64, 64, 3)",
        ),
        (
            np.zeros((2, 64, 48, 3), np.uint8),
            "images[0]: expected image size 64x64 (height x width, the bundle's image_size), got 64x48; "
            "pass resize=True to resize",
        ),
    ],
)
def test_predictor_input_messages(tiny_bundle: Path, images: object, message: str) -> None:
    with Predictor(tiny_bundle, threads=1) as predictor, pytest.raises(ValueError, match=exactly(message)):
        predictor.predict(images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device: expected 'cpu' or 'cuda', got 'tpu'"),
        ({"max_batch": 0}, "max_batch: expected a positive integer, got 0"),
        ({"max_batch": 2.0}, "max_batch: expected a positive integer, got 2.0"),
        ({"threads": 0}, "threads: expected a positive integer or None, got 0"),
        ({"threads": True}, "threads: expected a positive integer or None, got True"),
        ({"location_workers": 1.5}, "location_workers: expected a positive integer or None, got 1.5"),
    ],
)
def test_predictor_argument_messages(tiny_bundle: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        Predictor(tiny_bundle, **kwargs)  # type: ignore[arg-type]


def test_predictor_threads_and_workers(tiny_bundle: Path) -> None:
    with Predictor(tiny_bundle, threads=3, location_workers=1) as predictor:
        assert (predictor.threads, predictor.location_workers) == (3, 1)
    with Predictor(tiny_bundle, threads=3) as predictor:
        assert (predictor.threads, predictor.location_workers) == (3, 3)  # CPU default: min(locations, threads)
    with Predictor(tiny_bundle, threads=2, location_workers=2) as predictor:
        assert (predictor.threads, predictor.location_workers) == (2, 2)
        pool = getattr(predictor._backend, "_pool", None)
        assert pool is not None
        assert pool._max_workers == 2
        assert pool._thread_name_prefix == "tilead-location"
        assert predictor.backend == "onnxruntime"
        assert predictor.device == "cpu"
        assert predictor.max_batch == 8
        assert predictor.path == tiny_bundle


def test_prediction_repr_and_finite() -> None:
    p = Prediction(0.25, False, np.zeros((2, 3), np.float32), np.array([[True, False, True]] * 2), 1.5)
    assert repr(p) == (
        "Prediction(score=0.2500, label=OK, raw_score=1.5, anomaly_map=<float32 2x3>, mask=<bool 2x3> (4 anomalous))"
    )
    assert p.finite
    bad = Prediction(1.0, True, np.zeros((1, 1), np.float32), np.ones((1, 1), bool), float("nan"), "broken")
    assert repr(bad) == (
        "Prediction(score=1.0000, label=NG, raw_score=nan, anomaly_map=<float32 1x1>, mask=<bool 1x1> (1 anomalous), "
        "error='broken')"
    )
    assert not bad.finite


def test_location_outputs_concatenate_the_detector_scores_of_every_chunk(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "det", detector=True)
    images = np.random.default_rng(9).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    want = reference_location_maps(images, swap_rb=True)
    with Predictor(bundle, threads=1, max_batch=2) as predictor:  # chunks of 2 and 1 images
        maps, scores = predictor.location_outputs(images)
        assert scores is not None
        assert scores.shape == (4, 3)
        np.testing.assert_allclose(maps, want, atol=2e-5)
        np.testing.assert_allclose(scores, want.max(axis=(2, 3)), atol=2e-5)  # the models' score: the map's max
        rgb_maps, _ = predictor.location_outputs(images, input_order="RGB")
        np.testing.assert_allclose(rgb_maps, reference_location_maps(images, swap_rb=False), atol=2e-5)
        np.testing.assert_array_equal(predictor.location_maps(images, input_order="RGB"), rgb_maps)


def test_resizing_is_opt_in_everywhere(tiny_bundle: Path) -> None:
    small = np.zeros((48, 64, 3), np.uint8)
    message = "images[0]: expected image size 64x64 (height x width, the bundle's image_size), got 48x64; "
    with Predictor(tiny_bundle, threads=1) as predictor:
        for call in (predictor.predict, predictor.predict_timed, predictor.location_maps, predictor.location_outputs):
            with pytest.raises(ValueError, match="^" + re.escape(message)):
                call(small)
        resized, _ = predictor.predict_timed(small, resize=True)
        assert resized[0].anomaly_map.shape == (48, 64)  # back at the input's size (#19)
        canvas, _ = predictor.predict_timed(small, resize=True, map_size="bundle")
        assert canvas[0].anomaly_map.shape == (64, 64)
        assert predictor.location_maps(small, resize=True).shape == (4, 1, 5, 5)


def test_warmup_predicts_a_blank_image_iterations_times(tiny_bundle: Path) -> None:
    class Counting(Predictor):
        """Counts the calls to the real predict."""

        calls: list[tuple[tuple[int, ...], str]]

        def predict(
            self, images: Any, *, input_order: Any = "BGR", resize: bool = False, map_size: Any = "input"
        ) -> Any:
            self.calls.append((tuple(images.shape), input_order))
            assert not images.any()
            return super().predict(images, input_order=input_order, resize=resize, map_size=map_size)

    predictor = Counting(tiny_bundle, threads=1)
    try:
        predictor.calls = []
        predictor.warmup()
        assert predictor.calls == [((64, 64, 3), "BGR")]
        predictor.warmup(3)
        assert len(predictor.calls) == 4
    finally:
        predictor.close()


def test_small_api_contracts() -> None:
    from tilead.runtime import SeamSmoothing, TileGrid, backends
    from tilead.runtime.geometry import parse_location

    assert backends.names() == ("auto", "onnxruntime", "openvino", "tensorrt", "hybrid")
    assert SeamSmoothing(3.0, 0.25).to_dict() == {"sigma": 3.0, "width": 0.25}
    ints = SeamSmoothing(3, 1)  # stored as the checked floats
    assert type(ints.sigma) is float
    assert type(ints.width) is float
    assert SeamSmoothing.from_dict({"sigma": 1, "width": 0.5}) == SeamSmoothing(1.0, 0.5)
    with pytest.raises(ValueError, match=exactly("seam: unknown keys ['radius']; allowed keys are sigma, width")):
        SeamSmoothing.from_dict({"radius": 1})
    grid = TileGrid((64, 100), 40, 24)
    assert list(grid) == [(r, c) for r in range(2) for c in range(4)]
    assert len(grid) == 8
    with pytest.raises(ValueError, match=exactly("location name: expected 'r<row>c<col>' such as 'r0c1', got 'x1'")):
        parse_location("x1")
    with pytest.raises(ValueError, match=exactly("location name: expected 'r<row>c<col>' such as 'r0c1', got 3")):
        parse_location(3)  # type: ignore[arg-type]


def test_onnxruntime_sessions_get_the_documented_settings(tiny_bundle: Path) -> None:
    from tilead.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from tilead.runtime.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    models = [(tiny_bundle / loc.file).read_bytes() for loc in manifest.locations]
    backend = OnnxRuntimeBackend(manifest, models, ["CPUExecutionProvider"], threads=5, location_workers=2)
    try:
        assert (backend.threads, backend.location_workers) == (5, 2)
        assert backend._sessions is not None
        options = backend._sessions[0].get_session_options()
        assert options.intra_op_num_threads == 2  # 5 threads over 2 location workers
        assert options.inter_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert backend._pool is not None
    finally:
        backend.close()
    assert backend._sessions is None
    assert backend._pool is None
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        backend.infer(np.zeros((4, 1, 3, 40, 40), np.float32))
    with pytest.raises(RuntimeError, match=r"^Predictor is closed$"):
        _ = backend.providers
    one = OnnxRuntimeBackend(manifest, models, ["CPUExecutionProvider"], threads=1, location_workers=0)
    try:
        assert one.location_workers == 1
        assert one._pool is None
        assert one._sessions is not None
        assert one._sessions[0].get_session_options().intra_op_num_threads == 1
    finally:
        one.close()
    many = OnnxRuntimeBackend(manifest, models, ["CPUExecutionProvider"], threads=2, location_workers=9)
    try:
        assert many.location_workers == 4  # at most one worker per location
        assert many._sessions is not None
        assert many._sessions[0].get_session_options().intra_op_num_threads == 1  # never 0
    finally:
        many.close()


def test_describe_engine_sets_and_preprocessing_dicts() -> None:
    from tilead.runtime.engines import EngineSet, describe_sets
    from tilead.runtime.preprocess import Preprocessing

    a = EngineSet("k1", "GPU A", "9.0", "11.4.0", "fp16", (1, 2, 4), 256, True, None, ())
    b = EngineSet("k2", "GPU B", "8.6", "10.13.0", "fp32", (1, 1, 1), 0, False, None, ())
    assert describe_sets([]) == "none"
    assert describe_sets({}) == "none"
    want = "k1 (GPU A, sm 9.0, TensorRT 11.4.0, fp16); k2 (GPU B, sm 8.6, TensorRT 10.13.0, fp32)"
    assert describe_sets([a, b]) == want
    assert describe_sets({"x": a, "y": b}) == want
    prep = Preprocessing(mean=(0.5,), std=(0.25,), channels=1, color_order="BGR", dtype="float16")
    assert prep.to_dict() == {"mean": [0.5], "std": [0.25], "channels": 1, "color_order": "BGR", "dtype": "float16"}
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_backend_registry_resolution() -> None:
    from tilead.runtime import backends

    assert backends.DEFAULT == "onnxruntime"
    assert backends.resolve("auto", "cpu") is backends.REGISTRY["onnxruntime"]
    assert backends.resolve("auto", "cuda") is backends.REGISTRY["onnxruntime"]
    assert backends.resolve("openvino", "cpu").module == "tilead.runtime.backends.openvino"
    assert backends.REGISTRY["tensorrt"].reads_onnx is False
    assert backends.REGISTRY["onnxruntime"].reads_onnx is True
    assert backends.REGISTRY["onnxruntime"].devices == ("cpu", "cuda")
    names = "'auto', 'onnxruntime', 'openvino', 'tensorrt', 'hybrid'"
    with pytest.raises(ValueError, match=exactly(f"backend: expected one of {names}, got 'ort'")):
        backends.resolve("ort", "cpu")
    with pytest.raises(ValueError, match=exactly(f"backend: expected one of {names}, got 3")):
        backends.resolve(3, "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=exactly("backend='tensorrt' runs on device='cuda', got device='cpu'")):
        backends.resolve("tensorrt", "cpu")
    with pytest.raises(
        ValueError, match=exactly("backend='onnxruntime' runs on device='cpu' or 'cuda', got device='tpu'")
    ):
        backends.resolve("auto", "tpu")


def test_run_locations_gathers_and_checks_every_output(tiny_bundle: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tilead.runtime import BundleError
    from tilead.runtime.backends.base import default_location_workers, run_locations
    from tilead.runtime.bundle import read_manifest

    assert default_location_workers("cpu", 4, 2) == 2
    assert default_location_workers("cpu", 3, 8) == 3
    assert default_location_workers("cuda", 4, 8) == 1
    manifest = read_manifest(tiny_bundle)
    tiles = np.arange(4 * 2 * 3 * 40 * 40, dtype=np.float32).reshape(4, 2, 3, 40, 40)

    def one(index: int, location_tiles: np.ndarray) -> list[np.ndarray]:
        assert location_tiles.shape == (2, 3, 40, 40)
        return [np.full((2, 1, 5, 5), index + location_tiles[0, 0, 0, 0] / 1e6, np.float32)]

    timer = StageTimes()
    maps, scores = run_locations(manifest, tiles, one, None, timer)
    assert scores is None
    assert maps.shape == (4, 2, 5, 5)
    for i in range(4):
        assert np.all(maps[i] == np.float32(i + tiles[i, 0, 0, 0, 0] / 1e6))
    assert list(timer.seconds) == ["inference", "location:r0c0", "location:r0c1", "location:r1c0", "location:r1c1"]
    # Run one after another, each location's time is a part of the inference wall time.
    assert sum(v for k, v in timer.seconds.items() if k.startswith("location:")) <= timer.seconds["inference"]
    with ThreadPoolExecutor(2) as pool:
        pooled, _ = run_locations(manifest, tiles, one, pool, None)
    np.testing.assert_array_equal(pooled, maps)
    with pytest.raises(
        BundleError, match=exactly("location r0c0: model output shape (2, 5, 5), the manifest promises (2, 1, 5, 5)")
    ):
        run_locations(manifest, tiles, lambda i, t: [np.zeros((2, 5, 5), np.float32)], None, None)
    detector = read_manifest(make_bundle(tmp_path / "det", detector=True))
    maps, scores = run_locations(
        detector, tiles, lambda i, t: [np.zeros((2, 1, 5, 5), np.float32), np.array([i, -i], np.float32)], None, None
    )
    assert scores is not None
    np.testing.assert_array_equal(scores, [[0, 0], [1, -1], [2, -2], [3, -3]])
    with pytest.raises(
        BundleError, match=exactly("location r0c0: model output 'score' has shape (2, 1), expected (2,)")
    ):
        run_locations(
            detector, tiles, lambda i, t: [np.zeros((2, 1, 5, 5), np.float32), np.zeros((2, 1), np.float32)], None, None
        )


def test_resize_uint8_takes_strided_images_and_names_the_argument() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    strided = image[:, ::-1]  # a view with a negative stride
    np.testing.assert_array_equal(
        resize_uint8(strided, (10, 15)), resize_uint8(np.ascontiguousarray(strided), (10, 15))
    )
    with pytest.raises(ValueError, match=exactly("image: expected dtype uint8, got float32")):
        resize_uint8(image.astype(np.float32), (10, 15))
    with pytest.raises(ValueError, match=exactly("image: expected 3 dimensions, got 2 with shape (20, 30)")):
        resize_uint8(image[:, :, 0], (10, 15))
