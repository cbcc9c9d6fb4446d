"""The one post-processing object (issue #15 item 2): built from a manifest or a config, one "off", one C++ spec.

Covers :class:`tilead.runtime.PostProcessor`, the seam parser
:func:`tilead.runtime.parse_seam`, the extension's spec objects
(``tilead._kernels.SeamSpec``, ``NormSpec``, ``PostSpec``), the one sigma
limit and the Gaussian taps of the shared header.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference
from bundle_factory import make_bundle, manifest_data
from hypothesis import given
from hypothesis import strategies as st

from tilead import _kernels
from tilead.runtime import (
    NormalizationStats,
    PostProcessor,
    SeamSmoothing,
    TileGrid,
    TileStats,
    merge_maps,
    parse_seam,
    postprocess_maps,
    smooth_seams,
)
from tilead.runtime.bundle import parse_manifest
from tilead.runtime.postprocess import MAX_SEAM_SIGMA
from tilead.runtime.timing import StageTimes

GRID = TileGrid(64, 40, 24)  # 2x2 locations, as bundle_factory.GRID
RNG = np.random.default_rng(15)


def _stats(stage: str) -> NormalizationStats:
    if stage == "none":
        return NormalizationStats("none", 1.0, 1.5)
    if stage == "tile":
        tile = TileStats((0.5, 0.6, 0.7, 0.8), (0.0, 0.1, 0.2, 0.3), (1.0, 1.1, 1.3, 1.7))
        return NormalizationStats("tile", 0.5, 0.8, (0.0, 1.0), (0.3, 1.5), tile)
    return NormalizationStats("image", 1.0, 1.5, (-2.5, 3.0), (-2.5, 3.0))


def _maps(n: int = 2) -> np.ndarray:
    return RNG.normal(0.5, 0.4, size=(GRID.num_locations, n, 5, 5)).astype(np.float32)


# -- built from a manifest or from a config: the same object ------------------------------------------------------


@pytest.mark.parametrize("stage", ["image", "tile", "none"])
@pytest.mark.parametrize(
    ("weights", "seam", "image_score"),
    [
        ("feather", {"sigma": 2.0, "width": 0.1}, "max"),
        ("uniform", {"sigma": 3.5, "width": 0.25}, "detector"),
        ("uniform", {"sigma": 0.0, "width": 0.1}, "max"),  # the YAML spelling of "off"
        ("feather", {"sigma": 2.0, "width": 0.0}, "max"),
    ],
)
def test_from_manifest_and_from_config_agree(
    tmp_path: Path, stage: str, weights: str, seam: dict[str, float], image_score: str
) -> None:
    from tilead.trainer.config import PostprocessConfig

    stats = _stats(stage)
    section = {"weights": weights, "seam": seam, "normalization": stage, "image_score": image_score}
    from_config = PostProcessor.from_config(section, GRID, stats)
    trainer = PostprocessConfig.model_validate(section).processor(
        GRID, stats
    )  # what export, eager and evaluation build
    assert trainer == from_config
    # What the exporter writes, read back as the Predictor reads it.
    make_bundle(tmp_path, detector=image_score == "detector")
    data = manifest_data(tmp_path, detector=image_score == "detector")
    data["postprocess"] = from_config.manifest_section()
    data["normalization"] = stats.to_dict()
    from_manifest = PostProcessor.from_manifest(parse_manifest(data))
    assert from_manifest == from_config
    assert from_manifest.native() == from_config.native()
    maps = _maps()
    a_merged, a = from_manifest.apply(maps)
    b_merged, b = from_config.apply(maps)
    np.testing.assert_array_equal(a_merged, b_merged)
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_apply_is_the_stage_functions_with_the_objects_settings() -> None:
    seam = SeamSmoothing(2.0, 0.2)
    for stage in ("image", "tile", "none"):
        stats = _stats(stage)
        post = PostProcessor(GRID, "feather", seam, stats)
        maps = _maps(3)
        timer = StageTimes()
        merged, got = post.apply(maps, timer=timer)
        want_merged, want = postprocess_maps(maps, GRID, stats, weights="feather", seam=seam)
        np.testing.assert_array_equal(merged, want_merged)
        for field in ("maps", "masks", "raw_scores", "scores", "labels"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert list(timer.seconds) == ["untile", "seam", "crop", "normalize"]
        np.testing.assert_array_equal(post.normalize(post.merge(maps)).maps, want.maps)


def test_a_predictor_and_the_tensorrt_spec_come_from_the_bundles_manifest(tmp_path: Path) -> None:
    from tilead.runtime import Predictor

    make_bundle(tmp_path)
    with Predictor(tmp_path) as predictor:
        assert predictor.post == PostProcessor.from_manifest(predictor.manifest)
        assert predictor.post.seam is None  # the factory bundle's seam is null
        assert predictor.post.weights == "feather"
        images = RNG.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        results = predictor.predict(images)
        maps, _ = predictor.location_outputs(images)
    _, want = predictor.post.apply(maps)
    assert isinstance(results, list)
    np.testing.assert_array_equal(np.stack([r.anomaly_map for r in results]), want.maps)


# -- one meaning of "off" -------------------------------------------------------------------------------------------


def test_off_is_none_in_every_path(tmp_path: Path) -> None:
    from tilead.trainer.config import PostprocessConfig

    for nothing in (None, {"sigma": 0}, {"width": 0}, {"sigma": 0.0, "width": 0.0}):
        assert parse_seam(nothing) is None
    assert parse_seam({}) == SeamSmoothing(2.0, 0.1)  # defaults fill what is not given
    assert PostProcessor(GRID, seam=SeamSmoothing(0.0, 0.1)).seam is None  # stored as the one "off"
    assert PostProcessor(GRID, seam=SeamSmoothing(2.0, 0.0)).manifest_section()["seam"] is None
    cfg = PostprocessConfig(seam={"sigma": 0.0})
    assert cfg.seam_smoothing() is None
    assert cfg.processor(GRID).seam is None
    # A manifest that writes "off" with a zero sigma reads as None too.
    make_bundle(tmp_path)
    data = manifest_data(tmp_path)
    data["postprocess"]["seam"] = {"sigma": 0.0, "width": 0.1}
    assert parse_manifest(data).seam is None
    # The functions: None is off (never "the defaults"), and zero settings smooth nothing.
    canvas = RNG.random((2, 64, 64), dtype=np.float32)
    copy = smooth_seams(canvas, GRID, None)
    assert copy is not canvas
    np.testing.assert_array_equal(copy, canvas)
    assert smooth_seams(canvas, GRID, None, inplace=True) is canvas
    np.testing.assert_array_equal(smooth_seams(canvas, GRID, SeamSmoothing(0.0, 0.3)), canvas)
    maps = _maps()
    timer = StageTimes()
    off = merge_maps(maps, GRID, seam=None, timer=timer)
    assert "seam" not in timer.seconds
    np.testing.assert_array_equal(off, merge_maps(maps, GRID, seam=SeamSmoothing(0.0, 0.1)))
    assert np.abs(off - merge_maps(maps, GRID, seam=SeamSmoothing(2.0, 0.1))).max() > 1e-3  # on changes the maps
    # The C++ spec: off is SeamSpec.off(), and every zero setting skips the kernel.
    spec = PostProcessor(GRID, stats=_stats("image")).native()
    assert spec.seam == _kernels.SeamSpec.off()
    assert not spec.seam.enabled
    for seam in (_kernels.SeamSpec.off(), _kernels.SeamSpec(0.0, 0.5), _kernels.SeamSpec(2.0, 0.0)):
        out = canvas.copy()
        _kernels.smooth_seams(out, GRID.native, seam)
        np.testing.assert_array_equal(out, canvas)


def test_smooth_seams_refuses_what_is_not_settings() -> None:
    canvas = np.zeros((1, 64, 64), np.float32)
    with pytest.raises(ValueError, match=r"seam: expected SeamSmoothing or None \(off\), got \{'sigma': 2\}"):
        smooth_seams(canvas, GRID, {"sigma": 2})  # type: ignore[arg-type]


# -- the seam parser: a property test over plain data ---------------------------------------------------------------

_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 40),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(0, 2), max_size=2),
)
_SEAM_DATA = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["sigma", "width", "radius", "Sigma"]), _VALUES, max_size=3),
    st.fixed_dictionaries({"sigma": st.floats(0.0, 20.0), "width": st.floats(0.0, 1.5)}),
    st.lists(st.floats(), max_size=2),
    st.text(max_size=4),
    st.integers(),
)


def _valid_number(value: object, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and 0.0 <= float(value) <= high
    )


@given(_SEAM_DATA)
def test_parse_seam_accepts_exactly_the_valid_settings_and_names_what_is_wrong(data: Any) -> None:
    """Oracle: a mapping with keys sigma/width only, each a finite real in [0, 15.8] / [0, 1]; zero means off."""
    valid = data is None or (
        isinstance(data, dict)
        and set(data) <= {"sigma", "width"}
        and _valid_number(data.get("sigma", 2.0), 15.8)
        and _valid_number(data.get("width", 0.1), 1.0)
    )
    if not valid:
        with pytest.raises(ValueError, match=r"^seam"):
            parse_seam(data)
        return
    got = parse_seam(data)
    if data is None or float(data.get("sigma", 2.0)) == 0.0 or float(data.get("width", 0.1)) == 0.0:
        assert got is None
        return
    assert got is not None
    assert got.enabled
    assert (got.sigma, got.width) == (float(data.get("sigma", 2.0)), float(data.get("width", 0.1)))
    spec = got.native  # the C++ constructor accepts whatever the parser accepted
    assert (spec.sigma, spec.width) == (np.float32(got.sigma), np.float32(got.width))
    assert parse_seam(got.to_dict()) == got  # round trip through plain data


@given(
    st.dictionaries(
        st.sampled_from(["weights", "seam", "normalization", "image_score", "blur"]),
        st.one_of(
            st.sampled_from(["uniform", "feather", "image", "tile", "none", "max", "detector", "mean"]),
            st.none(),
            st.integers(-1, 3),
            st.fixed_dictionaries({"sigma": st.floats(0.0, 17.0)}),
        ),
        max_size=5,
    )
)
def test_from_config_builds_or_names_the_key(section: dict[str, Any]) -> None:
    """Oracle: known keys only, each value one of its allowed ones (seam: None or a mapping of a valid sigma)."""
    allowed = {
        "weights": ("uniform", "feather"),
        "normalization": ("image", "tile", "none"),
        "image_score": ("max", "detector"),
    }
    seam = section.get("seam", {})
    valid = (
        set(section) <= {*allowed, "seam"}
        and all(section[k] in v for k, v in allowed.items() if k in section)
        and (seam is None or (isinstance(seam, dict) and _valid_number(seam.get("sigma", 2.0), 15.8)))
    )
    if not valid:
        with pytest.raises(ValueError, match=r"^(postprocess|weights|image_score)"):
            PostProcessor.from_config(section, GRID)
        return
    post = PostProcessor.from_config(section, GRID)
    assert post.weights == section.get("weights", "uniform")
    assert post.image_score == section.get("image_score", "max")
    assert post.seam == parse_seam(seam)


def test_postprocessor_names_bad_values() -> None:
    stats = _stats("image")
    cases: list[tuple[Any, str]] = [
        (lambda: PostProcessor((64, 40, 24)), r"grid: expected a TileGrid"),  # type: ignore[arg-type]
        (lambda: PostProcessor(GRID, "mean"), r"weights: expected 'uniform' or 'feather', got 'mean'"),  # type: ignore[arg-type]
        (lambda: PostProcessor(GRID, seam={"sigma": 2}), r"seam: expected SeamSmoothing or None"),  # type: ignore[arg-type]
        (lambda: PostProcessor(GRID, stats=stats.to_dict()), r"stats: expected NormalizationStats or None"),  # type: ignore[arg-type]
        (lambda: PostProcessor(GRID, image_score="mean"), r"image_score: expected 'max' or 'detector'"),  # type: ignore[arg-type]
        (
            lambda: PostProcessor(TileGrid(64, 32, 16), stats=_stats("tile")),
            r"stats.tile_stats: expected 9 values \(one per location of the 3x3 grid\), got 4",
        ),
        (
            lambda: PostProcessor.from_config({"normalization": "tile"}, GRID, stats),
            r"stats: stage 'image', but the config's postprocess.normalization is 'tile'",
        ),
        (lambda: PostProcessor.from_config({"blur": 1}, GRID), r"postprocess: unknown keys \['blur'\]"),
        (lambda: PostProcessor.from_config({"seam": {"sigma": 16}}, GRID), r"postprocess.seam.sigma: expected"),
        (lambda: PostProcessor(GRID).native(), r"no normalization statistics yet"),
        (lambda: PostProcessor(GRID).apply(_maps()), r"no normalization statistics yet"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_validation_takes_a_postprocessor_without_statistics() -> None:
    from tilead.trainer.validation import compute_stats

    maps = _maps(3)
    masks = np.zeros((3, 64, 64), bool)
    labels = np.zeros(3, bool)
    with pytest.raises(ValueError, match="expected a PostProcessor without them"):
        compute_stats(maps, masks, labels, PostProcessor(GRID, stats=_stats("image")), stage="image", good_quantile=0.9)
    seam = SeamSmoothing(2.0, 0.1)
    stats, _ = compute_stats(
        maps, masks, labels, PostProcessor(GRID, "feather", seam), stage="image", good_quantile=0.9
    )
    merged = merge_maps(maps, GRID, weights="feather", seam=seam)
    assert stats.pixel_range == (float(merged.min()), float(merged.max()))  # merged with the object's settings


# -- one sigma limit, one computation of the taps (cpp_ext/include/tilead/seam.h) -----------------------------------


def test_the_sigma_limit_is_the_headers() -> None:
    assert MAX_SEAM_SIGMA == _kernels.MAX_SEAM_SIGMA == 15.8
    assert int(4 * MAX_SEAM_SIGMA + 0.5) <= _kernels.MAX_GAUSSIAN_RADIUS
    above = float(np.nextafter(MAX_SEAM_SIGMA, math.inf))
    assert SeamSmoothing(MAX_SEAM_SIGMA).native.sigma == np.float32(MAX_SEAM_SIGMA)
    with pytest.raises(ValueError, match=r"seam.sigma: expected a number in \[0, 15.8\]"):
        SeamSmoothing(above)
    with pytest.raises(ValueError, match=r"seam sigma: expected a number in \[0, 15.8\]"):
        _kernels.SeamSpec(15.81, 0.1)
    # The largest sigma runs, and matches the NumPy oracle (radius 63, reflected across the whole canvas).
    grid = TileGrid(160, 80)
    canvas = RNG.random((1, 160, 160), dtype=np.float32)
    got = smooth_seams(canvas, grid, SeamSmoothing(MAX_SEAM_SIGMA, 0.25))
    want = reference.smooth_seams(canvas, (160, 160), (80, 80), (80, 80), "shift", MAX_SEAM_SIGMA, 0.25)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0, 4.5, 15.8])
def test_gaussian_taps_come_from_the_shared_header(sigma: float) -> None:
    taps = np.asarray(_kernels.gaussian_taps(sigma), dtype=np.float64)
    radius = int(4.0 * np.float32(sigma) + 0.5)
    assert taps.shape == (2 * radius + 1,)
    np.testing.assert_array_equal(taps, taps[::-1])  # symmetric
    assert abs(taps.sum() - 1.0) < 1e-6
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    s = float(np.float32(sigma))  # the kernels take sigma as float32
    want = np.exp(-(x**2) / (2.0 * s * s))
    np.testing.assert_allclose(taps, (want / want.sum()).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, -1.0, 16.0, math.nan])
def test_gaussian_taps_refuse_sigmas_outside_the_limit(sigma: float) -> None:
    with pytest.raises(ValueError, match=r"sigma: expected a number in \(0, 15.8\]"):
        _kernels.gaussian_taps(sigma)


# -- the C++ spec: what crosses the binding -------------------------------------------------------------------------


def test_native_spec_round_trip() -> None:
    stats = _stats("tile")
    post = PostProcessor(GRID, "feather", SeamSmoothing(2.5, 0.15), stats)
    spec = post.native()
    assert spec.weights == _kernels.BLEND_FEATHER
    assert stats.tile_stats is not None
    t, lo, hi = (np.asarray(v, np.float64) for v in stats.tile_stats.as_tuple())
    assert spec.loc_threshold == t.astype(np.float32).tolist()
    assert spec.loc_scale == (1.0 / (hi - lo)).astype(np.float32).tolist()
    assert (spec.seam.sigma, spec.seam.width) == (np.float32(2.5), np.float32(0.15))
    norm = spec.norm
    assert norm.mode == _kernels.NORM_MINMAX
    assert (norm.pixel_threshold, norm.pixel_min, norm.pixel_max) == (0.5, 0.0, 1.0)
    assert (norm.image_threshold, norm.image_min, norm.image_max) == (np.float32(0.8), np.float32(0.3), 1.5)
    assert spec == post.native()  # equal specs compare equal
    assert spec != PostProcessor(GRID, "uniform", SeamSmoothing(2.5, 0.15), stats).native()
    for value in (spec.seam, spec.norm):
        assert pickle.loads(pickle.dumps(value)) == value
    raw = PostProcessor(GRID, stats=_stats("none")).native()
    assert (raw.weights, raw.loc_threshold, raw.norm.mode) == (_kernels.BLEND_UNIFORM, [], _kernels.NORM_NONE)
    assert "PostSpec(weights=1, locations=4" in repr(spec)


def test_the_device_pipeline_and_its_stand_in_take_one_post_spec() -> None:
    import fake_tensorrt

    spec = PostProcessor(GRID, "feather", SeamSmoothing(2.0, 0.1), _stats("tile")).native()
    pipe = fake_tensorrt.FakePipeline(GRID.native, 2, 3, 3, [1.0] * 3, [0.0] * 3, 5, 5, spec)
    assert pipe.post == spec
    # The binding checks the spec against the grid before any CUDA call (so on every build, GPU or not).
    norm = PostProcessor(GRID, "feather", None, _stats("image")).native().norm
    three = _kernels.PostSpec(0, [0.5] * 3, [1.0] * 3, _kernels.SeamSpec.off(), norm)
    with pytest.raises(
        ValueError, match=r"post: expected per-location normalization for 4 locations \(or none\), got 3"
    ):
        _kernels.cuda.DevicePipeline(GRID.native, 1, 3, 3, [1.0] * 3, [0.0] * 3, 5, 5, three)
    with pytest.raises(TypeError):
        _kernels.cuda.DevicePipeline(GRID.native, 1, 3, 3, [1.0] * 3, [0.0] * 3, 5, 5, 0, [], [], 0.0, 0.0)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _kernels.PostSpec(7, [], [], _kernels.SeamSpec.off(), None), r"incompatible constructor arguments"),  # type: ignore[arg-type]
        (
            lambda: _kernels.PostSpec(3, [], [], _kernels.SeamSpec.off(), _kernels.NormSpec(0, 0, 0, 0, 0, 0, 0)),
            r"weights: expected 0 \(uniform\) or 1 \(feather\), got 3",
        ),
        (
            lambda: _kernels.PostSpec(0, [0.5], [], _kernels.SeamSpec.off(), _kernels.NormSpec(0, 0, 0, 0, 0, 0, 0)),
            r"loc_threshold and loc_scale: expected one value per location each, got 1 and 0",
        ),
        (
            lambda: _kernels.PostSpec(0, [0.5], [0.0], _kernels.SeamSpec.off(), _kernels.NormSpec(0, 0, 0, 0, 0, 0, 0)),
            r"positive scale, location 0 has 0.5 and 0",
        ),
        (lambda: _kernels.NormSpec(1, 0.5, 0, 1, 0.5, 1, 1), r"image_max must be greater than image_min"),
        (lambda: _kernels.NormSpec(0, math.inf, 0, 0, 0, 0, 0), r"norm: expected finite thresholds and ranges"),
    ],
)
def test_spec_constructors_name_what_is_wrong(make: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()
