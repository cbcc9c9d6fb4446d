"""What this machine can run, and on a GPU whether it runs right (``tilead-doctor``).

:func:`inventory` lists the installation: the extension's build and CUDA
devices, ONNX Runtime's providers, TensorRT (full or lean) and whether the
TensorRT API tilead uses is all there. :func:`gpu_checks` runs only where a
CUDA device is usable: every CUDA kernel against its CPU twin on random inputs,
the TensorRT backend's device pipeline (post-processing) against the CPU
post-processing, and with a bundle, every location's engine output and the
whole TensorRT Predictor against ONNX Runtime on the CPU. Each check reports
its maximum absolute difference and a tolerance; where a check cannot run it
says ``skipped`` and why, and never passes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilead import __version__, _kernels
from tilead.runtime import (
    NormalizationStats,
    Preprocessing,
    SeamSmoothing,
    TileGrid,
    cuda_status,
    normalize_maps,
    postprocess_maps,
    resize_maps,
    smooth_seams,
    tile_images,
    untile_maps,
)
from tilead.runtime.image_resize import resize_image

TOLERANCE = 1e-4  # kernels: float32 math in a different order
ENGINE_TOLERANCE = 1e-2  # TensorRT fp32 engines against ONNX Runtime CPU, relative to the map range


@dataclass
class Check:
    """One self-check.

    Attributes:
        name: What was checked.
        status: ``pass``, ``fail`` or ``skipped``.
        max_abs_diff: Largest difference found (None when skipped).
        tolerance: The bound it had to stay within.
        detail: Why it was skipped or failed, or what was compared.
    """

    name: str
    status: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""


def _compare(name: str, got: np.ndarray, want: np.ndarray, tol: float, detail: str = "") -> Check:
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    return Check(name, "pass" if diff <= tol else "fail", diff, tol, detail)


def inventory() -> dict[str, Any]:
    """The installation and the machine, as far as tilead is concerned (never raises)."""
    from importlib import metadata

    import onnxruntime as ort

    status = cuda_status()
    info: dict[str, Any] = {
        "tilead": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_tile_path": _kernels.cpu_simd(),
        "cuda_kernels_built": status.built,
        "cuda_architectures": status.architectures,
        "cuda_devices": list(status.devices),
        "cuda_error": status.error or None,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": list(ort.get_available_providers()),
    }
    from tilead.exporter.engines import BUILDER_API, BUILDER_ENUMS
    from tilead.runtime.backends.tensorrt_modules import RUNTIME_API, major_version, missing_api

    trt_info: dict[str, Any] = {}
    for name in ("tensorrt", "tensorrt_lean"):
        try:
            module = __import__(name)
        except ImportError as err:
            trt_info[name] = {"installed": False, "error": str(err)}
            continue
        entry: dict[str, Any] = {"installed": True, "version": str(module.__version__)}
        entry["missing_runtime_api"] = missing_api(module, RUNTIME_API)
        enums = BUILDER_ENUMS.get(major_version(module), ())
        entry["missing_builder_enums"] = missing_api(module, enums) if enums else ["unsupported major version"]
        if name == "tensorrt":
            entry["missing_builder_api"] = missing_api(module, BUILDER_API)
        trt_info[name] = entry
    info["tensorrt"] = trt_info
    try:
        info["onnxconverter_common"] = metadata.version("onnxconverter-common")
    except metadata.PackageNotFoundError:
        info["onnxconverter_common"] = None
    return info


def _kernel_checks(rng: np.random.Generator) -> list[Check]:
    """Every CUDA kernel against its CPU twin on random inputs."""
    checks = []
    grid = TileGrid((300, 410), (128, 96), (100, 90), edge="pad")
    images = rng.integers(0, 256, (3, 300, 410, 3), dtype=np.uint8)
    for dtype in ("float32", "float16"):
        prep = Preprocessing(dtype=dtype)
        got = tile_images(images, grid, prep, device="cuda").astype(np.float32)
        want = tile_images(images, grid, prep).astype(np.float32)
        checks.append(_compare(f"kernel tile_images ({dtype})", got, want, TOLERANCE if dtype == "float32" else 1e-3))
    maps = rng.random((grid.num_locations, 3, 16, 12), dtype=np.float32)
    for weights in ("uniform", "feather"):
        got = untile_maps(maps, grid, weights=weights, device="cuda")
        want = untile_maps(maps, grid, weights=weights)
        checks.append(_compare(f"kernel untile_maps ({weights})", got, want, TOLERANCE))
    canvas = rng.random((2, *grid.canvas_size), dtype=np.float32)
    seam = SeamSmoothing(sigma=2.0, width=0.1)
    got = smooth_seams(canvas.copy(), grid, seam, device="cuda")
    want = smooth_seams(canvas.copy(), grid, seam)
    checks.append(_compare("kernel smooth_seams", got, want, TOLERANCE))
    got = resize_maps(canvas, (211, 173), device="cuda")
    want = resize_maps(canvas, (211, 173))
    checks.append(_compare("kernel resize_maps", got, want, TOLERANCE))
    for size in ((150, 205), (97, 131)):  # whole-number factors, then fractional coverage
        got_u8 = resize_image(images[0], size, device="cuda").astype(np.float32)
        want_u8 = resize_image(images[0], size).astype(np.float32)
        checks.append(_compare(f"kernel resize_area {size[0]}x{size[1]}", got_u8, want_u8, 0.0))  # exact: same rounding
    args: dict[str, Any] = {"pixel_threshold": 0.4, "image_threshold": 0.7, "pixel_range": (0.0, 1.0),
                            "image_range": (0.2, 1.0)}  # fmt: skip
    got_n = normalize_maps(canvas, device="cuda", **args)
    want_n = normalize_maps(canvas, **args)
    checks.append(_compare("kernel normalize_maps (maps)", got_n.maps, want_n.maps, TOLERANCE))
    checks.append(_compare("kernel normalize_maps (scores)", got_n.scores, want_n.scores, TOLERANCE))
    mism = int(np.count_nonzero(got_n.masks != want_n.masks))
    checks.append(Check("kernel normalize_maps (masks)", "pass" if mism == 0 else "fail", float(mism), 0.0,
                        "pixels whose mask differs"))  # fmt: skip
    return checks


def _pipeline_check(rng: np.random.Generator) -> Check:
    """The TensorRT backend's device post-processing against the CPU post-processing."""
    from tilead.runtime.postprocess import BLEND_CODES, norm_params

    grid = TileGrid((300, 410), (128, 96), (100, 90), edge="pad")
    stats = NormalizationStats("image", 0.5, 0.8, (0.0, 1.5), (0.3, 1.5))
    seam = SeamSmoothing(sigma=2.0, width=0.1)
    maps = rng.random((grid.num_locations, 2, 16, 12), dtype=np.float32)
    prep = Preprocessing()
    pipe = _kernels.cuda.DevicePipeline(
        grid.native, 2, 3, 3, prep.scale, prep.bias, 16, 12, BLEND_CODES["feather"], [], [], seam.sigma, seam.width,
        *norm_params(stats.pixel_threshold, stats.image_threshold, stats.pixel_range, stats.image_range),
    )  # fmt: skip
    pipe.upload_location_maps(maps)
    for stage in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.normalize):
        stage(2)
    got_maps, _, _, got_scores = pipe.download(2)
    _, want = postprocess_maps(maps, grid, stats, weights="feather", seam=seam)
    check = _compare("device pipeline post-processing", got_maps, want.maps, TOLERANCE)
    score = float(np.max(np.abs(got_scores - want.scores)))
    if score > TOLERANCE:
        check.status, check.detail = "fail", f"image scores differ by {score:.2e}"
    return check


