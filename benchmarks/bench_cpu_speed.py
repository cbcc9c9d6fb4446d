"""CPU speed of the bundle layouts and precisions side by side in one process (issue #21, items 2-4).

Two image sizes, each with up to four bundles of the same training run:

* **2048**: synthetic 2048x2048 images (the demo generator), PaDiM in 4x4 tiles of 512
  (16 locations), trained on a few images (speed does not depend on how many);
* **bottle**: MVTec AD bottle (900x900, 2x2 tiles of 464), the run ``runs/padim_bottle``.

Bundles: ``per_location`` FP32 (each location's full graph: the layout before issue #21),
``shared_backbone`` FP32 (one backbone graph for every tile, a head per location),
``shared_backbone`` INT8 and ``per_location`` INT8 (``--precision int8``), ``shared_backbone``
bf16 (``--precision bf16``: PaDiM heads refit on OpenVINO's bf16 backbone features; a CPU with
bf16 units; run by the ``hybrid`` backend, OpenVINO backbone + ONNX Runtime heads), ``shared_backbone``
int8_bf16 (``--precision int8_bf16``: the INT8 backbone graph, heads refit on OpenVINO's features of it
with the bf16 hint; ``hybrid`` too). Missing runs and bundles are made first (data, ``tilead-train``,
``tilead-export``), under ``--work``.

A variant is ``layout:precision[@backend[+bf16]]``: the backend runs the bundle
(``onnxruntime``, the default, ``openvino``, or ``hybrid``: bf16 and int8_bf16 bundles only, and
the default for them, with the bundle's native PaDiM heads; ``hybrid-onnx``: the same
with the heads' ONNX graphs, ``Predictor(native_heads=False)``), and ``+bf16`` asks for the
opt-in bf16 backbone (``Predictor(bf16_backbone=True)``, OpenVINO on a CPU with
bf16 units, ``shared_backbone`` bundles). Variants of one ``layout:precision``
share its bundle, so e.g. ``shared_backbone:int8 shared_backbone:int8@openvino
shared_backbone:int8@openvino+bf16`` compares the backends side by side.

Per size, every bundle is loaded in this process and the calls alternate bundle by bundle
on the same decoded images (decoding excluded), so all see the same machine load. Reported
per bundle and batch: median ms per image (a batch's wall time / its images), the share
outside model inference (``1 - inference / wall`` from ``Predictor.predict_timed``), and the
ratio to ``--baseline`` (``per_location`` FP32 unless given) at that batch. Peak RSS comes from one fresh child process
per bundle that imports only ``tilead.runtime``, loads the bundle and predicts at batch 1 and 8
(``VmHWM``; ``ru_maxrss`` would carry the parent's peak over the exec). ``--quality`` adds
image/pixel AUROC and AUPRO of each bottle bundle
(``tilead-eval RUN --bundle B``).

Targets (issue #21, 2-core CPU): 2048 at batch 1 <= 170 ms/image; bottle <= 30 ms/image;
share outside inference <= 5 %; peak RSS at 2048 <= 1.5 GB. The table marks them.

Usage:
    python benchmarks/bench_cpu_speed.py [--work out/bench/cpu_speed] [--sizes big bottle]
        [--big 2048] [--variants per_location:fp32 shared_backbone:fp32 shared_backbone:int8
        shared_backbone:int8@openvino shared_backbone:int8@openvino+bf16 shared_backbone:bf16@hybrid
        shared_backbone:bf16@hybrid-onnx shared_backbone:int8_bf16@hybrid] [--baseline VARIANT]
        [--images 8] [--repeats 3] [--batch 1 8] [--threads N] [--quality] [--json out/bench/cpu_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilead.benchmarking.environment import process_memory_mib
from tilead.benchmarking.quality import bundle_quality
from tilead.exporter.quantize import quantizes_backbone
from tilead.runtime.bundle import refit_on_openvino

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import _BlockTorch, read_images, test_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BOTTLE_DATA = ROOT.parent / "shared" / "data" / "mvtec_bottle"
VARIANTS = (
    "per_location:fp32", "shared_backbone:fp32", "shared_backbone:int8", "per_location:int8", "shared_backbone:bf16",
    "shared_backbone:int8_bf16",
)  # fmt: skip
"""The bundles (``layout:precision``); a variant may add ``@backend[+bf16]`` (:func:`parse_variant`)."""
BACKENDS = ("onnxruntime", "openvino", "hybrid", "hybrid-onnx")
BASELINE = "per_location:fp32"
TARGETS_MS = {"2048": 170.0, "bottle": 30.0}
OUTSIDE_MAX = 0.05
RSS_MAX_MIB = {"2048": 1536.0}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``layout:precision[@backend[+bf16]]`` -> (bundle variant ``layout:precision``, Predictor options).

    Raises:
        argparse.ArgumentTypeError: Naming what is wrong and what is expected.
    """
    bundle, _, rest = text.partition("@")
    if bundle not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{text!r}: the bundle part must be one of {', '.join(VARIANTS)}")
    if not rest:
        return bundle, {}
    backend, _, extra = rest.partition("+")
    if backend not in BACKENDS or extra not in ("", "bf16"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected layout:precision@BACKEND[+bf16] with BACKEND one of {', '.join(BACKENDS)}"
        )
    options: dict[str, Any] = {"backend": backend}
    if backend == "hybrid-onnx":  # the hybrid with the heads' ONNX graphs instead of the native heads
        backend = "hybrid"
        options = {"backend": backend, "native_heads": False}
    if (backend == "hybrid") != refit_on_openvino(bundle.split(":")[1]) and backend != "openvino":
        raise argparse.ArgumentTypeError(
            f"{text!r}: a bf16 bundle runs @hybrid (or @openvino), and @hybrid runs bf16 bundles only (precision "
            "bf16 or int8_bf16; docs/cpu_speed.md)"
        )
    if backend == "openvino" and bundle.endswith(":int8"):
        raise argparse.ArgumentTypeError(f"{text!r}: the OpenVINO backend refuses INT8 bundles (docs/cpu_speed.md)")
    if extra:
        if not bundle.startswith("shared_backbone:") or backend != "openvino":
            raise argparse.ArgumentTypeError(f"{text!r}: +bf16 needs a shared_backbone bundle @openvino")
        options["bf16_backbone"] = True
    return bundle, options


