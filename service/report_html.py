"""The audit's reports (the summary, the rhythm study) as one self-contained HTML page: inline CSS, inline
SVG plots drawn here, one small inline script, no network. Each row's audit view opens in a new tab from a
``blob:`` page built in the browser from the row's annotations and the audit view's own files (``audit.js``
and ``audit.css``, read from disk as ``/ui`` serves them: service/view.py). All text is escaped;
embedded JSON has ``<``, ``>``, ``&`` and ``/`` escaped so row text cannot close a script element."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from faithlens.report import Distribution, Estimate, GroupStats, Histogram, SummaryReport
from service.view import read_asset

LABELS = {
    "mean_fai": "Mean FAI",
    "mean_waad": "Mean WAAD",
    "anchor_rate": "Anchor rate",
    "preplan_rate": "Preplan rate",
    "coupled_pairs": "Coupled pairs",
    "response_length": "Response length (tokens)",
    "reasoning_saliency_share": "Reasoning saliency share",
    "prompt_saliency_share": "Prompt saliency share",
    "spearman_fai_saliency": "Spearman(FAI, saliency)",
    "counterfactual_gap": "Counterfactual gap (random-k − top-k log p)",
}
CORE = ["mean_fai", "mean_waad", "anchor_rate", "preplan_rate", "coupled_pairs", "response_length"]
SALIENCY = [
    "reasoning_saliency_share",
    "prompt_saliency_share",
    "spearman_fai_saliency",
    "counterfactual_gap",
]
COLOURS = {"all": "#4c78a8", "correct": "#2ca02c", "incorrect": "#d62728"}
TEXT_PREVIEW = 240

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; }
main { max-width: 1100px; margin: 1.5rem auto; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.meta { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.88rem; }
th, td { padding: 0.2rem 0.7rem; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } figcaption { font-size: 0.85rem; color: #444; margin-bottom: 0.2rem; }
svg.fl-plot { border: 1px solid #eee; border-radius: 6px; background: #fcfcfc; }
svg.fl-plot text { font-size: 10px; fill: #555; }
.legend span { display: inline-block; margin-right: 1rem; font-size: 0.85rem; }
.swatch { display: inline-block; width: 0.8rem; height: 0.8rem; margin-right: 0.3rem; vertical-align: -1px; }
.rows td.text { max-width: 34rem; white-space: pre-wrap; word-break: break-word; font-size: 0.82rem; }
.error { color: #b00020; }
.rhythm-tokens { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace;
  font-size: 0.82rem; line-height: 1.7; border: 1px solid #eee; border-radius: 6px; padding: 0.5rem; }
.waad-peak { background: #ffe08a; border-radius: 2px; }
.fai-peak { box-shadow: inset 0 -3px 0 #4c78a8; }
td.pa { color: #555; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var assets = JSON.parse(document.getElementById("fl-assets").textContent);
  var annotations = null;
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; });
  }
  function page(title, data) {
    var json = JSON.stringify(data).replace(/</g, "\\u003c").replace(/>/g, "\\u003e");
    return "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + esc(title) +
      "</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>" + assets.css +
      "</style></head><body><main class=\"fl-page\"><h1>" + esc(title) +
      "</h1><div id=\"fl-audit\"></div></main><script>" + assets.js + "<\/script><script>" +
      "FaithlensAudit.render(document.getElementById(\"fl-audit\"), " + json + ");<\/script></body></html>";
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a.fl-open") : null;
    if (!link) return;
    event.preventDefault();
    if (annotations === null) annotations = JSON.parse(document.getElementById("fl-annotations").textContent);
    var data = annotations[link.getAttribute("data-row")];
    if (!data) return;
    var blob = new Blob([page(link.getAttribute("data-title"), data)], { type: "text/html" });
    var url = URL.createObjectURL(blob);
    window.open(url, "_blank");
    setTimeout(function () { URL.revokeObjectURL(url); }, 120000);
  });
})();
"""


