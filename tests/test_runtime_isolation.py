"""tilead.runtime never imports torch (nor cv2), and works where torch cannot be imported."""

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
    import tilead.trainer.overlays  # tilead-predict's overlays
    print("OK", tilead.benchmarking.stats.latency_stats([0.001, 0.003]).mean_ms)
    """
)


def test_bench_and_predict_commands_import_without_torch() -> None:
    # tilead-bench's own route and tilead-predict need only the runtime; torch comes in for --compare torch only.
    proc = subprocess.run(
        [sys.executable, "-c", BENCH_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK 2.0" in proc.stdout
