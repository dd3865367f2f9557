"""What an analysis will cost, before any of it runs, in forward-token units.

One unit is one token through one forward pass at short context. On the embedded SmolLM2 on two CPU
cores a unit takes about 1.7 ms, so the default limit (``FAITHLENS_MAX_ANALYSIS_COST`` = 30,000 units)
keeps one analysis under about a minute (docs/benchmarks.md has the measurement). The estimate follows
the work each part really does (spec §1, §7, §8):

* the scoring pass: the sequence once, with attention's quadratic share (``n²/ATTENTION_TOKENS``);
* the saliency method's own work: each entry of :data:`faithlens.saliency.SALIENCY_METHODS` estimates
  it (exact AtMan: every suppression group from its first column on; ``atman_grad``: a forward and a
  backward pass; ``atman_rl``: ``rl_steps`` forward+backward passes over the response);
* the counterfactual check: one unperturbed pass and two suppressed ones from the response on;
* the rhythm study, when an audit asks for it (spec §11): its own scoring pass, then each perturbed prefix
  and its greedy continuation.
"""

from __future__ import annotations

from dataclasses import dataclass

from faithlens.params import SaliencyParams

ATTENTION_TOKENS = 8192  # at this context, attention costs as much as the rest of a forward pass
BACKWARD_FACTOR = 3.0  # a forward and a backward pass, in forward passes


def forward(tokens: int, context: int) -> float:
    """Cost of ``tokens`` new positions whose keys reach back to ``context`` positions."""
    return tokens * (1 + context / ATTENTION_TOKENS)


def scoring_cost(n: int) -> float:
    return forward(n, n)


def counterfactual_cost(n: int, prompt_len: int) -> float:
    """An unperturbed pass, then top-k and random-k suppressed from the response on."""
    return forward(n, n) + 2 * forward(n - prompt_len, n)


def saliency_cost(texts: list[str], prompt_len: int, params: SaliencyParams) -> float:
    """Cost of saliency by ``params.method`` on a sequence whose tokens read ``texts``, with the
    counterfactual check that follows it."""
    from faithlens.saliency import method_cost

    return method_cost(texts, prompt_len, params) + counterfactual_cost(len(texts), prompt_len)


def rhythm_cost(n: int) -> float:
    """The rhythm study on one n-token sequence (:func:`faithlens.study.study_response`): a scoring pass,
    then 2 × len(ranks) perturbed prefixes, each prefilled once and continued for at most
    ``max_continuation`` tokens."""
    from faithlens.study.rhythm import RhythmConfig

    config = RhythmConfig()
    trials = 2 * len(config.ranks)
    tail = config.max_continuation
    return scoring_cost(n) + trials * (forward(n, n) + forward(tail, n + tail))


def analysis_cost(
    texts: list[str], prompt_len: int, saliency: SaliencyParams | None, rhythm: bool = False
) -> float:
    """The whole analysis of one sequence: the scoring pass plus saliency, if asked for, and the rhythm
    study, if asked for."""
    cost = scoring_cost(len(texts))
    if saliency is not None:
        cost += saliency_cost(texts, prompt_len, saliency)
    if rhythm:
        cost += rhythm_cost(len(texts))
    return cost


@dataclass
class Alternative:
    """A cheaper way to ask, with its estimate."""

    change: str
    cost: float


def _variants(saliency: SaliencyParams) -> list[tuple[str, SaliencyParams]]:
    """Cheaper variants: coarser groups and fewer steps where the method reads those options, then
    every other registered method."""
    from faithlens.saliency import SALIENCY_METHODS

    method = SALIENCY_METHODS.get(saliency.method)
    options: list[tuple[str, SaliencyParams]] = []
    if "granularity" in method.options:
        for granularity in ("word", "sentence"):
            if granularity != saliency.granularity:
                variant = saliency.model_copy(update={"granularity": granularity})
                options.append((f"granularity '{granularity}'", variant))
    if "rl_steps" in method.options and saliency.rl_steps > 1:
        variant = saliency.model_copy(update={"rl_steps": max(1, saliency.rl_steps // 4)})
        options.append(("fewer rl_steps", variant))
    for other in SALIENCY_METHODS:
        if other.name != saliency.method:
            options.append((f"method '{other.name}'", saliency.model_copy(update={"method": other.name})))
    return options


def alternatives(
    texts: list[str], prompt_len: int, saliency: SaliencyParams | None, limit: float
) -> list[Alternative]:
    """Changes to the saliency options that would fit ``limit``, cheapest first."""
    if saliency is None:
        return []
    found = [Alternative(change, analysis_cost(texts, prompt_len, p)) for change, p in _variants(saliency)]
    return sorted((a for a in found if a.cost <= limit), key=lambda a: a.cost)