def _finite_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: JSON has no NaN, and ``JSON.parse`` rejects it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def _json_for_script(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: still valid JSON, parsed back unchanged."""
    text = json.dumps(_finite_json(value), ensure_ascii=False, allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("/", "\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if float(v) == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.{digits}g}"


def _ci(e: Estimate) -> str:
    if e.mean is None:
        return "–"
    return f"[{_fmt(e.ci_low)}, {_fmt(e.ci_high)}]"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


# ---- plots -------------------------------------------------------------------------------------------------

W, H = 340, 190
PAD_L, PAD_R, PAD_T, PAD_B = 40, 10, 10, 34


def svg_histogram(
    hist: Histogram | None, label: str, series: list[tuple[str, Histogram]] | None = None
) -> str:
    """Bars of one histogram, or several on the same edges side by side within each bin."""
    series = series or ([("all", hist)] if hist is not None else [])
    series = [(name, h) for name, h in series if h is not None]
    aria = _e(f"Histogram of {label}")
    if not series or not series[0][1].counts:
        return (
            f'<svg class="fl-plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{aria}">'
            f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no values</text></svg>'
        )
    edges = series[0][1].edges
    nb = len(edges) - 1
    top = max(max(h.counts) for _, h in series) or 1
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    bw = pw / nb
    parts = [
        f'<svg class="fl-plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{aria}">'
    ]
    parts.append(f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="#999"/>')
    parts.append(f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="#999"/>')
    parts.append(f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{PAD_L - 4}" y="{PAD_T + ph}" text-anchor="end">0</text>')
    k = len(series)
    for si, (name, h) in enumerate(series):
        colour = COLOURS.get(name, "#4c78a8")
        for i, c in enumerate(h.counts):
            if c == 0:
                continue
            bh = ph * c / top
            x = PAD_L + i * bw + si * bw / k
            parts.append(
                f'<rect class="fl-bar" x="{x:.2f}" y="{PAD_T + ph - bh:.2f}" width="{max(bw / k - 1, 0.5):.2f}" '
                f'height="{bh:.2f}" fill="{colour}"><title>{_e(name)}: {c} in [{_fmt(h.edges[i])}, '
                f"{_fmt(h.edges[i + 1])})</title></rect>"
            )
    for x_val, anchor in ((edges[0], "start"), (edges[-1], "end")):
        x = PAD_L if anchor == "start" else PAD_L + pw
        parts.append(
            f'<text x="{x}" y="{PAD_T + ph + 13}" text-anchor="{anchor}">{_e(_fmt(x_val, 3))}</text>'
        )
    parts.append(f'<text x="{PAD_L + pw / 2}" y="{H - 6}" text-anchor="middle">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_intervals(label: str, items: list[tuple[str, Estimate]]) -> str:
    """Each group's mean as a dot with its interval as a bar, on one horizontal axis."""
    items = [(n, e) for n, e in items if e.mean is not None]
    h = 30 + 26 * max(len(items), 1)
    aria = _e(f"Means with 95% intervals: {label}")
    svg = f'<svg class="fl-plot fl-intervals" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img" aria-label="{aria}">'
    if not items:
        return svg + f'<text x="{W / 2}" y="{h / 2}" text-anchor="middle">no values</text></svg>'
    lo = min(min(e.ci_low, e.mean) for _, e in items)  # type: ignore[type-var]
    hi = max(max(e.ci_high, e.mean) for _, e in items)  # type: ignore[type-var]
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    left, right = 80, W - 12

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (right - left)

    parts = [svg]
    for i, (name, e) in enumerate(items):
        y = 20 + 26 * i
        colour = COLOURS.get(name, "#4c78a8")
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{_e(name)}</text>')
        parts.append(
            f'<line x1="{x(e.ci_low):.2f}" y1="{y}" x2="{x(e.ci_high):.2f}" y2="{y}" stroke="{colour}" stroke-width="2"/>'  # type: ignore[arg-type]
        )
        parts.append(
            f'<circle cx="{x(e.mean):.2f}" cy="{y}" r="4" fill="{colour}"><title>{_e(name)}: '
            f"{_fmt(e.mean)} {_ci(e)} (n={e.n})</title></circle>"
        )
    axis_y = h - 10
    parts.append(f'<text x="{left}" y="{axis_y}" text-anchor="start">{_e(_fmt(lo, 3))}</text>')
    parts.append(f'<text x="{right}" y="{axis_y}" text-anchor="end">{_e(_fmt(hi, 3))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{svg}</figure>"


# ---- sections ----------------------------------------------------------------------------------------------


def _headline_rows(name: str, d: Distribution) -> str:
    q = d.quantiles or {}
    return (
        f"<tr><th>{_e(LABELS[name])}</th><td class=num>{d.n}</td><td class=num>{_fmt(d.mean)}</td>"
        f"<td class=num>{_e(_ci(d))}</td><td class=num>{_fmt(q.get('p50'))}</td>"
        f"<td class=num>{_fmt(d.min)} – {_fmt(d.max)}</td></tr>"
    )


def _headline_table(report: SummaryReport) -> str:
    rows = [_headline_rows(n, getattr(report, n)) for n in CORE]
    if report.saliency is not None:
        rows += [_headline_rows(n, getattr(report.saliency, n)) for n in SALIENCY]
    if report.references is not None:
        a = report.references.accuracy
        rows.append(
            f"<tr><th>Accuracy</th><td class=num>{a.n}</td><td class=num>{_fmt(a.mean)}</td>"
            f"<td class=num>{_e(_ci(a))}</td><td></td><td></td></tr>"
        )
    return (
        '<table class="headline"><thead><tr><th>metric (per response)</th><th>n</th><th>mean</th>'
        "<th>95% CI</th><th>median</th><th>range</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _histograms(names: list[str], source: Any) -> str:
    figs = []
    for name in names:
        d: Distribution = getattr(source, name)
        series = [("all", d.histogram)] if d.histogram is not None else []
        figs.append(_figure(f"{LABELS[name]} (n={d.n})", svg_histogram(d.histogram, LABELS[name], series)))
    return '<div class="plots">' + "".join(figs) + "</div>"


def _anchor_section(report: SummaryReport) -> str:
    ap = report.anchor_positions
    series: list[tuple[str, Histogram]] = [("all", ap.histogram)]
    caption = f"Anchors by relative position in the response (i / n), {ap.n_anchors} anchors"
    figs = [_figure(caption, svg_histogram(ap.histogram, "relative position i / n", series))]
    if report.references is not None:
        r = report.references
        split = [
            ("correct", r.correct.anchor_positions.histogram),
            ("incorrect", r.incorrect.anchor_positions.histogram),
        ]
        figs.append(
            _figure("Correct against incorrect", svg_histogram(None, "relative position i / n", split))
        )
    return (
        '<h2 id="anchor-positions">Anchor positions</h2><p class="meta">Mean relative position per response: '
        f"{_fmt(ap.mean.mean)} {_e(_ci(ap.mean))} (n={ap.mean.n}).</p>"
        '<div class="plots">' + "".join(figs) + "</div>"
    )


def _legend(names: list[str]) -> str:
    return (
        '<p class="legend">'
        + "".join(
            f'<span><i class="swatch" style="background:{COLOURS[n]}"></i>{_e(n)}</span>' for n in names
        )
        + "</p>"
    )


def _split_section(report: SummaryReport) -> str:
    r = report.references
    if r is None:
        return ""
    names = list(CORE)
    if r.correct.saliency is not None or r.incorrect.saliency is not None:
        names += SALIENCY
    table_rows = []
    figs = []
    for name in names:
        ec = _metric(r.correct, name)
        ei = _metric(r.incorrect, name)
        diff = r.difference.get(name)
        table_rows.append(
            f"<tr><th>{_e(LABELS[name])}</th>"
            + "".join(
                f"<td class=num>{_fmt(e.mean) if e else '–'}</td><td class=num>{_e(_ci(e)) if e else '–'}</td>"
                for e in (ec, ei, diff)
            )
            + "</tr>"
        )
        items = [(n, e) for n, e in (("correct", ec), ("incorrect", ei)) if e is not None]
        figs.append(_figure(LABELS[name], svg_intervals(LABELS[name], items)))
        hc = ec.histogram if isinstance(ec, Distribution) else None
        hi = ei.histogram if isinstance(ei, Distribution) else None
        if hc is not None and hi is not None:
            figs.append(
                _figure(
                    f"{LABELS[name]}: histograms",
                    svg_histogram(None, LABELS[name], [("correct", hc), ("incorrect", hi)]),
                )
            )
    a = r.accuracy
    return (
        '<h2 id="correct-vs-incorrect">Correct against incorrect</h2>'
        f'<p class="meta">{r.n_rows} rows with a reference: {r.correct.n_rows} correct, {r.incorrect.n_rows} '
        f"incorrect; accuracy {_fmt(a.mean)} {_e(_ci(a))}.</p>"
        '<table class="split"><thead><tr><th>metric</th><th>correct</th><th>95% CI</th><th>incorrect</th>'
        "<th>95% CI</th><th>difference</th><th>95% CI</th></tr></thead><tbody>"
        + "".join(table_rows)
        + "</tbody></table>"
        + _legend(["correct", "incorrect"])
        + '<div class="plots">'
        + "".join(figs)
        + "</div>"
    )


def _metric(group: GroupStats, name: str) -> Distribution | None:
    if name in CORE:
        return getattr(group, name)
    return None if group.saliency is None else getattr(group.saliency, name)


def _saliency_section(report: SummaryReport) -> str:
    s = report.saliency
    if s is None:
        return ""
    w = s.counterfactual_top_k_worse
    return (
        f'<h2 id="saliency">Saliency</h2><p class="meta">{s.n_rows} rows with saliency. Counterfactual gap = '
        "random_k_logprob − top_k_logprob: positive when suppressing the k most salient reasoning tokens lowers "
        "the answer's log-probability more than suppressing k random ones. Share of responses with a positive "
        f"gap: {_fmt(w.mean)} {_e(_ci(w))} (n={w.n}).</p>" + _histograms(SALIENCY, s)
    )


# ---- the rhythm study (spec §11) ---------------------------------------------------------------------------

RHYTHM_STATS: list[tuple[str, str, list[tuple[str, str, bool]]]] = [
    (
        "A",
        "Entropy at WAAD peaks",
        [
            ("observed", "mean entropy at WAAD peaks (nats)", False),
            ("baseline", "mean entropy over all response tokens", False),
            ("lift", "lift", True),
        ],
    ),
    (
        "B",
        "An FAI peak follows or coincides with a WAAD peak",
        [
            ("observed", "share of FAI peaks", False),
            ("baseline", "share with FAI shuffled", False),
            ("lift", "lift", True),
        ],
    ),
    (
        "C",
        "Perturbation at high against low FAI",
        [
            ("jaccard_high", "mean Jaccard, highest-FAI position", False),
            ("jaccard_low", "mean Jaccard, lowest-FAI position", False),
            ("share_high_diverges_more", "share of trials where high diverges more", False),
        ],
    ),
]


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _pct(v: Any) -> str:
    v = _finite(v)
    return "–" if v is None else f"{v * 100:+.2f}%"


def _value(v: Any, percent: bool) -> str:
    return _pct(v) if percent else _fmt(_finite(v))


def _interval(bounds: Any, percent: bool) -> str:
    if not isinstance(bounds, list | tuple) or len(bounds) != 2 or None in [_finite(b) for b in bounds]:
        return "–"
    return f"[{_value(bounds[0], percent)}, {_value(bounds[1], percent)}]"


def _rhythm_table(rhythm: dict[str, Any], pa: dict[str, dict[str, float]]) -> str:
    rows = []
    for key, name, figures in RHYTHM_STATS:
        stat = rhythm.get(key) or {}
        ci = stat.get("ci95") or {}
        for i, (figure, label, percent) in enumerate(figures):
            head = f'<th rowspan="{len(figures)}">{_e(key)}. {_e(name)}</th>' if i == 0 else ""
            rows.append(
                f"<tr>{head}<td>{_e(label)}</td><td class=num>{_value(stat.get(figure), percent)}</td>"
                f"<td class=num>{_interval(ci.get(figure), percent)}</td>"
                f'<td class="num pa">{_value(pa.get(key, {}).get(figure), percent)}</td></tr>'
            )
    return (
        '<table class="rhythm"><thead><tr><th>statistic</th><th>figure</th><th>this model</th>'
        "<th>95% CI</th><th>[PA]</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _rhythm_grid(grid: list[dict[str, Any]]) -> str:
    if not grid:
        return ""
    rows = "".join(
        f"<tr><td class=num>{_fmt(_finite(g.get('q_peak')))}</td><td class=num>{_fmt(_finite(g.get('k')))}</td>"
        f"<td class=num>{_value(g.get('observed'), False)}</td><td class=num>{_value(g.get('baseline'), False)}</td>"
        f"<td class=num>{_pct(g.get('lift'))}</td></tr>"
        for g in grid
    )
    return (
        '<h3 id="rhythm-grid">B for other peak settings</h3><table class="rhythm-grid"><thead><tr>'
        "<th>q_peak</th><th>k_B</th><th>observed</th><th>shuffled</th><th>lift</th></tr></thead><tbody>"
        + rows
        + "</tbody></table>"
    )


def _peak_span(i: int, text: str, waad: set[int], fai: set[int]) -> str:
    classes = [c for c, peaks in (("waad-peak", waad), ("fai-peak", fai)) if i in peaks]
    if not classes:
        return f"<span>{_e(text)}</span>"
    what = " and ".join(c.replace("-", " ").replace("waad", "WAAD").replace("fai", "FAI") for c in classes)
    return f'<span class="{" ".join(classes)}" title="{_e(f"token {i}: {what}")}">{_e(text)}</span>'


def _rhythm_example(example: dict[str, Any]) -> str:
    waad, fai = set(example.get("waad_peaks") or []), set(example.get("fai_peaks") or [])
    tokens = example.get("tokens") or []
    spans = "".join(_peak_span(i, str(t), waad, fai) for i, t in enumerate(tokens))
    return (
        f'<figure class="rhythm-example"><figcaption>Row {_e(example.get("index"))}: {len(tokens)} tokens, '
        f"{len(waad)} WAAD peaks, {len(fai)} FAI peaks</figcaption>"
        f'<div class="rhythm-tokens">{spans}</div></figure>'
    )


RHYTHM_LEGEND = (
    '<p class="legend"><span><span class="waad-peak">WAAD peak</span></span>'
    '<span><span class="fai-peak">FAI peak</span></span>'
    '<span><span class="waad-peak fai-peak">both</span></span></p>'
)


def rhythm_section(rhythm: dict[str, Any]) -> str:
    """The rhythm study (spec §11): statistics A, B and C against [PA]'s figures, the B grid, examples."""
    from faithlens.study import PA_FIGURES, RhythmConfig

    config = RhythmConfig()  # the settings audits study with
    examples = rhythm.get("examples") or []
    trials = (rhythm.get("C") or {}).get("trials")
    parts = [
        '<h2 id="rhythm">Rhythm study</h2>',
        f'<p class="meta">{_e(rhythm.get("n", 0))} responses; 95% percentile-bootstrap intervals over '
        f"responses ({config.resamples} resamples, seed {config.seed}); C over "
        f"{_e(trials if trials is not None else 0)} trials. [PA]: Qwen3-4B-Base over 70 GSM8K problems. "
        f"Peaks: local maxima in the top {_fmt(config.q_peak * 100)}% of a response's values (q_peak "
        f"{_fmt(config.q_peak)}); B counts an FAI peak with a WAAD peak at most {config.k_B} token(s) before "
        f"it (k_B {config.k_B}), against FAI shuffled {config.permutations} times.</p>",
        _rhythm_table(rhythm, PA_FIGURES),
        _rhythm_grid(rhythm.get("B_grid") or []),
    ]
    if examples:
        parts.append('<h3 id="rhythm-examples">Examples</h3>' + RHYTHM_LEGEND)
        parts += [_rhythm_example(example) for example in examples]
    return "".join(parts)


def _rows_table(audit_id: str, rows: list[dict]) -> tuple[str, dict[str, Any]]:
    annotations: dict[str, Any] = {}
    body = []
    for pos, row in enumerate(rows):
        ann = row.get("annotations")
        index = row.get("index", pos)
        rid = row.get("id")
        text = str(row.get("text") or "")
        preview = text if len(text) <= TEXT_PREVIEW else text[:TEXT_PREVIEW] + "…"
        correct = row.get("correct")
        summary = (ann or {}).get("summary") or {}
        if ann is not None:
            annotations[str(pos)] = ann
            title = f"faithlens audit {audit_id} · row {index}" + (f" · {rid}" if rid is not None else "")
            link = (
                f'<a class="fl-open" href="#row-{pos}" data-row="{pos}" data-title="{_e(title)}" '
                'target="_blank" rel="noopener">open audit</a>'
            )
        else:
            link = ""
        error = row.get("error")
        err = (
            f'<span class="error">{_e(error if isinstance(error, str) else json.dumps(error))}</span>'
            if error
            else ""
        )
        body.append(
            f'<tr id="row-{pos}"><td class=num>{_e(index)}</td><td>{_e("" if rid is None else rid)}</td>'
            f'<td class="text">{_e(preview)}</td>'
            f"<td>{'–' if correct is None else ('yes' if correct else 'no')}</td>"
            f"<td class=num>{_fmt(summary.get('num_response_tokens'))}</td>"
            f"<td class=num>{_fmt(summary.get('num_anchors'))}</td>"
            f"<td class=num>{_fmt(summary.get('mean_fai'))}</td>"
            f"<td>{link}{err}</td></tr>"
        )
    table = (
        '<table class="rows"><thead><tr><th>index</th><th>id</th><th>text</th><th>correct</th><th>tokens</th>'
        "<th>anchors</th><th>mean FAI</th><th>audit view</th></tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )
    return table, annotations


def _summary_parts(report: SummaryReport, total: int) -> list[str]:
    return [
        f'<p class="meta">{report.n_rows} analysed rows of {total}; means with {round(report.confidence * 100)}% '
        f"percentile-bootstrap intervals over rows ({report.resamples} resamples, seed {report.seed}).</p>",
        '<h2 id="headline">Headline numbers</h2>',
        _headline_table(report),
        '<h2 id="distributions">Distributions</h2>',
        _histograms(CORE, report),
        _anchor_section(report),
        _split_section(report),
        _saliency_section(report),
    ]


def render_report(
    audit_id: str,
    report: SummaryReport | None,
    rows: list[dict],
    ui_dir: Path | None = None,
    rhythm: dict[str, Any] | None = None,
) -> str:
    """The self-contained report page for an audit: its ``summary`` report and/or its ``rhythm`` report
    (each None when the audit did not ask for it). ``rows`` are the audit's result lines
    (``{id, index, text, annotations, correct, error}``); ``ui_dir`` holds ``audit.js`` and ``audit.css``
    (default: the ones installed with the server, as ``/ui`` serves them). Without them, the 501
    ``ui_unavailable`` APIError of :func:`service.view.view_file`."""
    assets = {"css": read_asset(ui_dir, "audit.css"), "js": read_asset(ui_dir, "audit.js")}
    rows_table, annotations = _rows_table(audit_id, rows)
    names = [name for name, r in (("summary", report), ("rhythm", rhythm)) if r is not None]
    title = f"faithlens audit {audit_id}: {' and '.join(names) or 'report'}"
    parts = [f"<h1>{_e(title)}</h1>"]
    if report is not None:
        parts += _summary_parts(report, len(rows))
    if rhythm is not None:
        parts.append(rhythm_section(rhythm))
    parts += [
        '<h2 id="rows">Rows</h2><p class="meta">“open audit” opens the row\'s audit view in a new tab.</p>',
        rows_table,
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        + "".join(parts)
        + f'</main><script type="application/json" id="fl-assets">{_json_for_script(assets)}</script>'
        + f'<script type="application/json" id="fl-annotations">{_json_for_script(annotations)}</script>'
        + f"<script>{SCRIPT}</script></body></html>\n"
    )
