"""Type stub of tilead._kernels.cuda: the host-staged CUDA twins.

They have exactly the CPU twins' signatures, so the stub re-exports those.
"""

from ._kernels import normalize_maps as normalize_maps
from ._kernels import resize_maps as resize_maps
from ._kernels import smooth_seams as smooth_seams
from ._kernels import tile_images as tile_images
from ._kernels import untile_maps as untile_maps

def is_built() -> bool: ...
def architectures() -> str: ...
def device_count() -> tuple[int, str]: ...
def device_name(index: int = 0) -> str: ...
