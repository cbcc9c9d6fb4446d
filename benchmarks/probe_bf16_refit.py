"""Experiment: a shared PaDiM bundle whose Gaussians are refit on OpenVINO's bf16 backbone features (issue #21).

Superseded by ``tilead-export --precision bf16`` (:mod:`tilead.exporter.bf16`), kept as the record of the
experiment. A bf16 backbone (``Predictor(backend="openvino", bf16_backbone=True)``) moves the features about as
far from FP32 as INT8 does (6.5 % on bottle tiles); the INT8 export refits each location's Gaussians
on the INT8 features, a bf16 run has no such refit and loses most of its pixel quality
(docs/cpu_speed.md). This probe asks whether a refit would fix it, before building a ``bf16``
precision into the exporter: it runs the exporter's own INT8 path (:func:`tilead.exporter.bundle.export_bundle`
``precision="int8"``, ``layout="shared_backbone"``) with two of its functions replaced for this
process only:

* the backbone's quantization (``shared_backbone.quantize_location``) does nothing, so the backbone
  graph stays FP32;
* the PaDiM refit (``bundle.refit_padim``) reads the features from OpenVINO with
  ``INFERENCE_PRECISION_HINT`` ``bf16`` (needs a CPU with bf16 units) instead of ONNX Runtime.

The manifest is then marked ``fp32`` (its graphs are FP32; OpenVINO refuses INT8 bundles) and the
bundle evaluated with :func:`tilead.benchmarking.quality.bundle_quality` on OpenVINO with the bf16
backbone. The export's parity check is off (its INT8 tolerance set to :data:`PARITY_OFF`): quality is
judged by the evaluation. Quality figures only.

Usage::

    python benchmarks/probe_bf16_refit.py RUN OUT [--eval OUT_EVAL]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tilead.exporter.bundle as export_module
import tilead.exporter.shared_backbone as shared_module
from tilead.benchmarking.quality import bundle_quality
from tilead.exporter.quantize import QuantizeInfo
from tilead.runtime.bundle import write_manifest

PARITY_OFF = 1e9
"""The INT8 tolerance passed to the export: no difference reaches it (finite: the manifest records it)."""


class Bf16Backbone:
    """An ONNX Runtime-like ``run`` over OpenVINO's bf16 compile of ``backbone.onnx`` (one tile per call)."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        from tilead.runtime.backends.openvino import require_bf16

        core = ov.Core()
        require_bf16(core)
        config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        self.request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Features of every tile in ``feeds`` (its one input), float32 ``(n, d, fh, fw)``."""
        del names
        tiles = next(iter(feeds.values()))
        return [np.concatenate([np.array(self.request.infer([tiles[i : i + 1]])[0]) for i in range(len(tiles))])]


def export_refit(run: Path, out: Path) -> Path:
    """Export ``run`` as a shared FP32 bundle whose PaDiM heads are refit on bf16 features (see the module text)."""
    backbones: dict[str, Bf16Backbone] = {}

    def keep_fp32(fp32: Path, target: Path, batches: Sequence[np.ndarray]) -> QuantizeInfo:
        backbones["bf16"] = Bf16Backbone(Path(target))
        return QuantizeInfo(backbone_nodes=0, fp32_nodes=0, calibration_tiles=sum(len(b) for b in batches))

    refit = shared_module.refit_padim  # what bundle.py imported

    def refit_on_bf16(session: Any, head: Any, batches: Iterable[np.ndarray], eps: float) -> Any:
        del session
        return refit(backbones["bf16"], head, batches, eps)

    setattr(shared_module, "quantize_location", keep_fp32)  # noqa: B010 (this process only)
    setattr(export_module, "refit_padim", refit_on_bf16)  # noqa: B010
    bundle = export_module.export_bundle(
        run, out, progress=True, precision="int8", layout="shared_backbone", calibration_images=1,
        int8_tolerance=PARITY_OFF, overwrite=True,
    ).bundle  # fmt: skip
    data = json.loads((bundle / "manifest.json").read_text())
    data["model"]["precision"] = "fp32"
    data["source"]["quantization"] = {"experiment": "PaDiM heads refit on OpenVINO bf16 backbone features"}
    write_manifest(bundle, data)
    return bundle


def main(argv: list[str] | None = None) -> int:
    """Export, then evaluate on OpenVINO with the bf16 backbone; print the metrics."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--eval", type=Path, default=None, help="evaluation folder [OUT.eval_bf16]")
    args = ap.parse_args(argv)
    bundle = export_refit(args.run, args.out)
    where = args.eval or args.out.with_name(args.out.name + ".eval_bf16")
    quality = bundle_quality(args.run, bundle, where, predictor={"backend": "openvino", "bf16_backbone": True})
    print("bf16 backbone, heads refit on bf16 features:", json.dumps(quality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
