"""A CPU stand-in for the TensorRT runtime and the extension's DevicePipeline (tests only).

It lets the TensorRT backend's orchestration run end to end without a GPU:
"device addresses" are keys into numpy buffers, the fake pipeline runs the CPU
twins of the kernels on them, and a fake engine is an ONNX model run by ONNX
Runtime on the tile block its input address points at. What this cannot
check, the CUDA pipeline and real TensorRT engines, is left to tilead-doctor on
a GPU.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import onnxruntime as ort

from tilead import _kernels

_BUFFERS: dict[int, tuple[FakePipeline, str, int]] = {}  # address -> (pipeline, "tiles" | "maps", float offset)


class FakePipeline:
    """Same constructor and methods as ``tilead._kernels.cuda.DevicePipeline``, on the CPU twins."""

    def __init__(self, grid: Any, max_batch: int, in_channels: int, out_channels: int, scale: list[float],
                 bias: list[float], map_h: int, map_w: int, weights: int, loc_threshold: list[float],
                 loc_scale: list[float], seam_sigma: float, seam_width: float, norm_mode: int, pt: float,
                 pmin: float, pmax: float, it: float, imin: float, imax: float, device: int = 0) -> None:  # fmt: skip
        self.grid, self.max_batch = grid, max_batch
        self.channels, self.scale, self.bias = out_channels, scale, bias
        self.map_h, self.map_w, self.weights = map_h, map_w, weights
        self.loc = (np.asarray(loc_threshold, np.float32), np.asarray(loc_scale, np.float32)) if loc_threshold else None
        self.seam = (seam_sigma, seam_width)
        self.norm = (norm_mode, pt, pmin, pmax, it, imin, imax)
        self.locations = grid.rows * grid.cols
        th, tw = grid.tile_h, grid.tile_w
        self.tile_floats = out_channels * th * tw
        self.tiles = np.zeros(self.locations * max_batch * self.tile_floats, np.float32)
        self.maps = np.zeros(self.locations * max_batch * map_h * map_w, np.float32)
        self.calls: list[str] = []
        self.stream = 1234

    def _address(self, kind: str, offset: int) -> int:
        address = id(self) * 1000 + len(_BUFFERS)
        _BUFFERS[address] = (self, kind, offset)
        return address

    def tiles_address(self, location: int, n: int) -> int:
        return self._address("tiles", location * n * self.tile_floats)

    def maps_address(self, location: int, n: int) -> int:
        return self._address("maps", location * n * self.map_h * self.map_w)

    @property
    def device_bytes(self) -> int:
        return int(self.tiles.nbytes + self.maps.nbytes)

    def upload(self, images: np.ndarray) -> None:
        assert images.dtype == np.uint8
        assert images.flags.c_contiguous
        self.calls.append("upload")
        self.images = images.copy()

    def tile(self, n: int, swap_rb: bool) -> None:
        self.calls.append("tile")
        out = self.tiles[: self.locations * n * self.tile_floats].reshape(
            self.locations, n, self.channels, self.grid.tile_h, self.grid.tile_w)  # fmt: skip
        _kernels.tile_images(self.images, self.grid, out, self.scale, self.bias, swap_rb)

    def upload_location_maps(self, maps: np.ndarray) -> None:
        self.maps[: maps.size] = maps.ravel()

    def _location_maps(self, n: int) -> np.ndarray:
        return self.maps[: self.locations * n * self.map_h * self.map_w].reshape(
            self.locations, n, self.map_h, self.map_w)  # fmt: skip

    def untile(self, n: int) -> None:
        self.calls.append("untile")
        self.canvas = np.empty((n, self.grid.canvas_h, self.grid.canvas_w), np.float32)
        thr, sc = self.loc if self.loc is not None else (None, None)
        _kernels.untile_maps(self._location_maps(n), self.grid, self.canvas, self.weights, thr, sc)

    def smooth_seams(self, n: int) -> None:
        self.calls.append("seam")
        if self.seam[0] > 0:
            _kernels.smooth_seams(self.canvas, self.grid, *self.seam)

    def crop(self, n: int) -> None:
        self.calls.append("crop")
        h, w = self.grid.image_h, self.grid.image_w
        self.image = np.ascontiguousarray(self.canvas[:, :h, :w])

    def normalize(self, n: int) -> None:
        self.calls.append("normalize")
        self.mask = np.empty(self.image.shape, np.uint8)
        self.raw, self.scores = np.empty(n, np.float32), np.empty(n, np.float32)
        _kernels.normalize_maps(self.image, self.image, self.mask, self.raw, self.scores, *self.norm)

    def download(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.calls.append("download")
        return self.image.copy(), self.mask.copy(), self.raw.copy(), self.scores.copy()

    def download_location_maps(self, n: int) -> np.ndarray:
        out: np.ndarray = self._location_maps(n).copy()
        return out

    def synchronize(self) -> None:
        self.calls.append("sync")


def _view(address: int, count: int) -> np.ndarray:
    pipeline, kind, offset = _BUFFERS[address]
    buffer: np.ndarray = pipeline.tiles if kind == "tiles" else pipeline.maps
    return buffer[offset : offset + count]


class FakeEngine:
    """An "engine" whose plan is the ONNX model itself."""

    def __init__(self, plan: bytes) -> None:
        self.session = ort.InferenceSession(plan, providers=["CPUExecutionProvider"])
        self.names = [self.session.get_inputs()[0].name, self.session.get_outputs()[0].name]
        self.num_io_tensors = 2
        self.device_memory_size_v2 = 1 << 20

    def get_tensor_name(self, i: int) -> str:
        return str(self.names[i])

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == self.names[0] else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "FLOAT"

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream: int) -> bool:
        self.streams.append(stream)
        inp, out = self.engine.names
        assert self.shape is not None
        tiles = _view(self.addresses[inp], int(np.prod(self.shape))).reshape(self.shape)
        result = self.engine.session.run(None, {inp: tiles})[0]
        _view(self.addresses[out], result.size)[:] = result.ravel()
        return True


def make_module(version: str = "11.4.0.106") -> types.ModuleType:
    """A module with the runtime API the backend touches (see tilead.runtime.backends.tensorrt_modules.RUNTIME_API)."""
    trt = types.ModuleType("tensorrt_lean")
    trt.__version__ = version  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
            return FakeEngine(plan)

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.ICudaEngine = FakeEngine  # type: ignore[attr-defined]
    trt.IExecutionContext = FakeContext  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT")  # type: ignore[attr-defined]
    return trt


def make_builder_module(major: int, log: list[str]) -> types.ModuleType:
    """A full-TensorRT stand-in whose builder records what it was asked to do.

    A plan is ``PLAN|<flags>|<profile>|<cache it started from>|<model bytes>``; the
    timing cache grows by one ``+`` per build, so a test can see it being shared.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.4.0.1"  # type: ignore[attr-defined]
    flags = ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"] + (["FP16"] if major == 10 else [])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            pass

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.model = flags, b""

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name="tiles")

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse(self, data: bytes) -> bool:
            self.network.model = data
            return True

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.cache = Cache(b"")

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            log.append(f"workspace {size >> 20}")

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            self.profile = profile.shapes

        def create_timing_cache(self, data: bytes) -> Cache:
            return Cache(data)

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
            self.shapes = (lo, opt, hi)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            started = config.cache.data
            config.cache = Cache(started + b"+")
            log.append(f"build flags={','.join(config.flags)} network={network.flags} cache={started.decode()}")
            return b"|".join([b"PLAN", ",".join(config.flags).encode(), repr(config.profile).encode(), started,
                              network.model])  # fmt: skip

    for name, cls in {"Logger": Logger, "OnnxParser": OnnxParser, "Builder": Builder, "IBuilderConfig": Config,
                      "IOptimizationProfile": Profile}.items():  # fmt: skip
        setattr(trt, name, cls)
    return trt