def _bundle_checks(bundle: Path, rng: np.random.Generator, build: bool) -> list[Check]:
    """Each location's TensorRT engine, and the whole TensorRT Predictor, against ONNX Runtime on the CPU."""
    from tilead.runtime import Predictor

    checks: list[Check] = []
    with Predictor(bundle, max_batch=2) as cpu:
        h, w = cpu.image_size
        images = rng.integers(0, 256, (2, h, w, cpu.channels), dtype=np.uint8)
        want_maps = cpu.location_maps(images)
        want = cpu.predict(list(images))
    if build:  # the exporter builds engines (tilead-export --trt); the runtime only loads them
        from tilead.exporter.engines import build_engines

        build_engines(bundle, max_batch=2, progress=False)
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=2) as gpu:
        got_maps = gpu.location_maps(images)
        got = gpu.predict(list(images))
        key = gpu.providers[0]
    spread = float(np.ptp(want_maps)) or 1.0
    for i, loc in enumerate(cpu.manifest.locations):
        checks.append(_compare(f"engine {loc.name} vs ONNX Runtime CPU (relative to map range)",
                               got_maps[i] / spread, want_maps[i] / spread, ENGINE_TOLERANCE, key))  # fmt: skip
    assert isinstance(got, list)
    assert isinstance(want, list)
    got_n = np.stack([p.anomaly_map for p in got])
    want_n = np.stack([p.anomaly_map for p in want])
    checks.append(_compare("TensorRT Predictor vs ONNX Runtime CPU (normalized maps)", got_n, want_n, ENGINE_TOLERANCE))
    return checks


def gpu_checks(bundle: Path | None = None, *, build: bool = False, seed: int = 0) -> list[Check]:
    """Run the GPU checks that can run here; the others come back ``skipped`` with the reason."""
    status = cuda_status()
    if not status.usable:
        reason = "tilead._kernels was built without CUDA" if not status.built else (
            f"no usable CUDA device: {status.error or 'none found'}")  # fmt: skip
        names = ["CUDA kernels vs CPU twins", "device pipeline post-processing"]
        if bundle is not None:
            names.append(f"TensorRT engines of {bundle} vs ONNX Runtime CPU")
        return [Check(name, "skipped", detail=reason) for name in names]
    rng = np.random.default_rng(seed)
    checks = _guard("CUDA kernels vs CPU twins", lambda: _kernel_checks(rng))
    checks += _guard("device pipeline post-processing", lambda: [_pipeline_check(rng)])
    if bundle is not None:
        checks += _guard(f"TensorRT engines of {bundle}", lambda: _bundle_checks(bundle, rng, build))
    return checks


def _guard(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """Run a group of checks; an exception becomes one failed check that says what went wrong."""
    try:
        return run()
    except Exception as err:  # a self-check reports every failure instead of stopping at the first
        return [Check(name, "fail", detail=f"{type(err).__name__}: {err}")]


def summary(checks: list[Check]) -> str:
    """``pass``, ``fail`` (any failed) or ``skipped`` (nothing failed, something skipped)."""
    if any(c.status == "fail" for c in checks):
        return "fail"
    if any(c.status == "skipped" for c in checks):
        return "skipped"
    return "pass"


def as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    """JSON form."""
    return [asdict(c) for c in checks]
