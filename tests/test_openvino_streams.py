"""The shared backbone's OpenVINO streams: the location workers' backbone calls run side by side (issue #21).

With one stream (the ``LATENCY`` hint's) OpenVINO runs the calls of several threads on one compiled model one at a
time; the backends compile the shared backbone with one stream per location worker
(:func:`tilead.runtime.backends.openvino.stream_config`). Checked here: the configuration, that the compiled
backbones of both OpenVINO backends report it, and that calls on two streams at once give the features of calls
in turn.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import GRID, make_shared_bundle
from hypothesis import given
from hypothesis import strategies as st
from test_uint8_tiles import conv_backbone

from tilead.runtime import Preprocessing, TileGrid, read_manifest
from tilead.runtime.backends.openvino import OpenVinoBackend, compile_backbone, stream_config

ov = pytest.importorskip("openvino")


@given(threads=st.integers(-2, 64), streams=st.integers(-2, 64))
def test_stream_config_splits_the_threads_over_at_most_as_many_streams(threads: int, streams: int) -> None:
    config = stream_config({"INFERENCE_PRECISION_HINT": "bf16"}, threads, streams)
    assert config["INFERENCE_NUM_THREADS"] == max(1, threads)
    assert 1 <= config["NUM_STREAMS"] <= config["INFERENCE_NUM_THREADS"]
    assert config["NUM_STREAMS"] == max(1, min(streams, max(1, threads)))
    assert config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert config["ENABLE_CPU_PINNING"] is False


def test_stream_config_keeps_the_callers_properties() -> None:
    config = stream_config({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 3}, 4, 2)
    assert (config["PERFORMANCE_HINT"], config["NUM_STREAMS"], config["INFERENCE_NUM_THREADS"]) == ("THROUGHPUT", 3, 4)


@pytest.mark.parametrize("uint8", [False, True], ids=["float-tiles", "uint8-tiles"])
def test_calls_on_two_streams_at_once_give_the_features_of_calls_in_turn(uint8: bool) -> None:
    grid = TileGrid.from_dict(GRID)
    prep = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    config = stream_config({"INFERENCE_PRECISION_HINT": "f32"}, 2, 2)
    location = compile_backbone(ov.Core(), conv_backbone(), config, prep, grid.tile_size, uint8)
    assert int(location.compiled.get_property("NUM_STREAMS")) == 2
    th, tw = grid.tile_size
    rng = np.random.default_rng(7)
    shape = (16, th, tw, 3) if uint8 else (16, 3, th, tw)
    tiles = rng.integers(0, 256, shape, dtype=np.uint8) if uint8 else rng.standard_normal(shape).astype(np.float32)
    want = np.stack([location.run(tiles[i : i + 1])[0][0] for i in range(len(tiles))])
    out = np.full(want.shape, np.nan, np.float32)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: location.run_into(tiles[i : i + 1], out[i : i + 1]), range(len(tiles))))
    np.testing.assert_array_equal(out, want)
    assert len(location._idle) >= 1  # every request went back to the idle stack


def test_the_openvino_backend_gives_the_shared_backbone_a_stream_per_worker(tmp_path: Path) -> None:
    bundle = make_shared_bundle(tmp_path / "shared")
    manifest = read_manifest(bundle)
    models = [(bundle / loc.file).read_bytes() for loc in manifest.locations]
    assert manifest.backbone is not None
    backbone = (bundle / manifest.backbone.file).read_bytes()
    # (OpenVINO caps INFERENCE_NUM_THREADS at the cores it sees: at most 2 threads here, as on a 2-core CI machine)
    for threads, workers, streams, per_head in ((2, 2, 2, 1), (2, 1, 1, 2), (1, 4, 1, 1)):
        backend = OpenVinoBackend(manifest, models, threads=threads, location_workers=workers, backbone=backbone)
        try:
            assert backend._backbone is not None
            assert backend._locations is not None
            compiled = backend._backbone.compiled
            assert int(compiled.get_property("NUM_STREAMS")) == streams
            assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == threads
            assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
            # the heads keep one stream each, on their worker's share of the threads
            head = backend._locations[0].compiled
            assert int(head.get_property("NUM_STREAMS")) == 1
            assert int(head.get_property("INFERENCE_NUM_THREADS")) == per_head
        finally:
            backend.close()
