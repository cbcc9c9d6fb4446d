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
    EDGE_POLICIES,
    NormalizationStats,
    Preprocessing,
    SeamSmoothing,
    TileGrid,
    cuda_status,
    normalize_maps,
    resize_maps,
    smooth_seams,
    tile_images,
    untile_maps,
)
from tilead.runtime.image_resize import resize_image
from tilead.runtime.postprocessor import PostProcessor, TileStats
from tilead.runtime.thumbnail import BranchStats, Fusion, ThumbnailBranch, fuser, thumbnail_tiles

TOLERANCE = 1e-4  # kernels: float32 math in a different order
ENGINE_TOLERANCE = 1e-2  # TensorRT fp32 engines against ONNX Runtime CPU, relative to the map range
FP16_TOLERANCE = 5e-2  # fp16 engines against fp32 engines, relative to the map range
ENGINE_BATCHES = (4, 1, 3)  # a full batch, then smaller ones: shapes and addresses must follow each call


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
    }
    try:  # from either wheel (tilead[cpu] or tilead[gpu]); neither installed is reported, not raised
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError as err:
        info["onnxruntime"] = f"not installed ({err})"
        info["onnxruntime_providers"] = []
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
        # FP16: nvcc's fused multiply-add rounds once where the CPU twin rounds twice, which can move an FP16
        # value by one step: the tolerance is one FP16 step at the largest value.
        tol = TOLERANCE if dtype == "float32" else float(np.spacing(np.float16(np.max(np.abs(want)))))
        checks.append(_compare(f"kernel tile_images ({dtype})", got, want, tol))
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


GRIDS = {  # one of each edge policy; 300x410 images, 128x96 tiles, stride 100x90
    edge: TileGrid((300, 410), (128, 96), (100, 90), edge=edge) for edge in EDGE_POLICIES
}


def _read_device(address: int, count: int) -> np.ndarray:
    """``count`` float32 values at a device address, copied with the CUDA runtime (ctypes; no second CUDA wrapper).

    Raises:
        RuntimeError: If no CUDA runtime library loads or the copy fails.
    """
    import ctypes
    import ctypes.util

    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so", ctypes.util.find_library("cudart") or ""]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise RuntimeError("cannot load the CUDA runtime library (libcudart) to read device tiles")
    out = np.empty(count, np.float32)
    code = lib.cudaMemcpy(ctypes.c_void_p(out.ctypes.data), ctypes.c_void_p(address), ctypes.c_size_t(out.nbytes), 4)
    if code != 0:
        raise RuntimeError(f"cudaMemcpy from device address {address:#x} failed with error {code}")
    return out


def _tile_checks(rng: np.random.Generator) -> list[Check]:
    """DevicePipeline upload + tile against the CPU tiler: shift, pad and resize grids, 1 and 3 channels.

    The tiles are read back from each location's block (``tiles_address``), so
    the aligned location stride is checked with them.
    """
    checks = []
    n = 3
    for edge, grid in GRIDS.items():
        for channels in (1, 3):
            prep = Preprocessing(mean=(0.4,) * channels, std=(0.25,) * channels, channels=channels)
            images = rng.integers(0, 256, (n, *grid.image_size, channels), dtype=np.uint8)
            stats = NormalizationStats("image", 1.0, 1.0, (0.0, 2.0), (0.0, 2.0))
            post = PostProcessor(grid, "uniform", None, stats).native()
            pipe = _kernels.cuda.DevicePipeline(grid.native, n, channels, channels, prep.scale, prep.bias, 4, 3, post)
            pipe.upload(images)
            pipe.tile(n, False)
            pipe.synchronize()
            per = n * channels * grid.tile_size[0] * grid.tile_size[1]
            got = np.stack([_read_device(pipe.tiles_address(loc, n), per) for loc in range(grid.num_locations)])
            order = "GRAY" if channels == 1 else prep.color_order  # the images are in the model's order: no swap
            want = tile_images(images, grid, prep, input_order=order).reshape(grid.num_locations, per)
            checks.append(_compare(f"device upload + tile ({edge} grid, {channels} channel(s))", got, want, TOLERANCE))
    return checks


