"""The rhythm study (spec §11): do [PA]'s Tables 1–2 hold on the served model?

:func:`study_response` measures one response: its entropies and WAAD/FAI peaks (one analysis pass with
``H_hi = None``), the counts behind statistics A and B (with B's seeded permutation baseline and its
sensitivity grid), and statistic C's perturbation trials, decoded greedily through the one decode path.
:func:`pool_rhythm` pools any number of responses into the three statistics, each with a 95% bootstrap
interval over problems. Everything a response contributes is an additive count, so a study can be split
over audit shards and pooled later, and its ``per_problem`` entries add up to the pooled figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from faithlens.analysis import compute_metrics
from faithlens.answer import char_span_to_tokens, find_answer_span, gsm8k_correct
from faithlens.data import Problem
from faithlens.generation import Generation, generate, generate_batch
from faithlens.model import LoadedModel
from faithlens.params import AnalysisParams, SamplingParams
from faithlens.stats import bootstrap_pooled
from faithlens.study.peaks import find_peaks, followed, shuffled_fai
from faithlens.study.words import content_words, jaccard

# [PA]'s published figures (Qwen3-4B-Base, 70 GSM8K problems): Table 2 for A and B, Table 1 for C.
PA_FIGURES: dict[str, dict[str, float]] = {
    "A": {"observed": 0.3608, "baseline": 0.2386, "lift": 0.5197},
    "B": {"observed": 0.5253, "baseline": 0.3687, "lift": 0.4247},
    "C": {"jaccard_high": 0.534, "jaccard_low": 0.631, "share_high_diverges_more": 0.8714},
}


@dataclass(frozen=True)
class RhythmConfig:
    """The study's settings, with the spec's defaults (§11); only the sampling and the seed are meant to
    change. ``seed`` seeds B's permutations (with the problem's index) and the bootstraps."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy; > 0 samples with ``seed``
    seed: int = 0
    q_peak: float = 0.4
    k_B: int = 1
    permutations: int = 100
    grid_q_peak: tuple[float, ...] = (0.1, 0.2, 0.4)
    grid_k: tuple[int, ...] = (0, 1, 3)
    ranks: tuple[int, ...] = (2, 3, 4)  # the candidates that replace the original token
    min_after: int = 32  # an eligible position has at least this many tokens after it
    max_continuation: int = 64
    resamples: int = 1000
    analysis: AnalysisParams = field(default_factory=lambda: AnalysisParams(H_hi=None))

    def sampling(self, index: int = 0) -> SamplingParams:
        """How problem ``index``'s response is decoded: greedy, or sampled with its own seed (``seed +
        index``), so that a problem's response does not depend on which others run with it."""
        seed = self.seed + index if self.temperature > 0 else None
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)


@dataclass
class EntropyCounts:
    """Statistic A's counts for one response (tokens with a defined entropy)."""

    entropy_sum_at_peaks: float
    waad_peaks: int
    entropy_sum: float
    tokens: int


@dataclass
class FollowCounts:
    """Statistic B's counts for one response at one (q_peak, k): FAI peaks with a WAAD peak at most k
    before them, observed and averaged over the permutations."""

    q_peak: float
    k: int
    followed: int
    fai_peaks: int
    shuffled_followed: float
    shuffled_fai_peaks: float


@dataclass
class Trial:
    """One of statistic C's trials: the rank-``rank`` candidate at the high- and the low-FAI position."""

    rank: int
    token_high: str
    token_low: str
    jaccard_high: float
    jaccard_low: float


@dataclass
class ResponseRhythm:
    """What one response contributes to the study; positions are response-relative."""

    index: int
    tokens: int
    answer_start: int | None
    waad_peaks: list[int]
    fai_peaks: list[int]
    A: EntropyCounts
    B: FollowCounts
    B_grid: list[FollowCounts]
    high: int | None  # the eligible position with the highest FAI (None: fewer than two eligible)
    low: int | None
    trials: list[Trial]
    correct: bool | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """One ``per_problem`` entry (JSON-safe)."""
        out = asdict(self)
        out["C"] = {"high": out.pop("high"), "low": out.pop("low"), "trials": out.pop("trials")}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResponseRhythm:
        c = data["C"]
        return cls(
            index=data["index"],
            tokens=data["tokens"],
            answer_start=data["answer_start"],
            waad_peaks=list(data["waad_peaks"]),
            fai_peaks=list(data["fai_peaks"]),
            A=EntropyCounts(**data["A"]),
            B=FollowCounts(**data["B"]),
            B_grid=[FollowCounts(**g) for g in data["B_grid"]],
            high=c["high"],
            low=c["low"],
            trials=[Trial(**t) for t in c["trials"]],
            correct=data.get("correct"),
            seconds=data.get("seconds", 0.0),
        )


