"""The benchmark report: one dict holds every figure; the terminal table is rendered from it.

Because the table is drawn from the same dict the JSON writes, the two agree
by construction: every number in the table is a field of the JSON, rounded
for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tilead.benchmarking.runner import PIPELINE_STAGES, Measurement
from tilead.benchmarking.stats import CV_WARNING, latency_stats

STAGE_LABELS = {
    "input": "host input checks + batching",
    "tile": "host preprocessing + tiling",
    "h2d": "host -> device copy",
    "inference": "inference, all locations",
    "untile": "untile",
    "seam": "seam smoothing",
    "crop": "crop to image",
    "normalize": "normalization + threshold",
    "d2h": "device -> host copy",
    "other": "other (Python glue)",
}
LATENCY_KEYS = ("min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")


def summarize_target(batch: int, m: Measurement) -> dict[str, Any]:
    """Statistics, throughput and per-stage means of one target at one batch size.

    Args:
        batch: Images per query.
        m: The target's timed queries.

    Returns:
        ``queries``, ``busy_s`` (sum of its latencies), ``images_per_s``,
        ``latency_ms`` (:class:`LatencyStats` fields), ``latency_per_image_ms``
        (median / batch), ``unstable``, ``stages`` (mean ms per query and share
        of the mean latency, pipeline stages then locations then ``other``).
    """
    stats = latency_stats(m.latencies)
    n = stats.count
    stages: list[dict[str, Any]] = []
    top = 0.0
    for name in PIPELINE_STAGES:
        if name in m.stage_seconds:
            ms = m.stage_seconds[name] / n * 1e3
            top += ms
            stages.append({"stage": name, "mean_ms": ms, "share": ms / stats.mean_ms if stats.mean_ms else 0.0})
    for name, sec in m.stage_seconds.items():
        if name.startswith("location:"):
            stages.append({"stage": name, "mean_ms": sec / n * 1e3, "share": None})
    other = max(0.0, stats.mean_ms - top)
    stages.append({"stage": "other", "mean_ms": other, "share": other / stats.mean_ms if stats.mean_ms else 0.0})
    return {
        "queries": n,
        "busy_s": stats.total_s,
        "images_per_s": batch * n / stats.total_s if stats.total_s > 0 else None,
        "latency_ms": stats.to_dict(),
        "latency_per_image_ms": stats.median_ms / batch,
        "unstable": stats.unstable,
        "stages": stages,
    }


def batch_result(batch: int, names: Sequence[str], measurements: Sequence[Measurement]) -> dict[str, Any]:
    """One batch size's results for every target, with the comparison ratio when there are two."""
    targets = {name: summarize_target(batch, m) for name, m in zip(names, measurements, strict=True)}
    ratio = None
    if len(names) == 2:
        a, b = (targets[n]["latency_ms"]["median_ms"] for n in names)
        ratio = {"numerator": names[1], "denominator": names[0], "median_latency_ratio": b / a if a > 0 else None}
    return {"batch": batch, "targets": targets, "ratio": ratio}


def warnings_for(results: Sequence[dict[str, Any]]) -> list[str]:
    """Unstable-latency warnings (coefficient of variation above :data:`CV_WARNING`)."""
    out = []
    for res in results:
        for name, t in res["targets"].items():
            cv = t["latency_ms"]["cv"]
            if cv > CV_WARNING:
                out.append(
                    f"{name}, batch {res['batch']}: latency coefficient of variation {cv:.1%} > {CV_WARNING:.0%}; "
                    "the figures are unstable (a busy machine, throttling, or too few queries: raise --iterations)"
                )
    return out


# -- rendering -------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _header(report: dict[str, Any]) -> list[str]:
    b, inp, s = report["bundle"], report["input"], report["settings"]
    grid = b["grid"]
    lines = [
        f"tilead-bench  {b['path']}: {b['family']}, {grid['rows']}x{grid['cols']} locations of "
        f"{grid['tile_size'][0]}x{grid['tile_size'][1]} over {grid['image_size'][0]}x{grid['image_size'][1]}, "
        f"{b['size_mib']:.1f} MiB",
        f"input         {inp['description']}",
        f"queries       warm-up {s['warmup']} per batch size, then "
        + (f"{s['iterations']} per batch size" if s["iterations"] else f"{s['duration_s']:g} s per batch size")
        + (", routes alternating query by query" if len(report["targets"]) > 1 else ""),
    ]
    for t in report["targets"]:
        facts = ", ".join(
            f"{k} {'+'.join(v) if isinstance(v, list) else v}"
            for k, v in t["info"].items()
            if k != "run" and v not in (None, "")
        )
        lines.append(f"route         {t['name']}: {facts}; load {t['load_s']:.2f} s")
    return lines