def _postprocess_check(rng: np.random.Generator, edge: str, stage: str) -> Check:
    """The TensorRT backend's device post-processing (untile, seams, crop or resize, normalize) against the CPU's."""
    grid = GRIDS[edge]
    count = grid.num_locations
    tile_stats = None
    if stage == "tile":
        lo = rng.uniform(0.0, 0.2, count)
        tile_stats = TileStats(tuple(lo + 0.5), tuple(lo), tuple(lo + 1.0))
        stats = NormalizationStats("tile", 0.5, 0.8, (0.0, 1.0), (0.3, 1.5), tile_stats)
    else:
        stats = NormalizationStats("image", 0.5, 0.8, (0.0, 1.5), (0.3, 1.5))
    seam = SeamSmoothing(sigma=2.0, width=0.1)
    maps = rng.random((count, 2, 16, 12), dtype=np.float32)
    prep = Preprocessing()
    post = PostProcessor(grid, "feather", seam, stats)
    pipe = _kernels.cuda.DevicePipeline(grid.native, 2, 3, 3, prep.scale, prep.bias, 16, 12, post.native())
    pipe.upload_location_maps(maps)
    for step in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.normalize):
        step(2)
    got_maps, got_masks, _, got_scores = pipe.download(2)
    _, want = post.apply(maps)
    name = f"device post-processing ({edge} grid{', resize crop' if edge == 'resize' else ''}, {stage} stage)"
    check = _compare(name, got_maps, want.maps, TOLERANCE)
    score = float(np.max(np.abs(got_scores - want.scores)))
    masks = int(np.count_nonzero(got_masks.view(np.bool_) != want.masks))
    if score > TOLERANCE or masks:
        check.status, check.detail = "fail", f"image scores differ by {score:.2e}; {masks} mask pixels differ"
    return check


def _postprocess_checks(rng: np.random.Generator) -> list[Check]:
    """The device post-processing for every grid edge mode and both normalization stages."""
    checks = []
    for edge in GRIDS:
        for stage in ("image", "tile"):
            checks += _guard(f"device post-processing ({edge} grid, {stage} stage)",
                             lambda e=edge, t=stage: [_postprocess_check(rng, e, t)])  # type: ignore[misc]  # fmt: skip
    return checks


def _thumbnail_checks(rng: np.random.Generator) -> list[Check]:
    """The device thumbnail branch: area resize + tile into its engine's input, and the fusion after the crop.

    The input is read back from the thumbnail engine's block; the fusion runs between crop and normalize on
    uploaded location and thumbnail maps, against the CPU's ``post.apply(..., fuse=fuser(...))``, for both
    fusions and every edge policy's grid (the resize grid's crop resizes).
    """
    checks = []
    n, size = 2, 96
    for edge, grid in GRIDS.items():
        prep = Preprocessing()
        fusions: tuple[tuple[Fusion, float | None], ...] = (("max", None), ("weighted", 0.3))
        for fusion, weight in fusions:
            tiled, small_stats = BranchStats(0.5, 0.0, 1.0), BranchStats(0.4, -0.5, 2.0)
            branch = ThumbnailBranch(size, fusion, weight, (12, 12), tiled, small_stats)
            stats = NormalizationStats("image", 0.5, 0.8, (0.0, 1.5), (0.3, 1.5))
            post = PostProcessor(grid, "feather", SeamSmoothing(sigma=2.0, width=0.1), stats)
            pipe = _kernels.cuda.DevicePipeline(
                grid.native, n, 3, 3, prep.scale, prep.bias, 16, 12, post.native(), thumbnail=branch.native()
            )
            images = rng.integers(0, 256, (n, *grid.image_size, 3), dtype=np.uint8)
            pipe.upload(images)
            pipe.thumbnail_input(n, False)
            pipe.synchronize()
            got = _read_device(pipe.thumbnail_input_address(n), n * 3 * size * size)
            want = thumbnail_tiles(images, size, prep, input_order=prep.color_order).reshape(-1)
            name = f"device thumbnail input ({edge} grid, {fusion})"
            checks.append(_compare(name, got, want, TOLERANCE))
            maps = rng.random((grid.num_locations, n, 16, 12), dtype=np.float32)
            small = rng.uniform(-0.5, 2.0, (n, 12, 12)).astype(np.float32)
            pipe.upload_location_maps(maps)
            pipe.upload_thumbnail_maps(small)
            for step in (pipe.untile, pipe.smooth_seams, pipe.crop, pipe.fuse, pipe.normalize):
                step(n)
            got_maps = pipe.download(n)[0]
            _, result = post.apply(maps, fuse=fuser(branch, small))
            name = f"device thumbnail fusion ({edge} grid, {fusion})"
            checks.append(_compare(name, got_maps, result.maps, TOLERANCE))
    return checks