# -- one response -------------------------------------------------------------------------------------


def entropy_counts(entropy: np.ndarray, waad_peaks: np.ndarray) -> EntropyCounts:
    """Statistic A's sums: the entropy over the WAAD peaks and over all tokens."""
    defined = np.isfinite(entropy)
    at_peaks = defined & waad_peaks
    return EntropyCounts(
        entropy_sum_at_peaks=float(entropy[at_peaks].sum()),
        waad_peaks=int(at_peaks.sum()),
        entropy_sum=float(entropy[defined].sum()),
        tokens=int(defined.sum()),
    )


def follow_counts(
    waad: np.ndarray, fai: np.ndarray, shuffled: np.ndarray, q_peak: float, k: int
) -> FollowCounts:
    """Statistic B's counts at one setting; ``shuffled`` holds the permuted FAI vectors, one per row."""
    waad_peaks = find_peaks(waad, q_peak)
    fai_peaks = find_peaks(fai, q_peak)
    shuffled_peaks = find_peaks(shuffled, q_peak)
    return FollowCounts(
        q_peak=q_peak,
        k=k,
        followed=int(followed(fai_peaks, waad_peaks, k)),
        fai_peaks=int(fai_peaks.sum()),
        shuffled_followed=float(followed(shuffled_peaks, waad_peaks, k).mean()),
        shuffled_fai_peaks=float(shuffled_peaks.sum(-1).mean()),
    )


def eligible_positions(fai: np.ndarray, answer_start: int | None, min_after: int) -> np.ndarray:
    """Statistic C's positions: defined FAI, before the answer span, ``min_after`` tokens after them."""
    n = fai.shape[0]
    positions = np.arange(n)
    ok = ~np.isnan(fai) & (n - 1 - positions >= min_after)
    if answer_start is not None:
        ok &= positions < answer_start
    return np.flatnonzero(ok)


def high_low(fai: np.ndarray, eligible: np.ndarray) -> tuple[int | None, int | None]:
    """The eligible positions with the highest and the lowest FAI (the first on ties); ``None`` when fewer
    than two are eligible or all share one value."""
    if eligible.size < 2:
        return None, None
    values = fai[eligible]
    high, low = int(eligible[np.argmax(values)]), int(eligible[np.argmin(values)])
    return (None, None) if high == low else (high, low)


def continuation_length(response_ids: list[int], position: int, config: RhythmConfig) -> int:
    """As many tokens as the original has after ``position``, at most ``config.max_continuation``."""
    return min(config.max_continuation, len(response_ids) - position - 1)


def perturbed_continuations(
    lm: LoadedModel,
    prompt_ids: list[int],
    response_ids: list[int],
    candidates: dict[int, list[int]],
    config: RhythmConfig,
    adapter: str | None = None,
) -> dict[int, list[Generation]]:
    """For each position and each of its candidates: the original token replaced by the candidate, the
    response continued greedily (:func:`continuation_length` tokens). All run as one batch on the one
    decode path, which decodes a request the same alone or batched."""
    requests = []
    for position, tokens in candidates.items():
        greedy = SamplingParams(max_new_tokens=continuation_length(response_ids, position, config))
        requests += [([*prompt_ids, *response_ids[:position], token], greedy) for token in tokens]
    done = iter(generate_batch(lm, requests, adapter))
    return {position: [next(done) for _ in tokens] for position, tokens in candidates.items()}


