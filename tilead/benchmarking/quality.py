"""A bundle's quality on its run's test set, for the benchmark scripts (``tilead-eval --bundle`` in a child)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

METRICS = ("image_auroc", "pixel_auroc", "aupro")
"""The figures :func:`bundle_quality` returns."""


def bundle_quality(
    run: Path, bundle: Path, out: Path, *, reuse: bool = False, predictor: dict[str, Any] | None = None
) -> dict[str, float]:
    """Image/pixel AUROC and AUPRO of ``bundle`` on ``run``'s test set (``tilead-eval RUN --bundle``, no overlays).

    Args:
        run: The training run the bundle was exported from.
        bundle: The bundle folder.
        out: The evaluation's output folder (its ``metrics.json`` is read).
        reuse: Read an existing ``out/metrics.json`` instead of evaluating again.
        predictor: More Predictor options (e.g. ``{"backend": "openvino", "bf16_backbone": True}``): then the
            evaluation runs in this process (:func:`tilead.trainer.evaluation.evaluate`), since ``tilead-eval``
            has no such options.

    Returns:
        The first value of each of :data:`METRICS` found in ``metrics.json`` (depth first).

    Raises:
        subprocess.CalledProcessError: If the evaluation fails.
    """
    if predictor and not (reuse and (out / "metrics.json").is_file()):
        from tilead.trainer.evaluation import evaluate

        print(f"+ evaluate({run}, bundle={bundle}, predictor_options={predictor})", flush=True)
        evaluate(run, out, bundle=bundle, progress=False, overrides={"eval.overlays": 0}, predictor_options=predictor)
    elif not (reuse and (out / "metrics.json").is_file()):
        cmd = [str(Path(sys.executable).parent / "tilead-eval"), str(run), "--bundle", str(bundle), "-o", str(out)]
        cmd += ["--no-progress", "--set", "eval.overlays=0"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    flat: dict[str, float] = {}
    stack: list[tuple[str, Any]] = [("", json.loads((out / "metrics.json").read_text()))]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{prefix}{k}.", v) for k, v in node.items())
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            name = prefix[:-1].split(".")[-1]
            if name in METRICS and name not in flat:
                flat[name] = float(node)
    return flat
