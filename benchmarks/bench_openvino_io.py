"""OpenVINO backbone calls: tiles and features bound in place vs copied (issue #21 item 3).

The bundle's shared backbone is compiled as the runtime compiles it
(:func:`tilead.runtime.backends.openvino.compile_backbone`: bf16 on a CPU with bf16 units for a bf16 bundle,
else f32; uint8 tiles where the manifest's ``backbone_input`` says so) and called on random tiles, ``--batch``
tiles per call, into a float32 feature buffer, two ways alternating call by call:

* **copy**: ``request.infer([tiles])`` (OpenVINO's Python input dispatch copies the tiles into the request)
  and the output tensor copied into the buffer, the runtime's path before this change;
* **in place**: :func:`tilead.runtime.backends.openvino.bind_and_infer`, the tiles and the buffer bound to
  the request as tensors sharing their memory, the request's own tensors restored afterwards.

Reported per batch: median ms per call of each, their ratio, and whether the features are identical.
Run it on a quiet CPU.

Usage:
    python benchmarks/bench_openvino_io.py BUNDLE [--batch 1 4] [--repeats 30] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tilead.runtime.backends.hybrid import bf16_config
from tilead.runtime.backends.openvino import bind_and_infer, compile_backbone, import_openvino
from tilead.runtime.bundle import read_manifest, read_verified_file


def _copy(request: Any, tiles: np.ndarray, out: np.ndarray, output: Any) -> None:
    """The runtime's path before in-place binding: OpenVINO's input dispatch, then the output copied into ``out``."""
    out[...] = request.infer([tiles])[output]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print the table (see the module docstring); returns the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    manifest = read_manifest(args.bundle)
    if manifest.backbone is None or manifest.features is None:
        raise SystemExit(f"{args.bundle}: layout {manifest.layout!r} has no shared backbone")
    ov = import_openvino()
    core = ov.Core()
    bf16 = manifest.openvino_refit and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    config = bf16_config(args.threads) if bf16 else {**bf16_config(args.threads), "INFERENCE_PRECISION_HINT": "f32"}
    uint8 = manifest.uint8_backbone
    onnx = read_verified_file(args.bundle, manifest.backbone)
    location = compile_backbone(core, onnx, config, manifest.preprocessing, manifest.grid.tile_size, uint8)
    th, tw = manifest.grid.tile_size
    c = manifest.preprocessing.channels
    rng = np.random.default_rng(0)
    rows = []
    print(
        f"{args.bundle}: backbone {'bf16' if bf16 else 'f32'}, {'uint8' if uint8 else 'float32'} tiles of {th}x{tw}, "
        f"{args.threads} threads; ms per call (median of {args.repeats})"
    )
    print(f"{'batch':>5} {'copy':>9} {'in place':>9} {'ratio':>7}  identical")
    for n in args.batch:
        if uint8:
            tiles = rng.integers(0, 256, (n, th, tw, c), dtype=np.uint8)
        else:
            tiles = rng.standard_normal((n, c, th, tw)).astype(np.float32)
        copied = np.empty((n, *manifest.features), np.float32)
        bound = np.empty_like(copied)
        request = location.compiled.create_infer_request()
        calls: dict[str, Callable[[], None]] = {
            "copy": partial(_copy, request, tiles, copied, location.outputs[0]),
            "in_place": partial(bind_and_infer, request, tiles, bound, location.outputs[0]),
        }
        for _ in range(3):
            for fn in calls.values():
                fn()
        times: dict[str, list[float]] = {"copy": [], "in_place": []}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        a, b = (1000 * float(np.median(times[k])) for k in ("copy", "in_place"))
        same = bool(np.array_equal(copied, bound))
        rows.append({"batch": n, "copy_ms": a, "in_place_ms": b, "ratio": a / b, "identical": same})
        print(f"{n:>5} {a:>9.3f} {b:>9.3f} {a / b:>6.3f}x  {same}")
    report = {"bundle": str(args.bundle), "bf16": bf16, "uint8": uint8, "threads": args.threads, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
