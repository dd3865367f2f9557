"""The summary report of an audit at dataset scale (docs/annotations.md, "Audit summary report").

Pure: it reads per-response analyses (``faithlens.schema.Analysis``) and, where the dataset had references,
whether each answer was correct, and returns a JSON-ready pydantic model. Every mean comes with a seeded 95%
percentile-bootstrap interval over rows (``faithlens.stats``). Undefined values are ``None``, never NaN."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from faithlens.schema import Analysis
from faithlens.stats import bootstrap_mean_ci, bootstrap_mean_diff_ci

CONFIDENCE = 0.95
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_BINS = 20
ANCHOR_POSITION_BINS = 10
# Integer-valued metrics whose range is at most this wide get one bin per integer.
_UNIT_BINS_MAX = 30


@dataclass
class RowOutcome:
    """One audited response: its analysis and, where the dataset has a reference, whether it was correct."""

    analysis: Analysis
    correct: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.analysis, dict):
            self.analysis = Analysis.model_validate(self.analysis)


class Histogram(BaseModel):
    """``counts[i]`` values lie in ``[edges[i], edges[i+1])``; the last bin also holds its right edge."""

    edges: list[float]
    counts: list[int]


class Estimate(BaseModel):
    """A mean over ``n`` values with its 95% percentile-bootstrap interval; all ``None`` when ``n`` is 0."""

    n: int = Field(description="Values used (rows where the value is defined).")
    mean: float | None
    ci_low: float | None
    ci_high: float | None


class Distribution(Estimate):
    """A per-response value over rows: mean with interval, spread, quantiles and a histogram."""

    missing: int = Field(description="Rows in the group where the value is undefined (skipped).")
    std: float | None = Field(description="Sample standard deviation (ddof=1); None below 2 values.")
    min: float | None
    max: float | None
    quantiles: dict[str, float] | None = Field(
        description='Linear-interpolation quantiles, keyed "p5", "p25", "p50", "p75", "p95".'
    )
    histogram: Histogram | None


class SaliencyStats(BaseModel):
    """Over the rows whose summary has saliency (``saliency_method`` set)."""

    n_rows: int
    reasoning_saliency_share: Distribution
    prompt_saliency_share: Distribution
    spearman_fai_saliency: Distribution
    counterfactual_gap: Distribution = Field(
        description="random_k_logprob − top_k_logprob per response: how much more suppressing the k most "
        "salient reasoning tokens lowers Σ log p(target) than suppressing k random ones (positive: saliency "
        "found tokens the answer relies on)."
    )
    counterfactual_top_k_worse: Estimate = Field(
        description="Share of responses with counterfactual_gap > 0."
    )


class AnchorPositions(BaseModel):
    """Anchors pooled over rows by relative position i / n (i: offset in the response, n: its length)."""

    n_anchors: int
    histogram: Histogram
    mean: Estimate = Field(description="Mean over rows of each row's mean relative anchor position.")


class GroupStats(BaseModel):
    """The distributions over one group of rows."""

    n_rows: int
    mean_fai: Distribution
    mean_waad: Distribution
    anchor_rate: Distribution = Field(description="num_anchors / num_response_tokens per response.")
    preplan_rate: Distribution = Field(description="num_preplan / num_response_tokens per response.")
    coupled_pairs: Distribution = Field(description="num_coupled_pairs per response.")
    response_length: Distribution = Field(description="num_response_tokens per response.")
    anchor_positions: AnchorPositions
    saliency: SaliencyStats | None = Field(description="None when no row of the group has saliency.")


class ReferenceSplit(BaseModel):
    """Over the rows with a reference (``correct`` not None)."""

    n_rows: int
    accuracy: Estimate
    correct: GroupStats
    incorrect: GroupStats
    difference: dict[str, Estimate] = Field(
        description="For each metric, mean(correct) − mean(incorrect) with a bootstrap interval "
        "(each group resampled on its own)."
    )


class SummaryReport(GroupStats):
    """The whole audit: distributions over all rows, plus the split by correctness where references exist."""

    seed: int
    resamples: int
    confidence: float = CONFIDENCE
    references: ReferenceSplit | None = Field(description="None when no row has a reference.")


def _rate(count: int, length: int) -> float | None:
    return count / length if length > 0 else None


def _gap(a: Analysis) -> float | None:
    cf = a.summary.counterfactual
    return None if cf is None else cf.random_k_logprob - cf.top_k_logprob


# How a metric is binned: a fixed range, INTEGER (whole numbers: one bin per value when few), or None.
INTEGER = "integer"
Binning = tuple[float, float] | str | None
# name -> (value per row, binning)
METRICS: dict[str, tuple[Callable[[Analysis], float | None], Binning]] = {
    "mean_fai": (lambda a: a.summary.mean_fai, None),
    "mean_waad": (lambda a: a.summary.mean_waad, None),
    "anchor_rate": (lambda a: _rate(a.summary.num_anchors, a.summary.num_response_tokens), (0.0, 1.0)),
    "preplan_rate": (lambda a: _rate(a.summary.num_preplan, a.summary.num_response_tokens), (0.0, 1.0)),
    "coupled_pairs": (lambda a: a.summary.num_coupled_pairs, INTEGER),
    "response_length": (lambda a: a.summary.num_response_tokens, INTEGER),
}
SALIENCY_METRICS: dict[str, tuple[Callable[[Analysis], float | None], Binning]] = {
    "reasoning_saliency_share": (lambda a: a.summary.reasoning_saliency_share, (0.0, 1.0)),
    "prompt_saliency_share": (lambda a: a.summary.prompt_saliency_share, (0.0, 1.0)),
    "spearman_fai_saliency": (lambda a: a.summary.spearman_fai_saliency, (-1.0, 1.0)),
    "counterfactual_gap": (_gap, None),
}


def has_saliency(a: Analysis) -> bool:
    return a.summary.saliency_method is not None


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def histogram_edges(values: Sequence[float | None], binning: Binning = None) -> list[float] | None:
    """Bin edges for a metric: a fixed ``binning`` range split in 20; for an ``INTEGER`` metric spanning at most 30,
    one bin per integer; else 20 equal bins from min to max (one unit-wide bin around a constant)."""
    vals = _finite(values)
    if isinstance(binning, tuple):
        return np.linspace(binning[0], binning[1], HISTOGRAM_BINS + 1).tolist()
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    if binning == INTEGER and hi - lo <= _UNIT_BINS_MAX:
        return [lo - 0.5 + i for i in range(int(hi - lo) + 2)]
    if lo == hi:
        return [lo - 0.5, hi + 0.5]
    return np.linspace(lo, hi, HISTOGRAM_BINS + 1).tolist()


def _histogram(vals: list[float], edges: list[float]) -> Histogram:
    # A value outside a fixed range (a share a rounding error above 1) is counted in the end bin.
    arr = np.clip(np.asarray(vals, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(arr, bins=np.asarray(edges, dtype=np.float64))
    return Histogram(edges=[float(e) for e in edges], counts=[int(c) for c in counts])


def distribution(
    values: Sequence[float | None],
    seed: int = 0,
    resamples: int = 1000,
    edges: list[float] | None = None,
    binning: Binning = None,
) -> Distribution:
    """The ``Distribution`` of per-row values; ``None`` values are skipped and counted in ``missing``."""
    vals = _finite(values)
    mean, low, high = bootstrap_mean_ci(vals, seed=seed, resamples=resamples, confidence=CONFIDENCE)
    if edges is None:
        edges = histogram_edges(vals, binning)
    if not vals:
        return Distribution(
            n=0, missing=len(values), mean=None, ci_low=None, ci_high=None, std=None, min=None, max=None,
            quantiles=None, histogram=_histogram([], edges) if edges else None,
        )  # fmt: skip
    arr = np.asarray(vals, dtype=np.float64)
    qs = np.quantile(arr, QUANTILES)
    return Distribution(
        n=len(vals),
        missing=len(values) - len(vals),
        mean=mean,
        ci_low=low,
        ci_high=high,
        std=float(arr.std(ddof=1)) if arr.size > 1 else None,
        min=float(arr.min()),
        max=float(arr.max()),
        quantiles={f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        histogram=_histogram(vals, edges) if edges else None,
    )


def estimate(values: Sequence[float | None], seed: int = 0, resamples: int = 1000) -> Estimate:
    vals = _finite(values)
    mean, low, high = bootstrap_mean_ci(vals, seed=seed, resamples=resamples, confidence=CONFIDENCE)
    return Estimate(n=len(vals), mean=mean, ci_low=low, ci_high=high)


def anchor_relative_positions(a: Analysis) -> list[float]:
    """i / n for each anchor, i its offset in the response (0-based), n the response's length: in [0, 1)."""
    n = len(a.tokens)
    return [i / n for i, t in enumerate(a.tokens) if t.anchor]


