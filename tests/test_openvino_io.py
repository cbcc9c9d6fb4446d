"""OpenVINO backbone calls that read the tiles and write the features in place (issue #21 item 3).

:meth:`tilead.runtime.backends.openvino._Location.run_into` binds C-contiguous tiles and a float32 feature
buffer to the infer request as tensors sharing their memory (:func:`bind_and_infer`): the features must be
those of the copying path, the request must get its own tensors back (it never keeps the caller's memory),
a buffer of the wrong shape is a :class:`~tilead.runtime.bundle.BundleError`, and buffers that cannot be
bound fall back to the copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from bundle_factory import FEATURES, GRID, MAP_SIZE
from test_uint8_tiles import conv_backbone

from tilead.runtime import Preprocessing, TileGrid
from tilead.runtime.backends.openvino import _bindable, compile_backbone
from tilead.runtime.bundle import BundleError

ov = pytest.importorskip("openvino")

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}


@pytest.fixture(scope="module", params=[False, True], ids=["float-tiles", "uint8-tiles"])
def backbone(request: pytest.FixtureRequest) -> tuple[object, np.ndarray]:
    """A compiled backbone and three tiles of the element type it takes."""
    grid = TileGrid.from_dict(GRID)
    prep = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    uint8 = bool(request.param)
    location = compile_backbone(ov.Core(), conv_backbone(), CONFIG, prep, grid.tile_size, uint8)
    th, tw = grid.tile_size
    rng = np.random.default_rng(4)
    if uint8:
        tiles = rng.integers(0, 256, (3, th, tw, 3), dtype=np.uint8)
    else:
        tiles = rng.standard_normal((3, 3, th, tw)).astype(np.float32)
    return location, tiles


def test_features_in_place_equal_the_copied_ones_and_the_request_keeps_its_tensors(
    backbone: tuple[object, np.ndarray],
) -> None:
    location, tiles = backbone
    want = location.run(tiles)[0]  # type: ignore[attr-defined]
    assert want.shape == (3, FEATURES, *MAP_SIZE)
    out = np.full(want.shape, np.nan, np.float32)
    location.run_into(tiles, out)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out, want)
    # the idle request holds its own tensors again, not the caller's buffers
    request = location._idle[-1]  # type: ignore[attr-defined]
    assert not np.shares_memory(request.get_output_tensor().data, out)
    assert not np.shares_memory(request.get_input_tensor().data, tiles)
    # reused: one tile at a time into slices of one buffer, as run_backbone calls it
    sliced = np.full(want.shape, np.nan, np.float32)
    for i in range(3):
        location.run_into(tiles[i : i + 1], sliced[i : i + 1])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(sliced, want)
    out[...] = 0.0  # writing the caller's buffer afterwards changes nothing the request sees
    np.testing.assert_array_equal(location.run(tiles)[0], want)  # type: ignore[attr-defined]


def test_a_buffer_of_the_wrong_shape_is_a_bundle_error(backbone: tuple[object, np.ndarray]) -> None:
    location, tiles = backbone
    wrong = np.zeros((3, FEATURES + 1, *MAP_SIZE), np.float32)
    with pytest.raises(BundleError, match=r"^output shape \(3, 2, 5, 5\), the manifest promises \(3, 3, 5, 5\)$"):
        location.run_into(tiles, wrong)  # type: ignore[attr-defined]
    want = location.run(tiles)[0]  # type: ignore[attr-defined]
    out = np.zeros(want.shape, np.float32)
    location.run_into(tiles, out)  # type: ignore[attr-defined]  # the request still works afterwards
    np.testing.assert_array_equal(out, want)


def test_buffers_that_cannot_be_bound_are_copied_into(backbone: tuple[object, np.ndarray]) -> None:
    location, tiles = backbone
    want = location.run(tiles)[0]  # type: ignore[attr-defined]
    strided = np.zeros((3, FEATURES, MAP_SIZE[0], 2 * MAP_SIZE[1]), np.float32)[..., ::2]
    assert not _bindable(tiles, strided)
    location.run_into(tiles, strided)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(strided, want)
    assert _bindable(tiles, np.zeros(want.shape, np.float32))
    assert not _bindable(tiles, np.zeros(want.shape, np.float64))
