"""tilead.runtime (every backend included) never imports torch, cv2, the trainer, the exporter or the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("torch", "torchvision", "timm", "cv2")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    from tilead import runtime

    grid = runtime.TileGrid(64, 32, 24)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tiles = runtime.tile_images(images, grid)
    maps = np.ascontiguousarray(tiles[:, :, 0, ::8, ::8])
    merged = runtime.merge_maps(maps, grid, seam=runtime.SeamSmoothing())
    result = runtime.normalize_maps(merged, pixel_threshold=0.0, image_threshold=0.0,
                                    pixel_range=(-2.0, 2.0), image_range=(-2.0, 2.0))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LOADED", loaded)
    print("SHAPE", result.maps.shape)
    """
)


def test_runtime_runs_with_torch_and_cv2_unimportable() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
    assert "SHAPE (2, 64, 64)" in proc.stdout


BENCH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import tilead.atomic
    import tilead.benchmarking.environment
    import tilead.benchmarking.report
    import tilead.benchmarking.runner
    import tilead.benchmarking.stats
    import tilead.benchmarking.targets
    import tilead.cli.bench
    import tilead.cli.predict
    import tilead.viz.overlays  # tilead-predict's overlays
    import tilead.viz.report
    print("OK", tilead.benchmarking.stats.latency_stats([0.001, 0.003]).mean_ms)
    print("TRAINER", sorted(m for m in sys.modules if m.startswith("tilead.trainer")))
    """
)


BACKENDS_SCRIPT = textwrap.dedent(
    """
    import importlib
    import importlib.abc
    import sys

    BLOCKED = ("torch", "torchvision", "timm", "cv2")
    FORBIDDEN = ("tilead.trainer", "tilead.exporter", "tilead.cli", "tilead.demo", "tilead.benchmarking")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith(FORBIDDEN):
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import tilead.runtime
    from tilead.runtime import backends

    modules = [spec.module for spec in backends.REGISTRY.values()]
    modules += ["tilead.runtime.backends.base", "tilead.runtime.backends.tensorrt_modules"]
    for module in modules:
        importlib.import_module(module)
    import openvino  # the OpenVINO backend's package itself must not pull torch or cv2 in either

    openvino.Core()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith(FORBIDDEN))
    print("MODULES", len(modules))
    print("LOADED", loaded)
    """
)


def test_every_backend_module_imports_without_torch_cv2_trainer_exporter_or_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BACKENDS_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "MODULES 5" in proc.stdout
    assert "LOADED []" in proc.stdout


def test_bench_and_predict_commands_import_without_torch() -> None:
    # tilead-bench's own route and tilead-predict need only the runtime; torch comes in for --compare torch only.
    proc = subprocess.run(
        [sys.executable, "-c", BENCH_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK 2.0" in proc.stdout
    assert "TRAINER []" in proc.stdout  # tilead predict's overlays and the report page need no trainer module