def _anchor_positions(analyses: Sequence[Analysis], seed: int, resamples: int) -> AnchorPositions:
    per_row = [anchor_relative_positions(a) for a in analyses]
    pooled = [p for row in per_row for p in row]
    edges = np.linspace(0.0, 1.0, ANCHOR_POSITION_BINS + 1).tolist()
    row_means = [float(np.mean(row)) if row else None for row in per_row]
    return AnchorPositions(
        n_anchors=len(pooled),
        histogram=_histogram(pooled, edges),
        mean=estimate(row_means, seed=seed, resamples=resamples),
    )


def _values(analyses: Sequence[Analysis], metrics: dict) -> dict[str, list[float | None]]:
    return {name: [fn(a) for a in analyses] for name, (fn, _) in metrics.items()}


def _all_edges(analyses: Sequence[Analysis]) -> dict[str, list[float] | None]:
    """The whole audit's bin edges per metric, so the correct and incorrect histograms line up."""
    edges = {}
    for metrics, rows in ((METRICS, analyses), (SALIENCY_METRICS, [a for a in analyses if has_saliency(a)])):
        for name, values in _values(rows, metrics).items():
            edges[name] = histogram_edges(values, metrics[name][1])
    return edges


def _group(
    analyses: Sequence[Analysis], seed: int, resamples: int, edges: dict[str, list[float] | None]
) -> dict:
    out: dict = {"n_rows": len(analyses)}
    for name, values in _values(analyses, METRICS).items():
        out[name] = distribution(values, seed=seed, resamples=resamples, edges=edges[name])
    out["anchor_positions"] = _anchor_positions(analyses, seed, resamples)
    salient = [a for a in analyses if has_saliency(a)]
    if not salient:
        out["saliency"] = None
        return out
    sal: dict = {"n_rows": len(salient)}
    for name, values in _values(salient, SALIENCY_METRICS).items():
        sal[name] = distribution(values, seed=seed, resamples=resamples, edges=edges[name])
    gaps = [g for g in (_gap(a) for a in salient) if g is not None]
    sal["counterfactual_top_k_worse"] = estimate([float(g > 0) for g in gaps], seed=seed, resamples=resamples)
    out["saliency"] = SaliencyStats(**sal)
    return out


