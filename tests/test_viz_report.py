"""The evaluation report page (#19 item 4): curves, histogram, confusion, per-type table, gallery; self-contained."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from tilead.viz.report import (
    ReportData,
    curves_from_counts,
    gallery_picks,
    image_curves,
    pixel_histograms,
    render,
    trapezoid,
    write_report,
)


def _data(n_good: int = 4, n_bad: int = 4, size: int = 24, *, draw: bool = True, pixels: bool = True) -> ReportData:
    rng = np.random.default_rng(7)
    n = n_good + n_bad
    labels = np.array([False] * n_good + [True] * n_bad)
    types = ["good"] * n_good + ["scratch", "spot"] * (n_bad // 2) + ["scratch"] * (n_bad % 2)
    scores = np.where(labels, 2.0, 1.0) + rng.normal(0, 0.6, n)
    truth = [np.zeros((size, size), bool) for _ in range(n)]
    maps = []
    for i in range(n):
        m = rng.random((size, size)).astype(np.float32)
        if labels[i]:
            truth[i][4:10, 4:12] = True
            m[truth[i]] += 0.8
        maps.append(m)
    picture = np.zeros((16, 32, 3), np.uint8)
    picture[:, :16] = (200, 30, 30)
    return ReportData(
        title="unit <report>",
        summary={"run": "/tmp/run", "config": "x & y"},
        metrics={"image_auroc": 0.9, "pixel_auroc": 0.8},
        names=[f"{t}/{i:03d}.png" for i, t in enumerate(types)],
        defect_types=types,
        labels=labels,
        scores=scores,
        image_threshold=1.5,
        predicted=scores > 1.5,
        pixel_scores=maps if pixels else None,
        pixel_truth=truth if pixels else None,
        pixel_predicted=[m > 1.0 for m in maps] if pixels else None,
        pixel_threshold=1.0 if pixels else None,
        draw=(lambda i: picture) if draw else None,
        gallery=2,
        notes=["a note"],
    )


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", page)


def test_page_is_self_contained_with_every_section() -> None:
    page = render(_data())
    for heading in ("Metrics", "Curves", "Score histogram", "Confusion at the deployed thresholds",
                    "Per defect type", "Worst false alarms", "Worst misses"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in page
    images = _imgs(page)
    assert len(images) == 2 + 1 + 2 + 2  # ROC, PR, histogram, 2 false alarms, 2 misses
    assert all(re.search(r'src="data:image/(svg\+xml|png);base64,', tag) for tag in images)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)  # nothing loaded from elsewhere
    assert "<script" not in page
    assert "unit &lt;report&gt;" in page  # text is escaped
    assert "x &amp; y" in page
    assert "<h3>pixels</h3>" in page
    assert page.count("<tr><td class='l'>") == 3  # good, scratch, spot


def test_good_only_page_is_a_false_alarm_view() -> None:
    d = _data(n_good=5, n_bad=0)
    page = render(d)
    assert "Only good images" in page
    assert "No defective image in this data set: no miss to show." in page
    assert len(_imgs(page)) == 1 + 2  # the histogram and 2 false alarms; no curves
    assert "<th class='l'>defective</th>" not in page.split("<h3>images</h3>")[1].split("</table>")[0]


def test_gallery_picks_the_worst_first() -> None:
    d = _data(n_good=4, n_bad=4)
    false_alarms, misses = gallery_picks(d)
    good = [i for i in range(8) if not d.labels[i]]
    bad = [i for i in range(8) if d.labels[i]]
    # Wrong decisions first (highest good score / lowest defective score), then the closest calls.
    expect_fa = sorted(good, key=lambda i: (not d.predicted[i], -d.scores[i]))[:2]
    expect_miss = sorted(bad, key=lambda i: (bool(d.predicted[i]), d.scores[i]))[:2]
    assert [i for i, _ in false_alarms] == expect_fa
    assert [i for i, _ in misses] == expect_miss
    for i, why in false_alarms:
        assert why == ("false alarm" if d.predicted[i] else "closest to a false alarm (judged OK)")


def test_write_report_is_atomic_and_names_the_file(tmp_path: Path) -> None:
    path = write_report(tmp_path / "sub" / "r.html", _data(draw=False, pixels=False))
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": np.zeros(3, bool)}, "labels has 3 entries"),
        ({"pixel_truth": [np.zeros((2, 2), bool)]}, "pixel_truth has 1 maps"),
        ({"gallery": -1}, "gallery"),
    ],
)
def test_inconsistent_data_is_refused(change: dict[str, object], message: str) -> None:
    d = _data()
    fields = {k: getattr(d, k) for k in d.__dataclass_fields__}
    with pytest.raises(ValueError, match=message):
        ReportData(**{**fields, **change})


@settings(max_examples=80, deadline=None)
@given(
    scores=st.lists(st.integers(0, 12), min_size=2, max_size=40),
    labels=st.lists(st.booleans(), min_size=2, max_size=40),
)
def test_image_curves_match_scikit_learn(scores: list[int], labels: list[bool]) -> None:
    n = min(len(scores), len(labels))
    s, y = np.array(scores[:n], float), np.array(labels[:n])
    if y.all() or not y.any():
        with pytest.raises(ValueError, match="at least one positive and one negative"):
            image_curves(s, y)
        return
    c = image_curves(s, y)
    assert trapezoid(c.fpr, c.tpr) == pytest.approx(roc_auc_score(y, s))
    # Average precision (step interpolation) from the same points.
    ap = float(np.sum(np.diff(c.recall) * c.precision[1:]))
    assert ap == pytest.approx(average_precision_score(y, s))
    assert (c.fpr[0], c.tpr[0], c.fpr[-1], c.tpr[-1]) == (0, 0, 1, 1)
    assert c.precision[-1] == pytest.approx(y.mean())


def test_pixel_histogram_curves_agree_with_exact_auroc() -> None:
    rng = np.random.default_rng(3)
    truth = [rng.random((30, 40)) < 0.1 for _ in range(3)]
    maps = [rng.random((30, 40)) + t * 0.7 for t in truth]
    maps[0][0, 0] = np.nan  # left out
    edges, pos, neg = pixel_histograms(maps, truth, bins=4096)
    assert edges.size == 4097
    assert pos.sum() + neg.sum() == 3 * 30 * 40 - 1
    assert pos.sum() == sum(int(t.sum()) for t in truth) - int(truth[0][0, 0])
    c = curves_from_counts(pos, neg)
    flat = np.concatenate([m.ravel() for m in maps])
    ok = np.isfinite(flat)
    exact = roc_auc_score(np.concatenate([t.ravel() for t in truth])[ok], flat[ok])
    assert trapezoid(c.fpr, c.tpr) == pytest.approx(exact, abs=2e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_histograms([np.zeros((2, 2))], [np.zeros((2, 3), bool)])
    with pytest.raises(ValueError, match="no finite pixel score"):
        pixel_histograms([np.full((2, 2), np.nan)], [np.zeros((2, 2), bool)])


@pytest.mark.integration
@pytest.mark.parametrize(("n_bad", "images"), [(4, 7), (0, 3)], ids=["defects", "good-only"])
def test_page_renders_its_images_in_chromium(tmp_path: Path, n_bad: int, images: int) -> None:
    from browser import render_images

    page = write_report(tmp_path / "report.html", _data(n_bad=n_bad))
    seen = render_images(page)
    assert seen["count"] == len(_imgs(page.read_text(encoding="utf-8"))) == images
    assert seen["broken"] == []
    assert all(w > 0 and h > 0 for w, h in seen["sizes"])


@pytest.mark.integration
def test_the_browser_probe_sees_a_broken_image(tmp_path: Path) -> None:
    from browser import render_images

    page = render(_data(draw=False, pixels=False)).replace(
        "</body>", '<img src="data:image/png;base64,AAAA" alt="not a picture"></body>'
    )
    (tmp_path / "broken.html").write_text(page, encoding="utf-8")
    seen = render_images(tmp_path / "broken.html")
    assert seen["broken"] == ["not a picture"]
    assert seen["count"] == 4  # ROC, PR, histogram and the broken one


@pytest.mark.integration
def test_eval_report_of_a_trained_run_renders_in_chromium(tiny_trained: tuple[Path, Path], tmp_path: Path) -> None:
    from browser import render_images
    from click.testing import CliRunner

    from tilead.cli.main import main as tilead_main

    run, bundle = tiny_trained
    out = tmp_path / "ev"
    args = ["eval", str(run), "-o", str(out), "--bundle", str(bundle), "--no-progress", "--report"]
    res = CliRunner().invoke(tilead_main, args)
    assert res.exit_code == 0, res.output
    page = out / "report.html"
    assert f"report:     {page}" in res.output
    text = page.read_text(encoding="utf-8")
    assert "<h3>pixels</h3>" in text
    assert "Worst misses" in text
    for defect in ("scratch", "spot"):  # the synthetic data's defect types, one row each
        assert f"<td class='l'>{defect}</td>" in text
    seen = render_images(page)
    assert seen["broken"] == []
    assert seen["count"] == len(_imgs(text)) >= 4  # ROC, PR, histogram and at least one overlay
    # --report PATH: the page goes there.
    custom = tmp_path / "pages" / "bottle.html"
    res = CliRunner().invoke(tilead_main, ["eval", str(run), "-o", str(out), "--bundle", str(bundle),
                                           "--no-progress", f"--report={custom}"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert custom.is_file()
