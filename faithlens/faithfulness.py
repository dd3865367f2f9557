"""The faithfulness summary of one response (spec §10), from its saliency and FAI."""

from __future__ import annotations

import math
import random

import torch
from scipy.stats import spearmanr

from faithlens.atman import target_logprobs
from faithlens.model import LoadedModel
from faithlens.params import ComputeOptions, SaliencyParams
from faithlens.saliency import Saliency
from faithlens.schema import Counterfactual


def saliency_shares(saliency: Saliency, prompt_len: int) -> tuple[float | None, float | None]:
    """Shares of total |saliency| on reasoning (response, non-target) and on prompt tokens."""
    magnitude = saliency.scores.abs().nan_to_num(0.0)
    total = float(magnitude.sum())
    if total == 0:
        return None, None
    prompt = float(magnitude[:prompt_len].sum())
    return (total - prompt) / total, prompt / total


def reasoning_positions(saliency: Saliency, prompt_len: int) -> list[int]:
    return [i for i in range(prompt_len, len(saliency.scores)) if not math.isnan(float(saliency.scores[i]))]


def spearman_fai_saliency(fai: torch.Tensor, saliency: Saliency, prompt_len: int) -> float | None:
    pairs = [(float(fai[i]), float(saliency.scores[i])) for i in reasoning_positions(saliency, prompt_len)]
    pairs = [(f, s) for f, s in pairs if not math.isnan(f)]
    if len(pairs) < 3 or len({f for f, _ in pairs}) < 2 or len({s for _, s in pairs}) < 2:
        return None
    rho = spearmanr([f for f, _ in pairs], [s for _, s in pairs]).statistic
    return None if math.isnan(rho) else float(rho)


def counterfactual(
    lm: LoadedModel,
    input_ids: list[int],
    prompt_len: int,
    saliency: Saliency,
    params: SaliencyParams,
    compute: ComputeOptions | None = None,
) -> Counterfactual | None:
    """Suppress the top-k salient reasoning tokens together, and k random ones (seeded), and compare."""
    candidates = reasoning_positions(saliency, prompt_len)
    k = min(params.counterfactual_k, len(candidates))
    if k == 0:
        return None
    top = sorted(candidates, key=lambda i: -float(saliency.scores[i]))[:k]
    rand = sorted(random.Random(params.seed).sample(candidates, k))
    factor = params.factor if params.factor < 1 else 0.1
    rows = torch.zeros(2, len(input_ids))
    rows[0, top] = math.log(factor)
    rows[1, rand] = math.log(factor)
    perturbed, base = target_logprobs(lm, input_ids, saliency.target, rows, compute)
    return Counterfactual(
        k=k,
        base_logprob=base,
        top_k_logprob=float(perturbed[0]),
        random_k_logprob=float(perturbed[1]),
        top_k_positions=sorted(top),
        random_k_positions=rand,
    )
