"""What an analysis will cost, before any of it runs, in forward-token units.

One unit is one token through one forward pass at short context. On the embedded SmolLM2 on two CPU
cores a unit takes about 1.7 ms, so the default limit (``FAITHLENS_MAX_ANALYSIS_COST`` = 30,000 units)
keeps one analysis under about a minute (docs/benchmarks.md has the measurement). The estimate follows
the work each method really does (spec §1, §7, §8):

* the scoring pass: the sequence once, with attention's quadratic share (``n²/ATTENTION_TOKENS``);
* exact AtMan: the unperturbed pass, then every suppression group from its first column to the end
  (the prefix before it comes from the KV cache);
* ``atman_grad``: one forward and one backward (about three forwards);
* ``atman_rl``: ``rl_steps`` forward+backward passes over the part after the prompt;
* the counterfactual check: one unperturbed pass and two suppressed ones from the response on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from faithlens.atman import SaliencyParams, resolve_target, suppression_groups

ATTENTION_TOKENS = 8192  # at this context, attention costs as much as the rest of a forward pass
BACKWARD_FACTOR = 3.0  # a forward and a backward pass, in forward passes


def _pass(tokens: int, context: int) -> float:
    """Cost of ``tokens`` new positions whose keys reach back to ``context`` positions."""
    return tokens * (1 + context / ATTENTION_TOKENS)


def scoring_cost(n: int) -> float:
    return _pass(n, n)


def saliency_cost(texts: list[str], prompt_len: int, params: SaliencyParams) -> float:
    """Cost of ``params.method`` on a sequence whose tokens read ``texts`` (the target is resolved as
    the method will resolve it, so the estimate counts the same groups the method suppresses)."""
    n = len(texts)
    target = resolve_target(texts, prompt_len, params.target)
    # the counterfactual check: an unperturbed pass, then top-k and random-k suppressed from the response on
    counterfactual = _pass(n, n) + 2 * _pass(n - prompt_len, n)
    if params.method == "atman_grad":
        return BACKWARD_FACTOR * _pass(n, n) + counterfactual
    if params.method == "atman_rl":
        cot = max(n - prompt_len, 1)
        return _pass(n, n) + (params.rl_steps + 2) * BACKWARD_FACTOR * _pass(cot, n) + counterfactual
    tset = set(target)
    positions = [i for i in range(max(target)) if i not in tset]
    groups = suppression_groups(texts, positions, params.granularity)
    last = min(target) - 1
    starts = [min(group[0], last) if params.prefix_reuse else 0 for group in groups]
    return _pass(n, n) + sum(_pass(n - s, n) for s in starts) + counterfactual


def analysis_cost(texts: list[str], prompt_len: int, saliency: SaliencyParams | None) -> float:
    """The whole analysis of one sequence: the scoring pass plus saliency, if asked for."""
    cost = scoring_cost(len(texts))
    if saliency is not None:
        cost += saliency_cost(texts, prompt_len, saliency)
    return cost


@dataclass
class Alternative:
    """A cheaper way to ask, with its estimate."""

    change: str
    cost: float


def alternatives(
    texts: list[str], prompt_len: int, saliency: SaliencyParams | None, limit: float
) -> list[Alternative]:
    """Changes to the saliency options that would fit ``limit``, cheapest change first."""
    if saliency is None:
        return []
    options: list[tuple[str, SaliencyParams]] = []
    if saliency.method == "atman":
        for granularity in ("word", "sentence"):
            if granularity != saliency.granularity:
                options.append(
                    (f"granularity '{granularity}'", dataclasses.replace(saliency, granularity=granularity))
                )
    if saliency.method == "atman_rl" and saliency.rl_steps > 1:
        options.append(
            ("fewer rl_steps", dataclasses.replace(saliency, rl_steps=max(1, saliency.rl_steps // 4)))
        )
    if saliency.method != "atman_grad":
        options.append(("method 'atman_grad'", dataclasses.replace(saliency, method="atman_grad")))
    found = [Alternative(change, analysis_cost(texts, prompt_len, p)) for change, p in options]
    return [a for a in found if a.cost <= limit]