def perturbation_trials(
    lm: LoadedModel,
    prompt_ids: list[int],
    response_ids: list[int],
    high: int,
    low: int,
    candidates: dict[int, list[int]],
    config: RhythmConfig,
    adapter: str | None = None,
) -> list[Trial]:
    """Statistic C's trials: the candidates (``candidates[position]``, in ``config.ranks`` order) at
    ``high`` and at ``low``; a trial's similarities are the Jaccard of the content words of the original's
    tokens after the position and of the perturbed continuation (as many tokens)."""
    runs = perturbed_continuations(lm, prompt_ids, response_ids, candidates, config, adapter)
    originals = {}
    for position in (high, low):
        length = continuation_length(response_ids, position, config)
        originals[position] = content_words(
            lm.tokenizer.decode(response_ids[position + 1 : position + 1 + length])
        )

    def similarity(position: int, i: int) -> float:
        return jaccard(originals[position], content_words(runs[position][i].text))

    return [
        Trial(
            rank=rank,
            token_high=lm.tokenizer.decode([candidates[high][i]]),
            token_low=lm.tokenizer.decode([candidates[low][i]]),
            jaccard_high=similarity(high, i),
            jaccard_low=similarity(low, i),
        )
        for i, rank in enumerate(config.ranks)
    ]


def _answer_start(lm: LoadedModel, response_ids: list[int]) -> int | None:
    texts = lm.token_texts(response_ids)
    span = find_answer_span("".join(texts))
    tokens = char_span_to_tokens(texts, span) if span else None
    return None if tokens is None else tokens[0]


def study_response(
    lm: LoadedModel,
    prompt_ids: list[int],
    response_ids: list[int],
    *,
    index: int,
    config: RhythmConfig | None = None,
    adapter: str | None = None,
) -> ResponseRhythm:
    """Everything one response contributes to the study. ``index`` (the problem's) seeds B's permutations
    with ``config.seed``, so a response's counts do not depend on which run or shard measured it. The
    analysis pass runs under whatever adapter is active on ``lm``; ``adapter`` names the one the
    continuations decode with."""
    config = config or RhythmConfig()
    started = time.perf_counter()
    metrics = compute_metrics(
        lm, [*prompt_ids, *response_ids], len(prompt_ids), config.analysis, top_k=max(config.ranks)
    )
    assert metrics.next_token is not None and metrics.next_token.top_ids is not None
    waad = metrics.waad.double().numpy()
    fai = metrics.fai[len(prompt_ids) :].double().numpy()
    entropy = metrics.next_token.entropy.double().numpy()
    waad_peaks, fai_peaks = find_peaks(waad, config.q_peak), find_peaks(fai, config.q_peak)
    shuffled = shuffled_fai(fai, config.permutations, np.random.default_rng([config.seed, index]))
    grid = [follow_counts(waad, fai, shuffled, q, k) for q in config.grid_q_peak for k in config.grid_k]
    answer_start = _answer_start(lm, response_ids)
    high, low = high_low(fai, eligible_positions(fai, answer_start, config.min_after))
    trials: list[Trial] = []
    if high is not None and low is not None:
        top = metrics.next_token.top_ids
        candidates = {p: [int(top[p, r - 1]) for r in config.ranks] for p in (high, low)}
        trials = perturbation_trials(lm, prompt_ids, response_ids, high, low, candidates, config, adapter)
    return ResponseRhythm(
        index=index,
        tokens=len(response_ids),
        answer_start=answer_start,
        waad_peaks=np.flatnonzero(waad_peaks).tolist(),
        fai_peaks=np.flatnonzero(fai_peaks).tolist(),
        A=entropy_counts(entropy, waad_peaks),
        B=follow_counts(waad, fai, shuffled, config.q_peak, config.k_B),
        B_grid=grid,
        high=high,
        low=low,
        trials=trials,
        seconds=round(time.perf_counter() - started, 4),
    )


