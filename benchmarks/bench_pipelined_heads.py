"""The hybrid backend's heads after a barrier or in the backbone's queue, side by side (issue #21).

One ``Predictor`` (backend ``hybrid``, native heads) on a bf16 / int8_bf16 bundle; its streamed call
alternates between two forms of the same work, call by call on the same decoded images:

* ``barrier``: every backbone call of the batch, then the heads
  (``run_backbone_stream`` then ``run_locations``: the runtime before this change);
* ``queued``: :func:`tilead.runtime.backends.pipelined.backbone_then_heads`, what the runtime runs now for
  batches of at most ``hybrid.QUEUED_IMAGES`` images (this script sends every batch through it): the last
  backbone calls and the heads in one queue, a head starting once its own locations' features are there.

Which form runs first alternates round by round (the first call of a pair was measured up to 7 % faster at
batch 8 on a 2-core Zen 4, whichever form it was). Reported per batch: median ms per image of each form, the
ratio ``barrier / queued`` (above 1: queued is faster) and the largest map difference (0: the same maps).
Run it on a quiet CPU.

Usage:
    python benchmarks/bench_pipelined_heads.py BUNDLE --images DIR [--count 8] [--batch 1 8] [--repeats 5]
        [--json out.json]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_bundles_side_by_side import load_images, one_bundle_args, rounds, write_report

import tilead.runtime.backends.hybrid as hybrid
from tilead.runtime import Predictor
from tilead.runtime.backends.base import run_backbone_stream, run_locations
from tilead.runtime.backends.pipelined import backbone_then_heads

QUEUED = backbone_then_heads
QUEUED_IMAGES = hybrid.QUEUED_IMAGES


def use(form: Callable[..., Any]) -> None:
    """Make the hybrid backend call ``form`` where it calls :func:`backbone_then_heads`."""
    vars(hybrid)["backbone_then_heads"] = form
    vars(hybrid)["QUEUED_IMAGES"] = 1 << 30  # every batch through the function: the two forms at batch 8 too


def barrier(
    manifest: Any, stream: Any, run: Any, buffers: Any, workers: Any, timer: Any, jobs: Any, run_one: Any
) -> Any:
    """The same arguments as :func:`backbone_then_heads`, run as before: all backbone calls, then the heads."""
    features = run_backbone_stream(manifest, stream, run, buffers, workers, timer, workers._max_workers)
    try:
        return run_locations(manifest, features, run_one, workers, timer, jobs)
    finally:
        buffers.give(features)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and write JSON with ``--json``)."""
    args = one_bundle_args(__doc__, argv, count=8, repeats=5)
    from tilead.benchmarking.environment import cpu_model

    predictor = Predictor(args.bundle, backend="hybrid")
    if not predictor._backend.native_heads or predictor.location_workers < 2:  # type: ignore[union-attr]
        raise SystemExit("this compares the native heads' two forms on 2 or more location workers")
    images = load_images(args.images, max(args.count, max(args.batch)), predictor.manifest.grid.image_size)
    forms: dict[str, Callable[..., Any]] = {"barrier": barrier, "queued": QUEUED}
    print(f"{cpu_model()}; {args.bundle}: {len(images)} images, {args.repeats} repeats; ms per image (median)")
    print(f"{'batch':>5} {'barrier':>9} {'queued':>9} {'barrier/queued':>15} {'map diff':>9}")
    rows = []
    try:
        for batch in args.batch:
            chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
            seconds: dict[str, list[float]] = {k: [] for k in forms}
            diff = 0.0
            for form in forms.values():  # warm-up
                use(form)
                predictor.predict(chunks[0], input_order="RGB")
            for chunk, order in rounds(forms, args.repeats, chunks):
                maps: dict[str, np.ndarray] = {}
                for name in order:
                    use(forms[name])
                    start = time.perf_counter()
                    out = predictor.predict(chunk, input_order="RGB")
                    seconds[name].append((time.perf_counter() - start) / len(chunk))
                    maps[name] = np.stack([p.anomaly_map for p in (out if isinstance(out, list) else [out])])
                diff = max(diff, float(np.abs(maps["barrier"] - maps["queued"]).max()))
            med = {k: float(np.median(v)) for k, v in seconds.items()}
            row = {"batch": batch, "barrier_ms": 1e3 * med["barrier"], "queued_ms": 1e3 * med["queued"],
                   "ratio": med["barrier"] / med["queued"], "max_map_diff": diff}  # fmt: skip
            rows.append(row)
            print(f"{batch:>5} {row['barrier_ms']:>9.2f} {row['queued_ms']:>9.2f} {row['ratio']:>14.3f}x {diff:>9.2e}")
    finally:
        use(QUEUED)
        vars(hybrid)["QUEUED_IMAGES"] = QUEUED_IMAGES
        predictor.close()
    write_report(args.json, {"cpu": cpu_model(), "bundle": str(args.bundle), "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