def variant_arg(text: str) -> str:
    """The --variants type: a checked variant (:func:`parse_variant`), kept as text."""
    parse_variant(text)
    return text


def sh(cmd: list[str]) -> None:
    """Run a command (progress to the terminal), raising on failure."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_big_run(work: Path, side: int, train_images: int) -> tuple[Path, Path]:
    """Synthetic ``side`` x ``side`` data and its PaDiM run in 4x4 tiles of ``side / 4``, made when missing."""
    from tilead.demo.synthetic import SyntheticSpec, generate

    data = work.resolve() / f"data{side}"  # absolute: the config resolves a relative data.root against its folder
    if not (data / "train").is_dir():
        generate(data, SyntheticSpec(image_size=side, train_good=max(train_images, 3), test_good=4, test_per_defect=2))
    run = work / f"run{side}"
    if not (run / "stats.json").is_file():
        tile = side // 4
        sh([str(BIN / "tilead-train"), "--config", str(ROOT / "configs" / "padim_demo.yaml"), "-o", str(run),
            "--resume", "--no-progress", "--set", f"data.root={data}", "--set", f"grid.tile_size={tile}",
            "--set", f"grid.stride={tile}", "--set", f"data.max_train_images={train_images}"])  # fmt: skip
    return data, run


def ensure_bottle_run(run: Path) -> Path:
    """The bottle run (``make train-bottle``'s config), trained when missing (~5 min on a quiet CPU)."""
    if not (run / "stats.json").is_file():
        sh([str(BIN / "tilead-train"), "--config", str(ROOT / "configs" / "padim_bottle.yaml"), "-o", str(run),
            "--resume", "--no-progress"])  # fmt: skip
    return run


BIG_TOLERANCE = 2.0
"""``--parity-tolerance`` of the big run's bf16, int8 and int8_bf16 exports: its Gaussians are fitted on 5 tiles per
location (nearly singular), where bf16 features moved a 2048² demo location's map by 1.14 of its range and INT8 ones
(the stem stage's expansion quantized too) by 1.03 (the default, 1.0, refused them); the big run measures speed and
memory, not quality."""


def ensure_bundle(
    run: Path, out: Path, variant: str, tolerance: float | None = None, weight_bits: int | None = None
) -> Path:
    """Export ``run`` as ``variant`` (``layout:precision``) into ``out`` when it is not there yet.

    A bundle already there is kept when its layout, precision and (INT8) weight bits are the ones asked for:
    ``weight_bits`` None means the exporter's default (:func:`tilead.exporter.quantize.default_weight_bits`), and a
    manifest without ``model.int8_weight_bits`` has 8.
    """
    from tilead.exporter.quantize import default_weight_bits, quantizes_backbone

    layout, precision = variant.split(":")
    bits = None
    if quantizes_backbone(precision):
        bits = default_weight_bits(precision) if weight_bits is None else weight_bits
    manifest = out / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        same = data.get("layout", "per_location") == layout and data["model"].get("precision", "fp32") == precision
        same = same and (bits is None or data["model"].get("int8_weight_bits", 8) == bits)
        if same and not stale_heads(out, data):
            return out
    extra = [] if tolerance is None else ["--parity-tolerance", str(tolerance)]
    extra += [] if bits is None else ["--int8-weight-bits", str(bits)]
    sh([str(BIN / "tilead-export"), str(run), "-o", str(out), "--layout", layout, "--precision", precision,
        "--overwrite", "--no-progress", *extra])  # fmt: skip
    return out


def stale_heads(bundle: Path, manifest: dict[str, Any]) -> bool:
    """A shared PaDiM bundle from before fp16 heads in memory or, bf16, without native heads (re-exported then)."""
    from tilead.runtime.backends.onnxruntime import folds_constants

    if manifest.get("layout") != "shared_backbone" or manifest["model"].get("family") != "padim":
        return False
    if refit_on_openvino(manifest["model"].get("precision", "fp32")) and not manifest.get("native_heads"):
        return True
    return folds_constants((bundle / manifest["locations"][0]["file"]).read_bytes())


def synthetic_images(data: Path, count: int) -> list[np.ndarray]:
    """``count`` test images of the synthetic set, round-robin over its folders."""
    return read_images(test_images(count, data))


def measure(
    bundles: dict[str, Path], images: list[np.ndarray], batch: int, repeats: int, threads: int | None
) -> dict[str, dict[str, list[float]]]:
    """Alternate every variant's ``predict_timed`` on the same batches (``bundles``: variant -> its bundle).

    Returns:
        ``{variant: {"ms": [ms per image...], "outside": [share outside inference...]}}``.
    """
    from tilead.runtime import Predictor

    predictors = {
        name: Predictor(path, threads=threads, max_batch=batch, **parse_variant(name)[1])
        for name, path in bundles.items()
    }
    try:
        batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
        if not batches:
            raise SystemExit(f"--batch {batch}: more than the {len(images)} images")
        for p in predictors.values():  # warm-up: first-call allocations, thread pools, reused buffers
            p.predict(batches[0])
            p.predict(batches[-1])
        out: dict[str, dict[str, list[float]]] = {n: {"ms": [], "outside": []} for n in predictors}
        for _ in range(repeats):
            for b in batches:
                for name, p in predictors.items():
                    t0 = time.perf_counter()
                    _, times = p.predict_timed(b)
                    wall = time.perf_counter() - t0
                    out[name]["ms"].append(wall * 1e3 / len(b))
                    out[name]["outside"].append(max(0.0, 1.0 - times.seconds.get("inference", 0.0) / wall))
    finally:
        for p in predictors.values():
            p.close()
    return out


def child(bundle: Path, images: list[Path], batches: list[int], threads: int | None, variant: str) -> None:
    """Predictor-only process (torch blocked): load, predict at each batch; peak RSS as JSON on stdout."""
    sys.meta_path.insert(0, _BlockTorch())
    from tilead.runtime import Predictor

    decoded = read_images(images)
    steps: dict[str, dict[str, float]] = {"start": vm_status_mib()}
    options = parse_variant(variant)[1]
    with Predictor(bundle, threads=threads, max_batch=max(batches), **options) as predictor:
        steps["loaded"] = vm_status_mib()
        for batch in batches:
            for _ in range(2):
                predictor.predict(decoded[:batch])
            steps[f"batch {batch}"] = vm_status_mib()
    result = {"rss_before_load_mib": steps["start"]["VmRSS"], "peak_rss_mib": vm_hwm_mib(), "steps": steps}
    print("CHILD-JSON " + json.dumps(result))


def vm_status_mib() -> dict[str, float]:
    """This process's ``VmRSS`` and ``VmHWM`` in MiB (:func:`tilead.benchmarking.environment.process_memory_mib`)."""
    return process_memory_mib()


def vm_hwm_mib() -> float:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss`` it does not carry the parent's peak over exec."""
    try:
        return process_memory_mib()["VmHWM"]
    except RuntimeError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(
    bundle: Path, images: list[Path], batches: list[int], threads: int | None, variant: str
) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--child", str(bundle), "--child-variant", variant, "--batch", *map(str, batches),
           "--paths", *map(str, images)] + (["--threads", str(threads)] if threads else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"RSS child for {bundle} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CHILD-JSON "))
    result: dict[str, Any] = json.loads(line[len("CHILD-JSON ") :])
    return result