def study_problems(
    lm: LoadedModel,
    problems: Iterable[tuple[int, Problem]],
    config: RhythmConfig | None = None,
    progress: Callable[[ResponseRhythm], None] | None = None,
) -> list[ResponseRhythm]:
    """Generate a response to each ``(index, problem)`` (the chat-templated question, ``config``'s
    sampling, the one decode path) and study it. A problem whose response is empty is skipped."""
    config = config or RhythmConfig()
    rows: list[ResponseRhythm] = []
    for index, problem in problems:
        started = time.perf_counter()
        prompt_ids = lm.prompt_ids(problem.question, chat=True)
        generation = generate(lm, prompt_ids, config.sampling(index))
        if not generation.token_ids:
            continue
        row = study_response(lm, prompt_ids, generation.token_ids, index=index, config=config)
        row.correct = gsm8k_correct(generation.text, problem.answer)
        row.seconds = round(time.perf_counter() - started, 4)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# -- pooling ------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _observed_vs_baseline(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Columns (observed numerator, denominator, baseline numerator, denominator) → the three figures."""
    observed = _ratio(sums[..., 0], sums[..., 1])
    baseline = _ratio(sums[..., 2], sums[..., 3])
    return {"observed": observed, "baseline": baseline, "lift": _ratio(observed, baseline) - 1.0}


def _trial_figures(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Columns (Σ Jaccard high, Σ Jaccard low, high diverges more, trials) → C's figures."""
    return {
        "jaccard_high": _ratio(sums[..., 0], sums[..., 3]),
        "jaccard_low": _ratio(sums[..., 1], sums[..., 3]),
        "share_high_diverges_more": _ratio(sums[..., 2], sums[..., 3]),
    }


def _follow_row(c: FollowCounts) -> list[float]:
    return [c.followed, c.fai_peaks, c.shuffled_followed, c.shuffled_fai_peaks]


def _trial_row(r: ResponseRhythm) -> list[float]:
    return [
        sum(t.jaccard_high for t in r.trials),
        sum(t.jaccard_low for t in r.trials),
        sum(t.jaccard_high < t.jaccard_low for t in r.trials),
        len(r.trials),
    ]


@dataclass
class RhythmReport:
    """The pooled study: A, B and C with their intervals, B's grid, and every response's counts."""

    n: int
    A: dict[str, Any]
    B: dict[str, Any]
    C: dict[str, Any]
    B_grid: list[dict[str, Any]]
    per_problem: list[ResponseRhythm]

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "A": self.A,
            "B": self.B,
            "C": self.C,
            "B_grid": self.B_grid,
            "per_problem": [r.to_json() for r in self.per_problem],
        }


Figures = Callable[[np.ndarray], dict[str, np.ndarray]]


def _with_ci(sums: list[list[float]], figures: Figures, config: RhythmConfig) -> dict[str, Any]:
    values, intervals = bootstrap_pooled(
        np.asarray(sums, dtype=np.float64).reshape(len(sums), 4), figures, config.seed, config.resamples
    )
    return {**values, "ci95": intervals}


def _grid(rows: Sequence[ResponseRhythm], config: RhythmConfig) -> list[dict[str, Any]]:
    out = []
    for i, (q, k) in enumerate((q, k) for q in config.grid_q_peak for k in config.grid_k):
        sums = np.asarray([_follow_row(r.B_grid[i]) for r in rows], dtype=np.float64).reshape(-1, 4)
        with np.errstate(divide="ignore", invalid="ignore"):
            figures = _observed_vs_baseline(sums.sum(0))
        out.append({"q_peak": q, "k": k, **{n: _finite(v) for n, v in figures.items()}})
    return out


def _finite(value: Any) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


def pool_rhythm(rows: Sequence[ResponseRhythm], config: RhythmConfig | None = None) -> RhythmReport:
    """Pool responses (ordered by index) into A, B and C: each a ratio of counts summed over problems,
    with a percentile interval from ``config.resamples`` bootstrap resamples of the problems."""
    config = config or RhythmConfig()
    rows = sorted(rows, key=lambda r: r.index)
    a = [[r.A.entropy_sum_at_peaks, r.A.waad_peaks, r.A.entropy_sum, r.A.tokens] for r in rows]
    c = _with_ci([_trial_row(r) for r in rows], _trial_figures, config)
    return RhythmReport(
        n=len(rows),
        A=_with_ci(a, _observed_vs_baseline, config),
        B=_with_ci([_follow_row(r.B) for r in rows], _observed_vs_baseline, config),
        C={**c, "trials": sum(len(r.trials) for r in rows)},
        B_grid=_grid(rows, config),
        per_problem=list(rows),
    )
