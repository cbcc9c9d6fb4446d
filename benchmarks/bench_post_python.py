"""The Python around the post-processing pass, before and after it was trimmed, side by side (issue #21, item 3).

At batch 1 the fused post-processing pass (``tilead._kernels.postprocess_maps``) runs right after the heads,
whose fp16 triangles have streamed through the caches: the Python before and after the kernel (checks,
conversions, the output buffers' leases) then takes several times what it takes back to back. Two forms of
the same Predictor call, alternating call by call on the same decoded images:

* ``before``: the pass's settings checked and converted on every call (the PostProcessor's cached
  :class:`~tilead.runtime.postprocess.FusedPass` hidden) and the output buffers' leases given back through a
  ``weakref.finalize`` (the previous mechanism, kept here to measure against);
* ``after``: the runtime as it is (the pass built once per PostProcessor, leases that give their buffer back
  from ``__del__``).

Both forms use the one output pool of the Predictor, so the image-size maps reuse the same buffers (the
features', after the heads) in both. Reported per batch: ms per image (median), the share outside inference
(``1 - inference / wall`` from ``Predictor.predict_timed``), the time outside inference per image, the
``untile`` stage (the pass with its Python), the ratio of the outside times (above 1: ``after`` spends less)
and the largest map difference (0: the same maps). Run it on a quiet CPU.

Usage:
    python benchmarks/bench_post_python.py BUNDLE --images DIR [--count 16] [--batch 1 8] [--repeats 8]
        [--json out.json]
"""

from __future__ import annotations

import time
import types
import weakref
from typing import Any

import numpy as np
from bench_bundles_side_by_side import load_images, one_bundle_args, rounds, write_report

from tilead.runtime import Predictor
from tilead.runtime.buffers import LeasePool, _Lease
from tilead.runtime.postprocessor import PostProcessor


class _PerCallPost(PostProcessor):
    """A PostProcessor without its kept fused pass: ``apply`` checks and converts the settings on every call."""

    @property
    def fused_pass(self) -> None:
        """Never kept: :func:`~tilead.runtime.postprocessor.postprocess_maps` builds the pass itself."""
        return None


class _WeakLease(_Lease):
    """A lease that can be weakly referenced (the previous lease had a ``__weakref__`` slot)."""

    __slots__ = ("__weakref__",)


def _finalize_lease(pool: LeasePool, view: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """The previous lease: a ``weakref.finalize`` on the owner gives ``buffer`` back (its ``__del__`` does not)."""
    lease = _WeakLease(view, buffer, lambda _: None)
    weakref.finalize(lease, pool._give, buffer).atexit = False
    out: np.ndarray = np.asarray(lease)
    return out


def use(predictor: Predictor, form: str, posts: dict[str, PostProcessor]) -> None:
    """Put ``predictor`` in ``form`` (``before`` or ``after``)."""
    predictor.post = posts[form]
    pool = predictor._outputs
    if form == "before":
        pool._lease = types.MethodType(_finalize_lease, pool)  # type: ignore[method-assign]
    else:
        vars(pool).pop("_lease", None)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and write JSON with ``--json``)."""
    args = one_bundle_args(__doc__, argv, count=16, repeats=8)
    from tilead.benchmarking.environment import cpu_model

    predictor = Predictor(args.bundle)
    after = predictor.post
    if after.fused_pass is None:
        raise SystemExit("this bundle's post-processing does not run the fused pass (canvas is not the image)")
    posts: dict[str, PostProcessor] = {
        "before": _PerCallPost(after.grid, after.weights, after.seam, after.stats, after.image_score),
        "after": after,
    }
    images = load_images(args.images, max(args.count, max(args.batch)), predictor.manifest.grid.image_size)
    print(f"{cpu_model()}; {args.bundle} ({', '.join(predictor.providers)}): {len(images)} images, "
          f"{args.repeats} repeats; per image, median")  # fmt: skip
    print(f"{'batch':>5} {'form':>7} {'ms':>8} {'outside':>8} {'outside ms':>11} {'untile ms':>10} "
          f"{'before/after outside':>21} {'map diff':>9}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        for batch in args.batch:
            chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
            samples: dict[str, dict[str, list[float]]] = {f: {"wall": [], "outside": [], "untile": []} for f in posts}
            diff = 0.0
            for form in posts:  # warm-up
                use(predictor, form, posts)
                predictor.predict(chunks[0], input_order="RGB")
            for chunk, order in rounds(posts, args.repeats, chunks):
                maps: dict[str, np.ndarray] = {}
                for form in order:
                    use(predictor, form, posts)
                    start = time.perf_counter()
                    out, times = predictor.predict_timed(chunk, input_order="RGB")
                    wall = time.perf_counter() - start
                    s = samples[form]
                    s["wall"].append(wall / len(chunk))
                    s["outside"].append((wall - times.seconds.get("inference", 0.0)) / len(chunk))
                    s["untile"].append(times.seconds.get("untile", 0.0) / len(chunk))
                    maps[form] = np.stack([p.anomaly_map for p in out])
                    del out
                diff = max(diff, float(np.abs(maps["before"] - maps["after"]).max()))
            med = {f: {k: float(np.median(v)) for k, v in s.items()} for f, s in samples.items()}
            ratio = med["before"]["outside"] / med["after"]["outside"]
            for form in posts:
                m = med[form]
                share = float(np.median(np.array(samples[form]["outside"]) / np.array(samples[form]["wall"])))
                rows.append({"batch": batch, "form": form, "ms": 1e3 * m["wall"], "outside_share": share,
                             "outside_ms": 1e3 * m["outside"], "untile_ms": 1e3 * m["untile"],
                             "before_over_after_outside": ratio, "max_map_diff": diff})  # fmt: skip
                print(f"{batch:>5} {form:>7} {1e3 * m['wall']:>8.2f} {100 * share:>7.2f}% {1e3 * m['outside']:>11.3f} "
                      f"{1e3 * m['untile']:>10.3f} {ratio:>20.3f}x {diff:>9.2e}")  # fmt: skip
    finally:
        use(predictor, "after", posts)
        predictor.close()
    write_report(args.json, {"cpu": cpu_model(), "bundle": str(args.bundle), "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