def _images(bundle: Path, rng: np.random.Generator, n: int) -> np.ndarray:
    from tilead.runtime.bundle import read_manifest

    m = read_manifest(bundle)
    return rng.integers(0, 256, (n, *m.grid.image_size, m.preprocessing.channels), dtype=np.uint8)


def _relative(name: str, got: np.ndarray, want: np.ndarray, tol: float, detail: str = "") -> Check:
    spread = float(np.ptp(want)) if want.size and np.all(np.isfinite(want)) else 1.0
    return _compare(name, got / (spread or 1.0), want / (spread or 1.0), tol, detail)


def _normalized(predictor: Any, images: np.ndarray) -> np.ndarray:
    results = predictor.predict(list(images))
    return np.stack([r.anomaly_map for r in results])


def _engine_checks(bundle: Path, rng: np.random.Generator, build: bool) -> list[Check]:
    """Each location's FP32 engine, and the TensorRT Predictor, against ONNX Runtime on the CPU at batches 4, 1, 3."""
    from tilead.runtime import Predictor

    batch = max(ENGINE_BATCHES)
    images = _images(bundle, rng, batch)
    with Predictor(bundle, max_batch=batch) as cpu:
        want = [(cpu.location_maps(images[:n]), _normalized(cpu, images[:n])) for n in ENGINE_BATCHES]
        names = [loc.name for loc in cpu.manifest.locations]
    if build:  # the exporter builds engines (tilead-export --trt); the runtime only loads them
        from tilead.exporter.engines import build_engines

        build_engines(bundle, precision="fp32", max_batch=batch, progress=False)
    checks: list[Check] = []
    with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=batch, precision="fp32") as gpu:
        key = gpu.providers[0]
        for n, (want_maps, want_norm) in zip(ENGINE_BATCHES, want, strict=True):
            got_maps = gpu.location_maps(images[:n])  # calls in the order 4, 1, 3 on one pipeline
            for i, name in enumerate(names):
                checks.append(_relative(f"engine {name} vs ONNX Runtime CPU, batch {n} (relative to map range)",
                                        got_maps[i], want_maps[i], ENGINE_TOLERANCE, key))  # fmt: skip
            checks.append(_compare(f"TensorRT Predictor vs ONNX Runtime CPU, batch {n} (normalized maps)",
                                   _normalized(gpu, images[:n]), want_norm, ENGINE_TOLERANCE))  # fmt: skip
    return checks


def _fp16_check(bundle: Path, rng: np.random.Generator, build: bool) -> list[Check]:
    """FP16 engines against FP32 engines: non-finite counts (must not exceed FP32's) and the map difference."""
    from tilead.runtime import Predictor
    from tilead.runtime.bundle import read_manifest

    name = "FP16 engines vs FP32 engines (inf/NaN counts, relative to map range)"
    if build:
        from tilead.exporter.engines import build_engines

        build_engines(bundle, precision="fp16", max_batch=max(ENGINE_BATCHES), progress=False)
    if not any(s.precision == "fp16" for s in read_manifest(bundle).engine_sets):
        return [Check(name, "skipped", detail="the bundle lists no fp16 engine set (build one: --build, or "
                                              "tilead-export BUNDLE --trt --precision fp16)")]  # fmt: skip
    images = _images(bundle, rng, max(ENGINE_BATCHES))
    maps = {}
    for precision in ("fp32", "fp16"):
        with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=len(images), precision=precision) as p:
            maps[precision] = p.location_maps(images)
    bad32, bad16 = (int(np.count_nonzero(~np.isfinite(maps[k]))) for k in ("fp32", "fp16"))
    detail = f"non-finite values: fp16 {bad16}, fp32 {bad32}"
    if bad16 > bad32:
        return [Check(name, "fail", float(bad16), float(bad32), detail)]
    finite = np.isfinite(maps["fp32"]) & np.isfinite(maps["fp16"])
    return [_relative(name, maps["fp16"][finite], maps["fp32"][finite], FP16_TOLERANCE, detail)]


