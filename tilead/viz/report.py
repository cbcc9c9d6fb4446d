"""The evaluation report: one self-contained HTML page (``tilead eval --report``).

Everything is inside the page: plots are SVG (matplotlib) and overlays PNG, both
embedded as base64 ``data:`` URIs; no script, stylesheet, font or image is loaded
from elsewhere, so the file can be mailed or archived alone.

Sections: summary and metrics; ROC and precision-recall curves (image level and,
with ground-truth masks, pixel level); score histograms of good and defective
images with the deployed threshold; confusion matrices at the deployed thresholds;
a per-defect-type table; a gallery of the worst false alarms and misses.

A data set of good images only gets the false-alarm view: the histogram of good
scores, the good row of the confusion matrix, and the highest-scoring good images.

Pixel-level curves are computed from histograms of the pixel scores
(:data:`PIXEL_BINS` bins between the smallest and the largest score), so they
stay cheap for millions of pixels; the exact pixel AUROC is the one in
``metrics.json`` (shown in the metrics table).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tilead.atomic import atomic_write_text

PIXEL_BINS = 4096
"""Histogram bins of the pixel-level curves."""
GALLERY_WIDTH = 1000
"""Largest width (pixels) of a gallery overlay in the page (the overlay files keep full resolution)."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ReportData:
    """What the report shows: per-image results at the deployed thresholds.

    Attributes:
        title: Page title.
        summary: Key/value pairs shown first (run, config, inference, grid, ...).
        metrics: Named metric values (``metrics.json``'s ``metrics``).
        names: ``(n,)`` image names (e.g. ``defect_type/file.png``).
        defect_types: ``(n,)`` ``"good"`` or the defect type of each image.
        labels: bool ``(n,)``, True = defective.
        scores: float ``(n,)`` image scores compared with ``image_threshold``.
        image_threshold: The deployed image threshold (an image is NG iff its score exceeds it).
        predicted: bool ``(n,)`` the deployed NG decisions.
        pixel_scores: ``n`` float ``(H_i, W_i)`` maps compared with ``pixel_threshold``, or None.
        pixel_truth: ``n`` bool ``(H_i, W_i)`` ground-truth masks, or None.
        pixel_predicted: ``n`` bool ``(H_i, W_i)`` deployed masks, or None.
        pixel_threshold: The deployed pixel threshold, or None.
        draw: Overlay of image ``i``: uint8 ``(H, W, 3)`` RGB (None: a gallery without pictures).
        gallery: Images per gallery section.
        notes: Paragraphs shown under the summary.
    """

    title: str
    summary: Mapping[str, Any]
    metrics: Mapping[str, float]
    names: Sequence[str]
    defect_types: Sequence[str]
    labels: npt.NDArray[np.bool_]
    scores: npt.NDArray[np.floating[Any]]
    image_threshold: float
    predicted: npt.NDArray[np.bool_]
    pixel_scores: Sequence[np.ndarray] | None = None
    pixel_truth: Sequence[np.ndarray] | None = None
    pixel_predicted: Sequence[np.ndarray] | None = None
    pixel_threshold: float | None = None
    draw: Callable[[int], np.ndarray] | None = None
    gallery: int = 4
    notes: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n = len(self.names)
        for name in ("defect_types", "labels", "scores", "predicted"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"report: {name} has {len(getattr(self, name))} entries, names has {n}")
        for name in ("pixel_scores", "pixel_truth", "pixel_predicted"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"report: {name} has {len(value)} maps, expected one per image ({n})")
        if self.gallery < 0:
            raise ValueError(f"report gallery: expected >= 0 images per section, got {self.gallery}")


# -- curves -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curves:
    """ROC and precision-recall points for thresholds from high to low (float64 arrays)."""

    fpr: FloatArray
    tpr: FloatArray
    precision: FloatArray
    recall: FloatArray


def curves_from_counts(positives: npt.ArrayLike, negatives: npt.ArrayLike) -> Curves:
    """ROC / PR points from positive and negative counts per score bin (bins in ascending score order).

    Thresholds step down from above the highest bin: after step ``k`` every bin
    from the top down to bin ``-k`` counts as positive. The first point is
    ``(fpr, tpr) = (0, 0)`` with precision 1.

    Raises:
        ValueError: If the counts differ in length or either class is empty.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"curves: expected two 1-D count arrays of one length, got {pos.shape} and {neg.shape}")
    if pos.sum() <= 0 or neg.sum() <= 0:
        raise ValueError("curves: need at least one positive and one negative sample")
    tp = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0.0], np.cumsum(neg[::-1])])
    keep = np.concatenate([[True], (pos[::-1] + neg[::-1]) > 0])  # empty bins add no point
    tp, fp = tp[keep], fp[keep]
    tpr, fpr = tp / tp[-1], fp / fp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    return Curves(fpr, tpr, precision, tpr)


def image_curves(scores: npt.ArrayLike, labels: npt.ArrayLike) -> Curves:
    """Exact ROC / PR points of image scores (one threshold per distinct score)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y.astype(np.float64), minlength=values.size)
    neg = np.bincount(inverse, weights=(~y).astype(np.float64), minlength=values.size)
    return curves_from_counts(pos, neg)


