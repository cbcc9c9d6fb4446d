"""The lean install's promise (issue #15 item 7): no torch, no OpenCV.

tilead.runtime (every backend included) never imports torch, cv2, the trainer, the exporter or the CLI;
``tilead predict``, ``tilead calibrate`` and ``tilead bench`` run end to end with torch and cv2 unimportable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


def blocking(blocked: tuple[str, ...], forbidden: tuple[str, ...]) -> str:
    """The start of a child script that makes ``blocked`` packages and ``forbidden`` tilead modules unimportable."""
    return textwrap.dedent(
        f"""
        import importlib.abc
        import sys

        BLOCKED = {blocked!r}
        FORBIDDEN = {forbidden!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED or name.startswith(FORBIDDEN):
                    raise ImportError(f"blocked in this test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        """
    )


SCRIPT = blocking(
    ("torch", "torchvision", "timm", "cv2"),
    ("tilead.trainer", "tilead.exporter", "tilead.cli", "tilead.demo", "tilead.benchmarking"),
) + textwrap.dedent(
    """
    import numpy as np
    from tilead import runtime

    grid = runtime.TileGrid(64, 32, 24)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tiles = runtime.tile_images(images, grid)
    maps = np.ascontiguousarray(tiles[:, :, 0, ::8, ::8])
    merged = runtime.merge_maps(maps, grid, seam=runtime.SeamSmoothing())
    result = runtime.normalize_maps(merged, pixel_threshold=0.0, image_threshold=0.0,
                                    pixel_range=(-2.0, 2.0), image_range=(-2.0, 2.0))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith(FORBIDDEN))
    print("LOADED", loaded)
    print("SHAPE", result.maps.shape)
    """
)


def test_runtime_runs_with_torch_cv2_trainer_exporter_and_cli_unimportable() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
    assert "SHAPE (2, 64, 64)" in proc.stdout


BENCH_SCRIPT = blocking(("torch", "torchvision", "timm", "cv2"), ()) + textwrap.dedent(
    """
    import tilead.atomic
    import tilead.benchmarking.environment
    import tilead.benchmarking.report
    import tilead.benchmarking.runner
    import tilead.benchmarking.stats
    import tilead.benchmarking.targets
    import tilead.calibrate
    import tilead.cli.bench
    import tilead.cli.calibrate
    import tilead.cli.main
    import tilead.cli.predict
    import tilead.viz.overlays  # tilead-predict's overlays
    import tilead.viz.report
    import tilead.imagefile
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
    assert "MODULES 6" in proc.stdout  # onnxruntime, openvino, tensorrt, hybrid, base, tensorrt_modules
    assert "LOADED []" in proc.stdout


def test_bench_predict_and_calibrate_commands_import_without_torch_or_cv2() -> None:
    # tilead-bench's own route, predict and calibrate need only the runtime; torch comes in for --compare torch only.
    proc = subprocess.run(
        [sys.executable, "-c", BENCH_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK 2.0" in proc.stdout
    assert "TRAINER []" in proc.stdout  # tilead predict's overlays and the report page need no trainer module


CLI_SCRIPT = blocking(
    ("torch", "torchvision", "timm", "cv2", "onnx"), ("tilead.trainer", "tilead.exporter", "tilead.demo")
) + textwrap.dedent(
    """
    from tilead.cli.main import main

    sys.argv = ["tilead", *sys.argv[1:]]
    try:
        main()
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith(FORBIDDEN))
        print("LOADED", loaded, file=sys.stderr)
    """
)


def _tilead_without_torch_or_cv2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_predict_calibrate_and_bench_run_without_torch_or_cv2(tmp_path: Path) -> None:
    from bundle_factory import make_bundle
    from PIL import Image

    bundle = make_bundle(tmp_path / "bundle")
    rng = np.random.default_rng(0)
    good = tmp_path / "images" / "good"
    good.mkdir(parents=True)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")

    out = tmp_path / "out"
    proc = _tilead_without_torch_or_cv2("predict", str(bundle), str(tmp_path / "images"), "-o", str(out))
    assert "LOADED []" in proc.stderr, proc.stderr
    assert proc.returncode == 3, proc.stderr  # one line carries the broken file's error
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 11
    scored = [r for r in records if r["error"] is None]
    assert len(scored) == 10
    assert all(isinstance(r["score"], float) for r in scored)
    # Overlays are drawn and encoded with Pillow: written without OpenCV, one per scored image.
    for r in scored:
        with Image.open(out / r["overlay"]) as pic:
            assert pic.mode == "RGB"
            assert pic.size[0] == 2 * 64

    calibrated = _tilead_without_torch_or_cv2("calibrate", str(bundle), "--good", str(good), "--dry-run", "--json")
    assert calibrated.returncode == 0, calibrated.stderr
    assert "LOADED []" in calibrated.stderr
    assert json.loads(calibrated.stdout)["counts"]["good"] == 10

    bench = _tilead_without_torch_or_cv2(
        "bench", str(bundle), "--image", str(good / "000.png"), "--iterations", "2", "--warmup", "1"
    )
    assert bench.returncode == 0, bench.stderr
    assert "LOADED []" in bench.stderr


MISSING_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    MISSING = ("torch", "torchvision", "timm", "cv2", "onnx", "pydantic", "safetensors", "sklearn")

    class Missing(importlib.abc.MetaPathFinder):  # as on the runtime-only install: these are not there
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in MISSING:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())

    from tilead.cli.main import main

    sys.argv = ["tilead", *sys.argv[1:]]
    main()
    """
)


def test_training_commands_on_a_runtime_only_install_name_the_extra(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "padim_demo.yaml"
    for args in (["train", "--config", str(config), "-o", str(tmp_path / "run")], ["eval", str(tmp_path)]):
        proc = subprocess.run(
            [sys.executable, "-c", MISSING_SCRIPT, *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "which this installation lacks" in proc.stderr
        assert "pip install 'tilead[train]'" in proc.stderr