def _graph_check(bundle: Path, rng: np.random.Generator) -> list[Check]:
    """CUDA graph replay against the same pipeline launched without a graph: the results must be equal."""
    from tilead.runtime import Predictor

    name = "CUDA graph replay vs no graph (normalized maps, batches 4, 1, 3)"
    images = _images(bundle, rng, max(ENGINE_BATCHES))
    out = {}
    for graphs in (False, True):
        with Predictor(bundle, device="cuda", backend="tensorrt", max_batch=len(images), cuda_graphs=graphs) as p:
            # Twice per batch size: with graphs the first call captures, the second replays.
            runs = [_normalized(p, images[:n]) for n in ENGINE_BATCHES for _ in range(2)]
            out[graphs] = np.concatenate([r.reshape(-1) for r in runs])
    return [_compare(name, out[True], out[False], 0.0)]


def ort_provider_checks(bundle: Path | None) -> list[Check]:
    """Which execution providers ONNX Runtime's sessions really use, on the CPU and (where it can) on CUDA."""
    import onnxruntime as ort

    from tilead.runtime import Predictor

    if bundle is None:
        return [Check("ONNX Runtime providers used", "skipped", detail="needs a bundle (--bundle)")]
    checks = []
    with Predictor(bundle, backend="onnxruntime", max_batch=1) as cpu:
        used = cpu.providers
    checks.append(Check("ONNX Runtime providers used (device cpu)", "pass" if used[0] == "CPUExecutionProvider"
                        else "fail", detail=", ".join(used)))  # fmt: skip
    name = "ONNX Runtime providers used (device cuda)"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        checks.append(Check(name, "skipped", detail=f"this onnxruntime has no CUDAExecutionProvider (available: "
                                                    f"{', '.join(available)}): install tilead[gpu]"))  # fmt: skip
        return checks
    try:  # the backend refuses a session that fell back to the CPU (RuntimeError, with ONNX Runtime's reason)
        with Predictor(bundle, device="cuda", backend="onnxruntime", max_batch=max(ENGINE_BATCHES)) as gpu:
            used = gpu.providers
    except RuntimeError as err:
        checks.append(Check(name, "fail", detail=str(err)))
        return checks
    on_gpu = used[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    checks.append(Check(name, "pass" if on_gpu else "fail", detail=", ".join(used)))
    return checks


GPU_GROUPS = (
    "CUDA kernels vs CPU twins",
    f"device upload + tile ({', '.join(EDGE_POLICIES)} grids; 1 and 3 channels)",
    f"device post-processing ({', '.join(EDGE_POLICIES)} grids; image and tile stages; resize crop)",
    f"device thumbnail branch (area resize + tile, fusion: max and weighted; {', '.join(EDGE_POLICIES)} grids)",
)
BUNDLE_GROUPS = (
    "TensorRT engines vs ONNX Runtime CPU (batches 4, 1, 3)",
    "FP16 engines vs FP32 engines (inf/NaN counts)",
    "CUDA graph replay vs no graph",
)


def gpu_checks(bundle: Path | None = None, *, build: bool = False, seed: int = 0) -> list[Check]:
    """Run the GPU checks that can run here; the others come back ``skipped`` with the reason (never ``pass``).

    Without a usable CUDA device every GPU group is one ``skipped`` check;
    ONNX Runtime's providers are checked either way (with a bundle).
    """
    status = cuda_status()
    checks: list[Check] = []
    if not status.usable:
        reason = "tilead._kernels was built without CUDA" if not status.built else (
            f"no usable CUDA device: {status.error or 'none found'}")  # fmt: skip
        names = list(GPU_GROUPS) + ([f"{g} of {bundle}" for g in BUNDLE_GROUPS] if bundle is not None else [])
        checks = [Check(name, "skipped", detail=reason) for name in names]
        return checks + _guard("ONNX Runtime providers used", lambda: ort_provider_checks(bundle))
    rng = np.random.default_rng(seed)
    checks += _guard(GPU_GROUPS[0], lambda: _kernel_checks(rng))
    checks += _guard(GPU_GROUPS[1], lambda: _tile_checks(rng))
    checks += _guard(GPU_GROUPS[2], lambda: _postprocess_checks(rng))
    checks += _guard(GPU_GROUPS[3], lambda: _thumbnail_checks(rng))
    if bundle is not None:
        checks += _guard(f"{BUNDLE_GROUPS[0]} of {bundle}", lambda: _engine_checks(bundle, rng, build))
        checks += _guard(f"{BUNDLE_GROUPS[1]} of {bundle}", lambda: _fp16_check(bundle, rng, build))
        checks += _guard(f"{BUNDLE_GROUPS[2]} of {bundle}", lambda: _graph_check(bundle, rng))
    checks += _guard("ONNX Runtime providers used", lambda: ort_provider_checks(bundle))
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