def _latency_table(res: dict[str, Any]) -> list[str]:
    cols = ("queries", "busy s", "img/s", "ms/img", "min", "mean", "median", "p90", "p95", "p99", "max", "CV")
    width = max(24, *(len(n) + 2 for n in res["targets"]))
    lines = [f"{'latency, ms per query':<{width}}" + "".join(f"{c:>9}" for c in cols)]
    for name, t in res["targets"].items():
        lat = t["latency_ms"]
        cells = [str(t["queries"]), _fmt(t["busy_s"], 2), _fmt(t["images_per_s"], 2), _fmt(t["latency_per_image_ms"])]
        cells += [_fmt(lat[k]) for k in LATENCY_KEYS] + [f"{lat['cv']:.1%}"]
        lines.append(f"{name:<{width}}" + "".join(f"{c:>9}" for c in cells))
    ratio = res["ratio"]
    if ratio is not None and ratio["median_latency_ratio"] is not None:
        lines.append(
            f"ratio         {ratio['numerator']} / {ratio['denominator']}, median latency: "
            f"{ratio['median_latency_ratio']:.2f}x"
        )
    return lines


def _stage_table(res: dict[str, Any]) -> list[str]:
    names = list(res["targets"])
    order: list[str] = []
    for t in res["targets"].values():
        for row in t["stages"]:
            if row["stage"] not in order:
                order.append(row["stage"])
    pipeline = [s for s in PIPELINE_STAGES if s in order]
    locations = [s for s in order if s.startswith("location:")]
    rows: list[str] = []
    for s in pipeline:
        rows.append(s)
        if s == "inference":
            rows.extend(locations)
    rows.append("other")
    lines = [f"{'stage, mean ms per query (share)':<34}" + "".join(f"{n:>24}" for n in names)]
    for s in rows:
        label = f"  {s.split(':', 1)[1]}" if s.startswith("location:") else STAGE_LABELS.get(s, s)
        cells = []
        for n in names:
            found = next((r for r in res["targets"][n]["stages"] if r["stage"] == s), None)
            if found is None:
                cells.append("-")
            elif found["share"] is None:
                cells.append(f"{found['mean_ms']:.2f}        ")
            else:
                cells.append(f"{found['mean_ms']:.2f} ({found['share']:6.1%})")
        lines.append(f"{label:<34}" + "".join(f"{c:>24}" for c in cells))
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as a terminal table (every figure taken from ``report``)."""
    lines = _header(report)
    for res in report["results"]:
        lines += ["", f"== batch {res['batch']} " + "=" * 60]
        lines += _latency_table(res)
        lines.append("")
        lines += _stage_table(res)
    lines.append("")
    for note in report["notes"]:
        lines.append(f"note          {note}")
    mem = report["memory"]
    lines.append(
        f"memory        peak RSS {_fmt(mem['peak_rss_mib_tilead'], 0)} MiB with tilead's route alone"
        f"{' (torch not imported)' if not mem['torch_imported_for_tilead_route'] else ''}; "
        f"{_fmt(mem['peak_rss_mib_process'], 0)} MiB for the whole process; GPU "
        + (f"{mem['gpu_memory_used_mib']:.0f} MiB in use" if mem["gpu_memory_used_mib"] is not None else "not measured")
        + (f" ({mem['gpu_note']})" if mem.get("gpu_note") else "")
    )
    dev = mem.get("device")
    if dev is not None:
        used = dev["used_by_route_mib"]
        lines.append(
            f"device memory free {_fmt(dev['free_before_load_mib'], 0)} MiB before loading, "
            f"{_fmt(dev['free_after_warmup_mib'], 0)} after warm-up, {_fmt(dev['free_after_close_mib'], 0)} after "
            f"closing; route {_fmt(used, 0)} MiB (backend reports {_fmt(dev['backend_reports_mib'], 0)} MiB)"
        )
    for w in report["warnings"]:
        lines.append(f"WARNING       {w}")
    return "\n".join(line.rstrip() for line in lines)