def pixel_histograms(
    maps: Sequence[np.ndarray], truth: Sequence[np.ndarray], bins: int = PIXEL_BINS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Histograms of defective and good pixels' scores over common bins.

    Returns:
        ``(edges, positives, negatives)``: float64 ``(bins + 1,)`` edges and ``(bins,)`` counts.
        Non-finite scores are left out.
    """
    lo, hi = np.inf, -np.inf
    for m in maps:
        finite = np.asarray(m)[np.isfinite(m)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not np.isfinite(lo):
        raise ValueError("pixel histograms: no finite pixel score")
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    pos = np.zeros(bins)
    neg = np.zeros(bins)
    for m, t in zip(maps, truth, strict=True):
        m = np.asarray(m, dtype=np.float64)
        t = np.asarray(t, dtype=bool)
        if m.shape != t.shape:
            raise ValueError(f"pixel histograms: map {m.shape} and mask {t.shape} differ in shape")
        ok = np.isfinite(m)
        pos += np.histogram(m[t & ok], bins=edges)[0]
        neg += np.histogram(m[~t & ok], bins=edges)[0]
    return edges, pos, neg


def trapezoid(x: FloatArray, y: FloatArray) -> float:
    """Area under ``y(x)`` by the trapezoid rule."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


# -- plots ------------------------------------------------------------------------------------------


def _svg_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise ImportError(
            "tilead eval --report needs matplotlib: pip install 'tilead[train]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # text as paths: no font needed where the page is opened
    return plt


def _curve_plot(curves: Mapping[str, Curves], kind: str, operating: Mapping[str, tuple[float, float]]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    for name, c in curves.items():
        if kind == "roc":
            ax.plot(c.fpr, c.tpr, label=f"{name} (area {trapezoid(c.fpr, c.tpr):.3f})")
        else:
            ax.plot(c.recall, c.precision, label=f"{name} (area {trapezoid(c.recall, c.precision):.3f})")
    for name, (x, y) in operating.items():
        ax.plot([x], [y], "o", color="black", markersize=5)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _svg_uri(fig)


def _histogram_plot(data: ReportData) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    scores = np.asarray(data.scores, dtype=np.float64)
    finite = np.isfinite(scores)
    values = np.concatenate([scores[finite], [data.image_threshold]])
    edges = np.linspace(values.min(), values.max(), 41) if values.max() > values.min() else 10
    labels = np.asarray(data.labels, dtype=bool)
    for mask, name, colour in ((~labels, "good", "tab:green"), (labels, "defective", "tab:red")):
        if (mask & finite).any():
            ax.hist(scores[mask & finite], bins=edges, alpha=0.55, color=colour, label=f"{name} ({mask.sum()})")
    ax.axvline(data.image_threshold, color="black", linestyle="--", label=f"threshold {data.image_threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title="Image scores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)


# -- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1480px;
color:#222;padding:0 16px}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.plots img{margin:4px 12px 4px 0;vertical-align:top}
.bad{background:#fde2e2}.good{background:#e3f5e3}figure{margin:12px 0 24px}figure img{max-width:100%}
figcaption{color:#555;font-size:.9em}.note{color:#555}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _png_uri(rgb: np.ndarray, max_width: int = GALLERY_WIDTH) -> str:
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if picture.width > max_width:
        size = (max_width, round(picture.height * max_width / picture.width))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rate(k: float, n: float) -> str:
    return f"{k / n:.1%}" if n else "n/a"


def _confusion(title: str, actual: npt.NDArray[np.bool_] | None, counts: tuple[float, float, float, float]) -> str:
    """2x2 table; ``counts`` = (good OK, good NG, defective OK, defective NG)."""
    g_ok, g_ng, d_ok, d_ng = counts
    rows = [
        f'<tr><th class="l">good</th><td class="good">{g_ok:,.0f}</td><td class="bad">{g_ng:,.0f}</td>'
        f"<td>{_rate(g_ng, g_ok + g_ng)}</td></tr>"
    ]
    if actual is None or d_ok + d_ng > 0:
        rows.append(
            f'<tr><th class="l">defective</th><td class="bad">{d_ok:,.0f}</td><td class="good">{d_ng:,.0f}</td>'
            f"<td>{_rate(d_ok, d_ok + d_ng)}</td></tr>"
        )
    return (
        f"<h3>{_e(title)}</h3><table><tr><th class='l'>actual \\ predicted</th><th>OK</th><th>NG</th>"
        f"<th>error rate</th></tr>{''.join(rows)}</table>"
    )


def _per_type(data: ReportData) -> str:
    types = sorted(set(data.defect_types), key=lambda t: (t != "good", t))
    has_pixels = data.pixel_truth is not None and data.pixel_predicted is not None
    head = (
        "<tr><th class='l'>type</th><th>images</th><th>predicted NG</th><th>rate</th>"
        "<th>median score</th><th>min score</th><th>max score</th>"
        + ("<th>defect pixels found</th><th>false-alarm pixels</th>" if has_pixels else "")
        + "</tr>"
    )
    rows = []
    scores = np.asarray(data.scores, dtype=np.float64)
    for t in types:
        idx = [i for i, d in enumerate(data.defect_types) if d == t]
        ng = int(np.asarray(data.predicted)[idx].sum())
        s = scores[idx]
        good = not any(data.labels[i] for i in idx)
        rate = f"{_rate(ng, len(idx))} {'false alarms' if good else 'detected'}"
        cells = [f"<td class='l'>{_e(t)}</td>", f"<td>{len(idx)}</td>", f"<td>{ng}</td>", f"<td>{rate}</td>"]
        cells += [f"<td>{np.nanmedian(s):.4g}</td>", f"<td>{np.nanmin(s):.4g}</td>", f"<td>{np.nanmax(s):.4g}</td>"]
        if has_pixels:
            assert data.pixel_truth is not None
            assert data.pixel_predicted is not None
            hit = sum(int((data.pixel_truth[i] & data.pixel_predicted[i]).sum()) for i in idx)
            true = sum(int(np.asarray(data.pixel_truth[i]).sum()) for i in idx)
            false = sum(int((~data.pixel_truth[i] & data.pixel_predicted[i]).sum()) for i in idx)
            total = sum(int(np.asarray(data.pixel_truth[i]).size) for i in idx)
            cells += [f"<td>{_rate(hit, true)}</td>", f"<td>{_rate(false, total)}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def gallery_picks(data: ReportData) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The worst false alarms and misses, each ``(index, why)``.

    False alarms: good images judged NG, highest score first; when fewer than
    ``gallery``, the highest-scoring good images judged OK follow ("closest to a
    false alarm"). Misses: defective images judged OK, lowest score first, then
    the lowest-scoring detected ones ("closest to a miss").
    """
    scores = np.nan_to_num(np.asarray(data.scores, dtype=np.float64), nan=np.inf)
    labels = np.asarray(data.labels, dtype=bool)
    predicted = np.asarray(data.predicted, dtype=bool)
    k = data.gallery

    def pick(
        candidates: np.ndarray, descending: bool, wrong: np.ndarray, why: tuple[str, str]
    ) -> list[tuple[int, str]]:
        sign = -1.0 if descending else 1.0
        order = sorted(np.flatnonzero(candidates), key=lambda i: (not wrong[i], sign * scores[i]))
        return [(int(i), why[0] if wrong[i] else why[1]) for i in order[:k]]

    false_alarms = pick(~labels, True, predicted, ("false alarm", "closest to a false alarm (judged OK)"))
    misses = pick(labels, False, ~predicted, ("miss", "closest to a miss (detected)"))
    return false_alarms, misses


def _gallery(data: ReportData, picks: list[tuple[int, str]]) -> str:
    parts = []
    for i, why in picks:
        caption = (
            f"{_e(data.names[i])} ({_e(data.defect_types[i])}): {_e(why)}, score {float(data.scores[i]):.4g} "
            f"(threshold {data.image_threshold:.4g})"
        )
        picture = _img(_png_uri(data.draw(i)), f"overlay of {data.names[i]}") if data.draw is not None else ""
        parts.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return "".join(parts)


def render(data: ReportData) -> str:
    """The report page as one HTML string (no external resource)."""
    labels = np.asarray(data.labels, dtype=bool)
    predicted = np.asarray(data.predicted, dtype=bool)
    good_only = not labels.any()
    out = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(data.title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{_e(data.title)}</h1>",
    ]
    out.append("<table>" + "".join(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>"
                                   for k, v in data.summary.items()) + "</table>")  # fmt: skip
    out += [f"<p class='note'>{_e(n)}</p>" for n in data.notes]
    if data.metrics:
        out.append("<h2>Metrics</h2><table>")
        out += [f"<tr><th class='l'>{_e(k)}</th><td>{float(v):.4f}</td></tr>" for k, v in data.metrics.items()]
        out.append("</table>")
    out.append("<h2>Curves</h2>")
    if good_only:
        out.append(
            "<p class='note'>Only good images: ROC and precision-recall curves need defective images. "
            "This page shows the false alarms.</p>"
        )
    else:
        scores = np.nan_to_num(np.asarray(data.scores, dtype=np.float64), nan=np.inf)
        curves = {"image": image_curves(scores, labels)}
        ops = {"image threshold": (_rate_f(predicted & ~labels, ~labels), _rate_f(predicted & labels, labels))}
        if data.pixel_scores is not None and data.pixel_truth is not None and data.pixel_threshold is not None:
            _, pos, neg = pixel_histograms(data.pixel_scores, data.pixel_truth)
            if pos.sum() > 0 and neg.sum() > 0:
                curves["pixel"] = curves_from_counts(pos, neg)
            if data.pixel_predicted is not None and pos.sum() > 0:
                tp, fp, p, n = _pixel_counts(data)
                ops["pixel threshold"] = (fp / n if n else 0.0, tp / p if p else 0.0)
        roc = _curve_plot(curves, "roc", ops)
        pr_ops = {k: (y, _precision_at(data, k)) for k, (_, y) in ops.items()}
        pr = _curve_plot(curves, "pr", {k: v for k, v in pr_ops.items() if np.isfinite(v[1])})
        out.append(f"<div class='plots'>{_img(roc, 'ROC curves')}{_img(pr, 'precision-recall curves')}</div>")
        if "pixel" in curves:
            out.append(
                f"<p class='note'>Pixel curves from a {PIXEL_BINS}-bin histogram of the pixel scores; "
                "the metrics table has the exact values.</p>"
            )
    out.append(f"<h2>Score histogram</h2><div class='plots'>{_img(_histogram_plot(data), 'score histogram')}</div>")
    out.append("<h2>Confusion at the deployed thresholds</h2>")
    out.append(
        _confusion(
            "images",
            labels,
            (
                float((~labels & ~predicted).sum()),
                float((~labels & predicted).sum()),
                float((labels & ~predicted).sum()),
                float((labels & predicted).sum()),
            ),
        )
    )
    if data.pixel_truth is not None and data.pixel_predicted is not None:
        tp, fp, p, n = _pixel_counts(data)
        out.append(_confusion("pixels", None if good_only else labels, (n - fp, fp, p - tp, tp)))
    out.append("<h2>Per defect type</h2>" + _per_type(data))
    false_alarms, misses = gallery_picks(data)
    out.append("<h2>Worst false alarms</h2>")
    out.append(_gallery(data, false_alarms) or "<p class='note'>No good image in this data set.</p>")
    out.append("<h2>Worst misses</h2>")
    out.append(_gallery(data, misses) or "<p class='note'>No defective image in this data set: no miss to show.</p>")
    out.append("</body></html>\n")
    return "".join(out)


def _rate_f(hits: np.ndarray, group: np.ndarray) -> float:
    n = int(group.sum())
    return float(hits.sum()) / n if n else 0.0


def _pixel_counts(data: ReportData) -> tuple[float, float, float, float]:
    """``(true positives, false positives, positives, negatives)`` of the deployed masks."""
    assert data.pixel_truth is not None
    assert data.pixel_predicted is not None
    tp = fp = p = total = 0
    for t, m in zip(data.pixel_truth, data.pixel_predicted, strict=True):
        t, m = np.asarray(t, dtype=bool), np.asarray(m, dtype=bool)
        if t.shape != m.shape:
            raise ValueError(f"report: ground truth {t.shape} and predicted mask {m.shape} differ in shape")
        tp += int((t & m).sum())
        fp += int((~t & m).sum())
        p += int(t.sum())
        total += t.size
    return float(tp), float(fp), float(p), float(total - p)


def _precision_at(data: ReportData, which: str) -> float:
    if which == "image threshold":
        labels, predicted = np.asarray(data.labels, dtype=bool), np.asarray(data.predicted, dtype=bool)
        flagged = int(predicted.sum())
        return float((labels & predicted).sum()) / flagged if flagged else float("nan")
    tp, fp, _, _ = _pixel_counts(data)
    return tp / (tp + fp) if tp + fp else float("nan")


def write_report(path: Path, data: ReportData) -> Path:
    """Render the page and write it atomically to ``path``; returns ``path``."""
    atomic_write_text(Path(path), render(data))
    return Path(path)
