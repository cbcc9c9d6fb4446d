"""Type stub of the compiled extension tilead._kernels (see cpp_ext/src/bindings.cpp)."""

from collections.abc import Sequence

import numpy as np

from . import _kernels_cuda

cuda = _kernels_cuda

__version__: str
EDGE_POLICIES: tuple[str, ...]
EDGE_SHIFT: int  # EDGE_<NAME>: the code of each name in EDGE_POLICIES (the bindings loop over the list)
EDGE_PAD: int
EDGE_RESIZE: int
CANVAS_IS_IMAGE: int
CANVAS_PADDED: int
CANVAS_RESIZED: int
BLEND_UNIFORM: int
BLEND_FEATHER: int
NORM_NONE: int
NORM_MINMAX: int
MAX_GAUSSIAN_RADIUS: int
TENSOR_ALIGN_BYTES: int

class Grid:
    def __init__(
        self, image_h: int, image_w: int, tile_h: int, tile_w: int, stride_h: int, stride_w: int, edge: int
    ) -> None: ...
    @property
    def image_h(self) -> int: ...
    @property
    def image_w(self) -> int: ...
    @property
    def tile_h(self) -> int: ...
    @property
    def tile_w(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def edge(self) -> int: ...
    @property
    def canvas_map(self) -> int: ...
    @property
    def canvas_h(self) -> int: ...
    @property
    def canvas_w(self) -> int: ...
    @property
    def origins_y(self) -> list[int]: ...
    @property
    def origins_x(self) -> list[int]: ...
    def band_rows(self, width: float) -> list[bool]: ...
    def band_cols(self, width: float) -> list[bool]: ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def cpu_simd() -> str: ...
def tile_images(
    images: np.ndarray,
    grid: Grid,
    out: np.ndarray,
    scale: Sequence[float],
    bias: Sequence[float],
    swap_rb: bool = False,
) -> None: ...
def untile_maps(
    maps: np.ndarray,
    grid: Grid,
    out: np.ndarray,
    weights: int = 0,
    loc_threshold: np.ndarray | None = None,
    loc_scale: np.ndarray | None = None,
) -> None: ...
def smooth_seams(maps: np.ndarray, grid: Grid, sigma: float, width: float) -> None: ...
def resize_maps(maps: np.ndarray, out: np.ndarray) -> None: ...
def resize_area(images: np.ndarray, out: np.ndarray) -> None: ...
def aligned_block_floats(floats: int) -> int: ...
def check_pipeline_images(grid: Grid, in_channels: int, max_batch: int, images: np.ndarray) -> None: ...
def normalize_maps(
    maps: np.ndarray,
    out: np.ndarray,
    mask: np.ndarray | None,
    raw_scores: np.ndarray,
    scores: np.ndarray,
    mode: int,
    pixel_threshold: float,
    pixel_min: float,
    pixel_max: float,
    image_threshold: float,
    image_min: float,
    image_max: float,
) -> None: ...