def summarize(rows: Sequence[RowOutcome], seed: int = 0, resamples: int = 1000) -> SummaryReport:
    """The audit's summary report over ``rows`` (docs/annotations.md, "Audit summary report").

    Deterministic for a seed: every interval is a percentile bootstrap over rows drawn from
    ``numpy.random.default_rng(seed)``."""
    analyses = [r.analysis for r in rows]
    edges = _all_edges(analyses)
    overall = _group(analyses, seed, resamples, edges)
    refs = [r for r in rows if r.correct is not None]
    references = None
    if refs:
        right = [r.analysis for r in refs if r.correct]
        wrong = [r.analysis for r in refs if not r.correct]
        difference: dict[str, Estimate] = {}
        for metrics, keep in ((METRICS, lambda a: True), (SALIENCY_METRICS, has_saliency)):
            vr = _values([a for a in right if keep(a)], metrics)
            vw = _values([a for a in wrong if keep(a)], metrics)
            for name in metrics:
                a_ = _finite(vr[name])
                b_ = _finite(vw[name])
                d, lo, hi = bootstrap_mean_diff_ci(
                    a_, b_, seed=seed, resamples=resamples, confidence=CONFIDENCE
                )
                difference[name] = Estimate(n=len(a_) + len(b_), mean=d, ci_low=lo, ci_high=hi)
        references = ReferenceSplit(
            n_rows=len(refs),
            accuracy=estimate([float(bool(r.correct)) for r in refs], seed=seed, resamples=resamples),
            correct=GroupStats(**_group(right, seed, resamples, edges)),
            incorrect=GroupStats(**_group(wrong, seed, resamples, edges)),
            difference=difference,
        )
    return SummaryReport(**overall, seed=seed, resamples=resamples, references=references)
