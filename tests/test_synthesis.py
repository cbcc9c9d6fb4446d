"""Synthetic defects: determinism, exact masks, kinds, sizes and bad input (property tests)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from tilead.synthesis import KINDS, fractal_noise, perlin_noise, synthesize_defects


@st.composite
def image_sets(draw: st.DrawFn) -> list[np.ndarray]:
    """1-3 random textured uint8 images (8..80 px, 1 or 3 channels, sizes may differ)."""
    n = draw(st.integers(1, 3))
    channels = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = draw(st.integers(8, 80)), draw(st.integers(8, 80))
        base = rng.integers(0, 256, size=(h, w, channels))
        smooth = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1)) // 3  # some texture, not constant
        out.append(smooth.astype(np.uint8))
    return out


tiles = st.none() | st.tuples(st.integers(4, 64), st.integers(4, 64))
kind_sets = st.none() | st.lists(st.sampled_from(KINDS), min_size=1, max_size=len(KINDS), unique=True)


@given(images=image_sets(), seed=st.integers(0, 2**32), per_image=st.integers(1, 3), kinds=kind_sets, tile=tiles)
def test_defects_are_deterministic_exact_and_inside(
    images: list[np.ndarray], seed: int, per_image: int, kinds: list[str] | None, tile: tuple[int, int] | None
) -> None:
    before = [im.copy() for im in images]
    first = synthesize_defects(images, seed=seed, per_image=per_image, kinds=kinds, tile_size=tile)
    again = synthesize_defects(images, seed=seed, per_image=per_image, kinds=kinds, tile_size=tile)
    assert all(np.array_equal(a, b) for a, b in zip(images, before, strict=True)), "inputs were modified"
    assert len(first) == len(images) * per_image
    allowed = tuple(kinds) if kinds is not None else KINDS
    for n, (d, e) in enumerate(zip(first, again, strict=True)):
        assert (d.kind, d.area, d.source) == (e.kind, e.area, e.source)
        assert np.array_equal(d.image, e.image)
        assert np.array_equal(d.mask, e.mask)
        assert d.source == n // per_image
        good = images[d.source]
        assert d.image.dtype == np.uint8
        assert d.image.shape == good.shape
        assert d.mask.dtype == np.bool_
        assert d.mask.shape == good.shape[:2]
        assert d.kind in allowed
        assert d.area == int(d.mask.sum()) >= 1
        # Exact: the mask is the set of changed pixels, nothing changes outside it.
        assert np.array_equal(d.mask, np.any(d.image != good, axis=-1))
        assert np.array_equal(d.image[~d.mask], good[~d.mask])


@given(
    images=image_sets(),
    seed=st.integers(0, 2**32),
    lo=st.floats(0.05, 1.0),
    span=st.floats(0.0, 1.0),
    tile=tiles,
)
def test_faint_defects_are_the_same_defects_scaled_down(
    images: list[np.ndarray], seed: int, lo: float, span: float, tile: tuple[int, int] | None
) -> None:
    hi = lo + span * (1.0 - lo)
    full = synthesize_defects(images, seed=seed, per_image=2, tile_size=tile)
    faint = synthesize_defects(images, seed=seed, per_image=2, tile_size=tile, opacity=(lo, hi))
    again = synthesize_defects(images, seed=seed, per_image=2, tile_size=tile, opacity=(lo, hi))
    for f, d, e in zip(faint, full, again, strict=True):
        assert np.array_equal(f.image, e.image)  # deterministic
        assert f.kind == d.kind
        assert np.array_equal(f.mask, np.any(f.image != images[f.source], axis=-1))  # still exact
        assert f.area >= 1
        assert (f.mask <= d.mask).all()  # the same attempt's defect, faded: never a pixel the full one left alone
        good = images[d.source].astype(np.int64)
        change_full = d.image.astype(np.int64) - good
        change_faint = f.image.astype(np.int64) - good
        # Same place, same sign, never stronger: a fainter copy of the full-strength defect.
        assert np.all(np.abs(change_faint) <= np.abs(change_full))
        assert np.all(change_faint * change_full >= 0)


def test_opacity_one_is_the_default_and_lower_opacity_is_fainter() -> None:
    rng = np.random.default_rng(4)
    images = [rng.integers(40, 220, size=(120, 120, 3), dtype=np.uint8) for _ in range(4)]
    base = synthesize_defects(images, seed=2, per_image=3, tile_size=(60, 60))
    same = synthesize_defects(images, seed=2, per_image=3, tile_size=(60, 60), opacity=(1.0, 1.0))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(base, same, strict=True))
    faint = synthesize_defects(images, seed=2, per_image=3, tile_size=(60, 60), opacity=(0.3, 0.3))
    full_change = sum(float(np.abs(d.image.astype(int) - images[d.source]).sum()) for d in base)
    faint_change = sum(float(np.abs(d.image.astype(int) - images[d.source]).sum()) for d in faint)
    assert 0.2 * full_change < faint_change < 0.4 * full_change
    assert all((f.mask <= d.mask).all() for f, d in zip(faint, base, strict=True))


@given(images=image_sets(), seed=st.integers(0, 2**32))
def test_round_robin_produces_every_kind(images: list[np.ndarray], seed: int) -> None:
    per_image = -(-len(KINDS) // len(images))
    kinds = [d.kind for d in synthesize_defects(images, seed=seed, per_image=per_image)]
    assert set(kinds) == set(KINDS)


@given(images=image_sets(), seed=st.integers(0, 2**32), tile=tiles)
def test_scratches_are_at_most_4_px_wide(images: list[np.ndarray], seed: int, tile: tuple[int, int] | None) -> None:
    for d in synthesize_defects(images, seed=seed, per_image=3, kinds=["scratch"], tile_size=tile):
        # A band narrower than 4 px (open) holds no 5x5 block of pixel centres.
        windows = sliding_window_view(np.pad(d.mask, 2), (5, 5))
        assert not windows.all(axis=(2, 3)).any()


def test_scratch_widths_reach_several_pixels() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(60, 200, size=(200, 200, 3), dtype=np.uint8) for _ in range(10)]
    widest = 0
    for d in synthesize_defects(images, seed=5, per_image=3, kinds=["scratch"]):
        blocks = [k for k in range(1, 6) if sliding_window_view(np.pad(d.mask, 3), (k, k)).all(axis=(2, 3)).any()]
        widest = max(widest, max(blocks, default=0))
    assert 2 <= widest <= 4


def test_sizes_span_small_to_large_fraction_of_a_tile() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(300, 300, 3), dtype=np.uint8) for _ in range(20)]
    areas = [d.area for d in synthesize_defects(images, seed=3, per_image=6, tile_size=(150, 150))]
    assert min(areas) <= 30
    assert max(areas) >= 0.1 * 150 * 150


def test_min_fraction_raises_the_smallest_defects() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(300, 300, 3), dtype=np.uint8) for _ in range(10)]
    base = synthesize_defects(images, seed=3, per_image=6, tile_size=(150, 150))
    zero = synthesize_defects(images, seed=3, per_image=6, tile_size=(150, 150), min_fraction=0.0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(base, zero, strict=True))
    large = synthesize_defects(images, seed=3, per_image=6, tile_size=(150, 150), min_fraction=0.3)
    for kind in ("perlin_texture", "cutpaste", "blotch", "spot"):
        small_areas = [d.area for d in base if d.kind == kind]
        large_areas = [d.area for d in large if d.kind == kind]
        assert min(large_areas) > min(small_areas)
        assert np.median(large_areas) > np.median(small_areas)
    for d in large:
        ys, xs = np.nonzero(d.mask)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        if d.kind in ("cutpaste", "spot", "scratch", "scar"):  # whole shapes (unless clipped at the border)
            touches = ys.min() == 0 or xs.min() == 0 or ys.max() == 299 or xs.max() == 299
            assert touches or extent >= 0.3 * 150 * 0.5


def test_other_seed_gives_other_defects() -> None:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(2)]
    a = synthesize_defects(images, seed=0, per_image=2)
    b = synthesize_defects(images, seed=1, per_image=2)
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))


def test_single_image_texture_comes_from_a_transformed_copy() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    defects = synthesize_defects([image], seed=9, per_image=4, kinds=["perlin_texture"])
    assert all(d.area > 0 for d in defects)


@pytest.mark.parametrize("value", [0, 90, 255])
def test_uniform_images_still_get_every_kind(value: int) -> None:
    flat = np.full((32, 32, 3), value, dtype=np.uint8)
    defects = synthesize_defects([flat], seed=0, per_image=len(KINDS))
    assert [d.kind for d in defects] == list(KINDS)
    assert all(d.area == int(np.any(d.image != flat, axis=-1).sum()) >= 1 for d in defects)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"images": []}, ValueError, "expected at least one good image"),
        ({"images": np.zeros((2, 16, 16, 3), np.uint8)}, TypeError, "expected a sequence"),
        ({"images": [np.zeros((16, 16), np.uint8)]}, ValueError, r"images\[0\]: expected uint8 \(H, W, C\)"),
        ({"images": [np.zeros((16, 16, 3), np.float32)]}, ValueError, r"images\[0\]: expected uint8"),
        ({"images": [np.zeros((4, 16, 3), np.uint8)]}, ValueError, r"images\[0\]: expected at least 8x8"),
        (
            {"images": [np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 1), np.uint8)]},
            ValueError,
            r"images\[1\]: 1 channels",
        ),
        ({"images": [[1, 2]]}, TypeError, r"images\[0\]: expected a numpy array"),
        ({"seed": -1}, ValueError, "seed: expected a non-negative integer"),
        ({"seed": 1.5}, ValueError, "seed: expected a non-negative integer"),
        ({"per_image": 0}, ValueError, "per_image: expected a positive integer"),
        ({"kinds": []}, ValueError, "kinds: expected at least one"),
        ({"kinds": ["crack"]}, ValueError, r"kinds: unknown \['crack'\]"),
        ({"kinds": "spot"}, TypeError, "kinds: expected a sequence"),
        ({"kinds": ["spot", "spot"]}, ValueError, "lists a kind twice"),
        ({"tile_size": (0, 5)}, ValueError, "tile_size: expected"),
        ({"tile_size": (5,)}, ValueError, "tile_size: expected"),
        ({"opacity": (0.0, 0.5)}, ValueError, "opacity: expected"),
        ({"opacity": (0.8, 0.5)}, ValueError, "opacity: expected"),
        ({"opacity": (0.5, 1.5)}, ValueError, "opacity: expected"),
        ({"opacity": 0.5}, ValueError, "opacity: expected"),
        ({"min_fraction": 0.6}, ValueError, "min_fraction: expected"),
        ({"min_fraction": -0.1}, ValueError, "min_fraction: expected"),
        ({"opacity": (0.5, float("nan"))}, ValueError, "opacity: expected"),
    ],
)
def test_bad_input_is_named(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args: dict[str, object] = {"images": [np.full((16, 16, 3), 7, np.uint8)], "seed": 0}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        synthesize_defects(**args)  # type: ignore[arg-type]


@given(h=st.integers(1, 40), w=st.integers(1, 40), ry=st.integers(1, 6), rx=st.integers(1, 6), seed=st.integers(0, 999))
def test_perlin_noise_is_bounded_smooth_and_seeded(h: int, w: int, ry: int, rx: int, seed: int) -> None:
    a = perlin_noise((h, w), (ry, rx), np.random.default_rng(seed))
    b = perlin_noise((h, w), (ry, rx), np.random.default_rng(seed))
    assert a.shape == (h, w)
    assert np.array_equal(a, b)
    assert np.all(np.abs(a) <= np.sqrt(0.5) + 1e-9)  # the bound of 2-D gradient noise
    f = fractal_noise((h, w), (ry, rx), np.random.default_rng(seed), octaves=3)
    assert f.shape == (h, w)
    assert np.all(np.isfinite(f))


def test_perlin_noise_is_not_constant_and_rejects_bad_sizes() -> None:
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.std() > 0.05
    with pytest.raises(ValueError, match="expected positive shape and res"):
        perlin_noise((0, 4), (1, 1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 1 octave"):
        fractal_noise((4, 4), (1, 1), np.random.default_rng(0), octaves=0)


def test_synthesis_imports_no_torch_cv2_or_scipy() -> None:
    code = (
        "import sys, tilead.synthesis; "
        "bad = [m for m in ('torch', 'cv2', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@given(
    seed=st.integers(0, 2**32 - 1),
    a=st.floats(1e-3, 1.0),
    largest=st.integers(1, 255),
)
def test_fading_keeps_the_defect_and_at_least_one_changed_pixel(seed: int, a: float, largest: int) -> None:
    """tilead.synthesis.defects._fade: between the good image and the defect, same sign, never empty."""
    from tilead.synthesis.defects import _fade

    rng = np.random.default_rng(seed)
    good = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    change = rng.integers(-largest, largest + 1, good.shape)
    change.flat[rng.integers(good.size)] = largest
    image = np.clip(good.astype(np.int64) + change, 0, 255).astype(np.uint8)
    if not np.any(image != good):
        return  # clipped back onto the good image: no defect to fade
    faded = _fade(good, image, a).astype(np.int64)
    full = image.astype(np.int64) - good
    faint = faded - good
    assert np.any(faint != 0)
    assert np.all(faint * full >= 0)
    assert np.all(np.abs(faint) <= np.abs(full))
    if a * np.abs(full).max() >= 0.5 * (1 + 1e-6):  # the drawn opacity keeps a change: used as drawn
        want = np.clip(np.rint(good + a * full), 0, 255)
        np.testing.assert_array_equal(faded, want)
