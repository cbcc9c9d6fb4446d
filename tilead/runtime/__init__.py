"""tilead's deployment runtime: geometry, tiling and post-processing kernels.

This package never imports torch (nor cv2): it takes numpy arrays and runs the
``tilead._kernels`` extension. The trainer and the exporter import it for the
same geometry and post-processing, so what is validated is what is deployed.
"""

from tilead.runtime.bundle import BundleError, Manifest, read_manifest, verify_files
from tilead.runtime.devices import CudaStatus, cuda_status, get_num_threads, set_num_threads
from tilead.runtime.geometry import EDGE_POLICIES, EdgePolicy, TileGrid, location_name, parse_location
from tilead.runtime.postprocess import (
    NormalizedMaps,
    SeamSmoothing,
    merge_maps,
    normalize_maps,
    parse_seam,
    resize_maps,
    smooth_seams,
    untile_maps,
)
from tilead.runtime.postprocessor import (
    NormalizationStats,
    PostProcessor,
    TileStats,
    image_scores_of_tiles,
    normalize_with_stats,
    postprocess_maps,
    score_images,
)
from tilead.runtime.predictor import Prediction, Predictor
from tilead.runtime.preprocess import Preprocessing, tile_images

__all__ = [
    "EDGE_POLICIES",
    "BundleError",
    "CudaStatus",
    "EdgePolicy",
    "Manifest",
    "NormalizationStats",
    "NormalizedMaps",
    "PostProcessor",
    "Prediction",
    "Predictor",
    "Preprocessing",
    "SeamSmoothing",
    "TileGrid",
    "TileStats",
    "cuda_status",
    "get_num_threads",
    "image_scores_of_tiles",
    "location_name",
    "merge_maps",
    "normalize_maps",
    "normalize_with_stats",
    "parse_location",
    "parse_seam",
    "postprocess_maps",
    "read_manifest",
    "resize_maps",
    "score_images",
    "set_num_threads",
    "smooth_seams",
    "tile_images",
    "untile_maps",
    "verify_files",
]