def main(argv: list[str] | None = None) -> int:
    """Make what is missing, measure every size, print one table (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "cpu_speed", help="data, runs, bundles")
    ap.add_argument("--sizes", nargs="+", choices=["big", "bottle"], default=["big", "bottle"])
    ap.add_argument("--big", type=int, default=2048, help="side of the synthetic images (4x4 tiles of side/4)")
    ap.add_argument("--variants", nargs="+", type=variant_arg, default=list(VARIANTS[:3]),
                    help="layout:precision[@onnxruntime|@openvino[+bf16]|@hybrid[-onnx]] (see above)")  # fmt: skip
    ap.add_argument("--baseline", type=variant_arg, default=BASELINE,
                    help="the variant the ratios are to (added to --variants when missing)")  # fmt: skip
    ap.add_argument("--bottle-run", type=Path, default=ROOT / "runs" / "padim_bottle")
    ap.add_argument("--bottle-data", type=Path, default=BOTTLE_DATA)
    ap.add_argument("--train-images", type=int, default=6, help="big run: training images (holdout included)")
    ap.add_argument("--images", type=int, default=8, help="test images per size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None, help="inference threads per Predictor [all cores]")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--int8-weight-bits", type=int, choices=(7, 8), default=None,
                    help="INT8 bundles' weight bits (tilead-export --int8-weight-bits) [its default]")  # fmt: skip
    ap.add_argument("--quality", action="store_true", help="also AUROCs and AUPRO of the bottle bundles")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-variant", default=BASELINE, help=argparse.SUPPRESS)
    ap.add_argument("--paths", type=Path, nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child, args.paths, args.batch, args.threads, args.child_variant)
        return 0
    baseline = args.baseline
    if baseline not in args.variants:
        args.variants.insert(0, baseline)
    from tilead.benchmarking.environment import cpu_model

    count = max(args.images, max(args.batch))
    report: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "baseline": baseline, "sizes": {},
    }  # fmt: skip
    for which in args.sizes:
        size = str(args.big) if which == "big" else "bottle"
        if which == "big":
            data, run = ensure_big_run(args.work, args.big, args.train_images)
        else:
            data, run = args.bottle_data, ensure_bottle_run(args.bottle_run)
        bundles: dict[str, Path] = {}
        failed: dict[str, str] = {}
        made: dict[str, Path | None] = {}
        for v in args.variants:
            kind = parse_variant(v)[0]
            if kind not in made:
                try:
                    precision = kind.split(":")[1]
                    refit = refit_on_openvino(precision) or quantizes_backbone(precision)
                    tolerance = BIG_TOLERANCE if which == "big" and refit else None
                    made[kind] = ensure_bundle(
                        run, args.work / f"{size}_{kind.replace(':', '_')}", kind, tolerance, args.int8_weight_bits
                    )
                except subprocess.CalledProcessError as err:  # e.g. an INT8 parity refusal: reported, the rest measured
                    if kind == parse_variant(baseline)[0]:
                        raise
                    made[kind] = None
                    print(f"{size}: {kind}: export failed ({err.returncode}); see the log above", flush=True)
            path = made[kind]
            if path is None:
                failed[v] = f"export of {kind} failed; see the log above"
            else:
                bundles[v] = path
        paths = test_images(count, data)
        images = read_images(paths)
        rows: list[dict[str, Any]] = []
        for batch in args.batch:
            res = measure(bundles, images, batch, args.repeats, args.threads)
            base = float(np.median(res[baseline]["ms"]))
            for variant in bundles:
                ms = float(np.median(res[variant]["ms"]))
                rows.append({
                    "variant": variant, "batch": batch, "ms_per_image": ms, "ratio_vs_baseline": base / ms,
                    **({"ratio_vs_per_location_fp32": base / ms} if baseline == BASELINE else {}),
                    "outside_inference": float(np.median(res[variant]["outside"])), "samples": len(res[variant]["ms"]),
                })  # fmt: skip
        entry: dict[str, Any] = {"run": str(run), "rows": rows, "rss": {}, "quality": {}, "failed": failed}
        if not args.no_rss:
            for variant, bundle in bundles.items():
                entry["rss"][variant] = run_child(bundle, paths[: max(args.batch)], args.batch, args.threads, variant)
        if args.quality and size == "bottle":
            for variant, bundle in bundles.items():
                out = args.work / f"eval_{variant.replace(':', '_').replace('@', '_').replace('+', '_')}"
                entry["quality"][variant] = bundle_quality(
                    run, bundle, out, predictor=parse_variant(variant)[1] or None
                )
        report["sizes"][size] = entry
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict[str, Any]) -> None:
    """One table: per size, bundle and batch; targets marked ``ok`` / ``MISS``."""
    print(f"\ncpu: {report['cpu']} ({report['cores']} logical cores); calls alternate bundle by bundle")
    versus = f"vs {report.get('baseline', BASELINE)}"
    head = ("size", "bundle", "batch", "ms/img", versus, "outside inf.", "peak RSS MiB")
    print(f"{head[0]:>6} {head[1]:>36} {head[2]:>5} {head[3]:>9} {head[4]:>15} {head[5]:>12} {head[6]:>13}")
    for size, entry in report["sizes"].items():
        for row in entry["rows"]:
            rss = entry["rss"].get(row["variant"], {}).get("peak_rss_mib")
            target = TARGETS_MS.get(size)
            mark = "" if target is None or row["batch"] != 1 else (" ok" if row["ms_per_image"] <= target else " MISS")
            out_mark = " ok" if row["outside_inference"] <= OUTSIDE_MAX else " MISS"
            rss_text = "-" if rss is None else f"{rss:.0f}"
            if rss is not None and size in RSS_MAX_MIB:
                rss_text += " ok" if rss <= RSS_MAX_MIB[size] else " MISS"
            print(f"{size:>6} {row['variant']:>36} {row['batch']:>5} {row['ms_per_image']:>6.1f}{mark:<5} "
                  f"{row['ratio_vs_baseline']:>14.2f}x {row['outside_inference'] * 100:>8.1f} %{out_mark:<5} "
                  f"{rss_text:>10}")  # fmt: skip
        for variant, why in entry.get("failed", {}).items():
            print(f"{size:>6} {variant:>36} {why}")
        for variant, q in entry["quality"].items():
            print(f"{size:>6} {variant:>36} quality: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(q.items())))
    print(f"targets (batch 1): 2048 <= {TARGETS_MS['2048']:.0f} ms, bottle <= {TARGETS_MS['bottle']:.0f} ms; "
          f"outside inference <= {OUTSIDE_MAX:.0%}; peak RSS at 2048 <= {RSS_MAX_MIB['2048']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
