"""The audit summary report (faithlens/report.py, faithlens/stats.py) and its HTML page
(service/report_html.py): hand-made analyses with numbers worked out by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from faithlens.report import RowOutcome, SummaryReport, anchor_relative_positions, summarize
from faithlens.schema import Analysis
from faithlens.stats import bootstrap_mean_ci, bootstrap_mean_diff_ci
from service.report_html import render_report

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "clients" / "python" / "faithlens_client" / "static"
CHROMIUM = Path("/usr/bin/chromium")
N_PROMPT = 4


def make_analysis(
    n: int,
    anchors: list[int],
    preplan: int,
    coupled: int,
    mean_fai: float | None,
    mean_waad: float | None,
    saliency: dict | None = None,
    text: str = "x",
) -> Analysis:
    """A response of ``n`` tokens with anchors at the given response offsets."""
    tokens = [
        {
            "index": N_PROMPT + i,
            "id": 100 + i,
            "text": text if i == 0 else f" t{i}",
            "logprob": -1.0,
            "fai": 0.01 * i,
            "waad": 1.0,
            "preplan": i < preplan,
            "anchor": i in anchors,
            "dominated_anchor": False,
            "intro": False,
            "saliency": None if saliency is None else 0.1,
        }
        for i in range(n)
    ]
    summary: dict = {
        "num_prompt_tokens": N_PROMPT,
        "num_response_tokens": n,
        "num_anchors": len(anchors),
        "num_preplan": preplan,
        "num_dominated_anchors": coupled,
        "num_coupled_pairs": coupled,
        "coupled_pairs": [[N_PROMPT, N_PROMPT + 1]] * coupled,
        "mean_fai": mean_fai,
        "mean_waad": mean_waad,
        "tau_waad": 1.0,
        "tau_delta": 0.5,
    }
    if saliency is not None:
        summary |= {
            "saliency_method": "atman",
            "saliency_target": [N_PROMPT + n - 1],
            "target_logprob": -0.5,
            "reasoning_saliency_share": saliency["reasoning"],
            "prompt_saliency_share": saliency["prompt"],
            "spearman_fai_saliency": saliency["spearman"],
            "counterfactual": {
                "k": 2,
                "base_logprob": -0.5,
                "top_k_logprob": saliency["top"],
                "random_k_logprob": saliency["random"],
                "top_k_positions": [N_PROMPT, N_PROMPT + 1],
                "random_k_positions": [N_PROMPT + 2, N_PROMPT + 3],
            },
        }
    return Analysis.model_validate(
        {
            "model": "tiny",
            "prompt_token_ids": list(range(N_PROMPT)),
            "prompt_tokens": ["p"] * N_PROMPT,
            "prompt_fai": [0.1] * N_PROMPT,
            "prompt_saliency": None,
            "tokens": tokens,
            "layers": [1],
            "heads": {"local": [[1, 0]], "global": [[1, 1]]},
            "params": {},
            "answer_span": None,
            "summary": summary,
        }
    )


# A: 10 tokens, anchors at 0 and 5 (relative 0.0, 0.5), 3 preplan, 1 coupled pair, correct, with saliency
#    (gap = −2 − (−5) = 3).
# B: 20 tokens, anchors at 10 and 15 (0.5, 0.75), 4 preplan, 3 pairs, incorrect, saliency with an undefined
#    Spearman (gap = −2 − (−1) = −1).
# C: 5 tokens, one anchor at 4 (0.8), no preplan, no pairs, FAI undefined, no reference, no saliency.
A = make_analysis(
    10,
    [0, 5],
    3,
    1,
    0.1,
    2.0,
    {"reasoning": 0.8, "prompt": 0.2, "spearman": 0.5, "top": -5.0, "random": -2.0},
)
B = make_analysis(
    20,
    [10, 15],
    4,
    3,
    0.3,
    4.0,
    {"reasoning": 0.6, "prompt": 0.4, "spearman": None, "top": -1.0, "random": -2.0},
)
C = make_analysis(5, [4], 0, 0, None, 3.0)
ROWS = [RowOutcome(A, True), RowOutcome(B, False), RowOutcome(C)]


@pytest.fixture(scope="module")
def report() -> SummaryReport:
    return summarize(ROWS, seed=7, resamples=500)


def test_core_distributions_by_hand(report):
    assert report.n_rows == 3
    assert report.mean_fai.n == 2 and report.mean_fai.missing == 1
    assert report.mean_fai.mean == pytest.approx(0.2)
    assert report.mean_waad.mean == pytest.approx(3.0)
    assert report.anchor_rate.mean == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    assert report.preplan_rate.mean == pytest.approx((0.3 + 0.2 + 0.0) / 3)
    assert report.coupled_pairs.mean == pytest.approx(4 / 3)
    assert report.response_length.mean == pytest.approx(35 / 3)
    assert report.response_length.min == 5 and report.response_length.max == 20
    assert report.response_length.quantiles["p50"] == pytest.approx(10)
    # Integer-valued with a small range: one bin per integer, 0..3 for coupled pairs.
    hist = report.coupled_pairs.histogram
    assert hist.edges == [-0.5, 0.5, 1.5, 2.5, 3.5] and hist.counts == [1, 1, 0, 1]
    # Other figures: 20 equal bins from min to max; rates over [0, 1].
    assert report.mean_waad.histogram.edges == pytest.approx([2 + i / 10 for i in range(21)])
    assert report.mean_waad.histogram.counts[0] == 1 and report.mean_waad.histogram.counts[-1] == 1
    assert report.anchor_rate.histogram.edges[0] == 0 and report.anchor_rate.histogram.edges[-1] == 1
    assert sum(report.anchor_rate.histogram.counts) == 3
    for name in ("mean_fai", "mean_waad", "anchor_rate", "preplan_rate", "coupled_pairs", "response_length"):
        d = getattr(report, name)
        assert d.ci_low <= d.mean <= d.ci_high, name
        assert sum(d.histogram.counts) == d.n


def test_anchor_relative_positions(report):
    assert anchor_relative_positions(A) == [0.0, 0.5]
    assert anchor_relative_positions(B) == [0.5, 0.75]
    assert anchor_relative_positions(C) == [0.8]
    ap = report.anchor_positions
    assert ap.n_anchors == 5
    assert ap.histogram.edges == pytest.approx([i / 10 for i in range(11)])
    assert ap.histogram.counts == [1, 0, 0, 0, 0, 2, 0, 1, 1, 0]
    assert ap.mean.mean == pytest.approx((0.25 + 0.625 + 0.8) / 3)


def test_saliency_and_counterfactual_gap(report):
    s = report.saliency
    assert s is not None and s.n_rows == 2
    assert s.reasoning_saliency_share.mean == pytest.approx(0.7)
    assert s.prompt_saliency_share.mean == pytest.approx(0.3)
    assert s.spearman_fai_saliency.n == 1 and s.spearman_fai_saliency.missing == 1
    assert s.spearman_fai_saliency.mean == s.spearman_fai_saliency.ci_low == 0.5
    assert s.counterfactual_gap.mean == pytest.approx((3.0 + -1.0) / 2)
    assert s.counterfactual_top_k_worse.mean == pytest.approx(0.5)


def test_reference_split(report):
    r = report.references
    assert r is not None and r.n_rows == 2
    assert r.accuracy.mean == pytest.approx(0.5) and r.accuracy.n == 2
    assert r.correct.n_rows == 1 and r.incorrect.n_rows == 1
    assert r.correct.mean_fai.mean == pytest.approx(0.1) and r.incorrect.mean_fai.mean == pytest.approx(0.3)
    assert r.correct.anchor_rate.mean == pytest.approx(0.2) and r.incorrect.anchor_rate.mean == pytest.approx(
        0.1
    )
    assert r.correct.saliency.counterfactual_gap.mean == pytest.approx(3.0)
    assert r.incorrect.saliency.counterfactual_gap.mean == pytest.approx(-1.0)
    assert r.incorrect.saliency.spearman_fai_saliency.mean is None  # the one incorrect row has none
    assert r.correct.anchor_positions.histogram.counts == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert r.difference["mean_fai"].mean == pytest.approx(-0.2)
    assert r.difference["counterfactual_gap"].mean == pytest.approx(4.0)
    assert r.difference["spearman_fai_saliency"].mean is None
    # Groups share the whole audit's bin edges, so their histograms line up.
    assert r.correct.response_length.histogram.edges == report.response_length.histogram.edges


def test_report_is_json_and_deterministic(report):
    dumped = report.model_dump()
    text = json.dumps(dumped, allow_nan=False)  # no NaN anywhere
    assert json.dumps(summarize(ROWS, seed=7, resamples=500).model_dump(), allow_nan=False) == text
    assert SummaryReport.model_validate(json.loads(text)) == report


def test_empty_and_missing_groups():
    empty = summarize([])
    assert empty.n_rows == 0 and empty.references is None and empty.saliency is None
    assert empty.mean_fai.n == 0 and empty.mean_fai.mean is None and empty.mean_fai.ci_low is None
    assert empty.anchor_positions.n_anchors == 0 and empty.anchor_positions.mean.mean is None
    json.dumps(empty.model_dump(), allow_nan=False)
    # Every row correct: the incorrect group is empty, its numbers None; no saliency anywhere.
    rep = summarize([RowOutcome(C, True), RowOutcome(C.model_copy(), True)])
    assert rep.references.accuracy.mean == 1.0
    assert rep.references.incorrect.n_rows == 0 and rep.references.incorrect.mean_waad.mean is None
    assert rep.references.difference["mean_waad"].mean is None
    assert rep.mean_fai.n == 0 and rep.mean_fai.missing == 2 and rep.mean_fai.histogram is None
    assert rep.mean_waad.mean == rep.mean_waad.ci_low == rep.mean_waad.ci_high == 3.0
    json.dumps(rep.model_dump(), allow_nan=False)
    # A row given as a plain dict (a result line's annotations) is validated.
    assert RowOutcome(A.to_json_dict()).analysis == A


def test_bootstrap_mean_ci():
    values = [0.3, 1.2, None, 2.5, 0.1, 4.0, 1.1, float("nan"), 0.7]
    mean, low, high = bootstrap_mean_ci(values, seed=3, resamples=2000)
    assert mean == pytest.approx(sum([0.3, 1.2, 2.5, 0.1, 4.0, 1.1, 0.7]) / 7)
    assert low < mean < high
    assert bootstrap_mean_ci(values, seed=3, resamples=2000) == (mean, low, high)
    assert bootstrap_mean_ci(values, seed=4, resamples=2000) != (mean, low, high)
    assert bootstrap_mean_ci([], seed=0) == (None, None, None)
    assert bootstrap_mean_ci([None, None]) == (None, None, None)
    assert bootstrap_mean_ci([2.0]) == (2.0, 2.0, 2.0)
    assert bootstrap_mean_ci([0.1] * 5) == (0.1, 0.1, 0.1)
    # Two values 0 and 1: resampled means are 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
    _, low, high = bootstrap_mean_ci([0.0, 1.0], seed=0, resamples=4000)
    assert (low, high) == (0.0, 1.0)
    # A wider confidence gives a wider interval; many values give a narrow one around the mean.
    _, l90, h90 = bootstrap_mean_ci(values, seed=3, resamples=2000, confidence=0.9)
    _, l95, h95 = bootstrap_mean_ci(values, seed=3, resamples=2000)
    assert l95 <= l90 and h90 <= h95
    many = [i % 10 for i in range(10_000)]
    m, lo, hi = bootstrap_mean_ci(many, seed=1, resamples=200)
    assert m == 4.5 and 4.4 < lo < 4.5 < hi < 4.6
    with pytest.raises(ValueError):
        bootstrap_mean_ci(values, resamples=0)


def test_bootstrap_mean_diff_ci():
    d, lo, hi = bootstrap_mean_diff_ci([1.0, 2.0, 3.0], [0.0, 1.0, None], seed=2, resamples=1000)
    assert d == pytest.approx(2.0 - 0.5) and lo < d < hi
    assert bootstrap_mean_diff_ci([1.0, 2.0, 3.0], [0.0, 1.0], seed=2, resamples=1000) == (d, lo, hi)
    assert bootstrap_mean_diff_ci([1.0], [None]) == (None, None, None)
    assert bootstrap_mean_diff_ci([1.0, 1.0], [0.25]) == (0.75, 0.75, 0.75)


# ---- HTML ----------------------------------------------------------------------------------------------------

EVIL = '<script>alert("row")</script> & </title><img src=x onerror=alert(1)>'


def result_lines() -> list[dict]:
    evil_a = make_analysis(10, [0, 5], 3, 1, 0.1, 2.0, text="</script><script>alert(2)</script>")
    return [
        {"id": "q-1", "index": 0, "text": EVIL, "annotations": evil_a.to_json_dict(), "correct": True, "error": None},
        {"id": "q-2", "index": 1, "text": "plain", "annotations": B.to_json_dict(), "correct": False, "error": None},
        {"id": "q-3", "index": 2, "text": "failed <b>", "annotations": None, "correct": None,
         "error": {"code": "analysis_failed", "message": "<oops>"}},
    ]  # fmt: skip


def test_html_plots_escaping_and_offline(report):
    lines = result_lines()
    page = render_report("aud-<1>", report, lines, ui_dir=UI_DIR)
    # One <svg> per plot: 6 distributions, anchors (+ split), per split metric an interval plot and a
    # histogram pair (10 metrics), 4 saliency histograms.
    assert page.count("<svg") == 6 + 2 + 2 * 10 + 4
    for label in (
        "Histogram of Mean FAI",
        "Histogram of relative position i / n",
        "Histogram of Counterfactual gap",
    ):
        assert f'aria-label="{label}' in page
    assert "Means with 95% intervals: Mean WAAD" in page
    # Escaping: no raw row text, the only script elements are the report's three.
    assert "<script>alert" not in page and "<img" not in page and "<oops>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;row&quot;)&lt;/script&gt;" in page
    assert page.lower().count("</script") == 3
    assert "aud-&lt;1&gt;" in page
    # No network: nothing refers to http(s), not even the SVG namespace inside the embedded audit.js.
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    # The embedded annotations parse back to the rows' own (the failed row has none).
    m = re.search(r'<script type="application/json" id="fl-annotations">(.*?)</script>', page, re.S)
    embedded = json.loads(m.group(1))
    assert embedded == {"0": lines[0]["annotations"], "1": lines[1]["annotations"]}
    assets = json.loads(re.search(r'id="fl-assets">(.*?)</script>', page, re.S).group(1))
    assert assets["js"] == (UI_DIR / "audit.js").read_text(encoding="utf-8")
    assert page.count('class="fl-open"') == 2
    # The headline table has every metric and the accuracy.
    for label in ("Mean FAI", "Anchor rate", "Reasoning saliency share", "Accuracy"):
        assert f"<th>{label}</th>" in page


def test_html_without_saliency_or_references_and_empty():
    rep = summarize([RowOutcome(C)])
    page = render_report("a1", rep, [{"id": None, "index": 0, "text": "t", "annotations": C.to_json_dict()}])
    assert page.count("<svg") == 6 + 1
    assert 'id="saliency"' not in page and 'id="correct-vs-incorrect"' not in page
    empty = render_report("a2", summarize([]), [])
    assert "<svg" in empty and "no values" in empty
    nan_row = C.to_json_dict()
    nan_row["summary"]["mean_waad"] = math.nan
    page = render_report("a3", rep, [{"id": 1, "index": 0, "text": "t", "annotations": nan_row}])
    assert "NaN" not in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_html_in_browser_offline(report, tmp_path):
    """The page in headless Chromium with no network: no console errors, the plots draw, and a row's
    "open audit" link opens its audit view in a new tab."""
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(render_report("aud-1", report, result_lines(), ui_dir=UI_DIR), encoding="utf-8")
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        context = browser.new_context(offline=True)
        context.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        context.on("weberror", lambda err: problems.append(str(err.error)))
        context.on("page", lambda p: p.on("dialog", lambda d: problems.append(f"dialog: {d.message}")))
        page = context.new_page()
        page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
        page.goto(path.as_uri())
        assert page.locator("svg.fl-plot").count() == 32
        assert page.locator("svg.fl-plot rect.fl-bar").count() > 20
        box = page.locator("svg.fl-plot").first.bounding_box()
        assert box["width"] > 100 and box["height"] > 100
        with context.expect_page() as popup_info:
            page.locator("a.fl-open").nth(1).click()
        popup = popup_info.value
        popup.wait_for_selector(".fl-heatmap .fl-token")
        assert popup.locator(".fl-heatmap .fl-token").count() == 20
        assert "row 1" in popup.title()
        with context.expect_page() as popup_info:
            page.locator("a.fl-open").first.click()
        evil = popup_info.value
        evil.wait_for_selector(".fl-heatmap .fl-token")
        assert evil.locator(".fl-heatmap .fl-token").first.inner_text().startswith("</script>")
        browser.close()
    assert not problems, problems
