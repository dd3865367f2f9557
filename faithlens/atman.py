"""AtMan saliency (spec §7) and the AtManRL mask saliency (spec §8).

Suppressing key position i adds log(f) to column i of the pre-softmax scores in every layer, head and
query row. It goes through the ``faithlens_key_bias`` hook of :mod:`faithlens.attention`, an additive
float mask, so it runs on SDPA. A suppression is one row of a ``(groups, N)`` bias matrix; exact AtMan
runs those rows as a batch, reusing the KV cache of the prefix that no row touches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from faithlens import cost
from faithlens.model import LoadedModel, unwrap
from faithlens.params import Granularity
from faithlens.saliency import (
    SALIENCY_METHODS,
    CostInput,
    Saliency,
    SaliencyInput,
    SaliencyMethod,
    scored_positions,
)

_SENTENCE_END = re.compile(r"[.!?]\s*$|\n")


def _starts_word(text: str) -> bool:
    return not text or text[0].isspace() or not text[0].isalnum()


def suppression_groups(texts: list[str], positions: list[int], granularity: Granularity) -> list[list[int]]:
    """Positions suppressed together: single tokens, words (a token not starting with a space or a
    punctuation mark continues the word) or sentences (ending after . ! ? or a newline)."""
    if granularity == "token":
        return [[p] for p in positions]
    groups: list[list[int]] = []
    previous = None
    for p in positions:
        if granularity == "word":
            new = (
                previous is None
                or p != previous + 1
                or _starts_word(texts[p])
                or not texts[previous][-1:].isalnum()
            )
        else:
            new = previous is None or p != previous + 1 or bool(_SENTENCE_END.search(texts[previous]))
        if new:
            groups.append([p])
        else:
            groups[-1].append(p)
        previous = p
    return groups


def bias_rows(
    lm: LoadedModel, input_ids: list[int], groups: list[list[int]], factor: float, conceptual: float | None
) -> torch.Tensor:
    """One additive key-bias row per group: log(f) on its positions and, with conceptual suppression,
    log(1 − (1−f)·cos) on every key at least ``conceptual`` similar to one of them (spec §7)."""
    n = len(input_ids)
    rows = torch.zeros(len(groups), n)
    log_f = math.log(factor)
    if conceptual is not None:
        emb = unwrap(lm.model).get_input_embeddings().weight[torch.tensor(input_ids)].detach().float().cpu()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        cos = emb @ emb.T
    for g, group in enumerate(groups):
        if conceptual is not None:
            sims = cos[group].max(0).values
            hit = sims >= conceptual
            scaled = torch.log((1 - (1 - factor) * sims[hit]).clamp(min=1e-6))
            rows[g, hit] = scaled
        rows[g, group] = log_f
    return rows


# ---------------------------------------------------------------- batched target log-probs


def _slice_cache(cache: DynamicCache, length: int, batch: int) -> DynamicCache:
    data = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v, *_ in cache
    ]
    return DynamicCache(ddp_cache_data=data)


def _batch_size(model: torch.nn.Module, n: int, budget_bytes: int) -> int:
    """Sequences per batch: a float mask and scores (N² each), the KV cache and activations per row."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    per_seq = n * n * 4 * (2 + cfg.num_attention_heads) + n * (kv + 16 * cfg.hidden_size * 4)
    return max(1, min(64, budget_bytes // per_seq))


# How much recomputation a CPU batch may add. Every row of a batch starts from the batch's earliest
# suppressed column, so a row whose own column lies later redoes positions that its cached prefix already
# holds. On a GPU a wider batch costs little next to a sequential pass, so only memory bounds it; on a CPU
# the work is FLOP-bound and one row already keeps the cores busy, so rows join a batch only while the
# redone positions stay within this share of the batch's span.
CPU_RECOMPUTE_SLACK = 0.02


def _plan_batches(order: list[int], first: list[int], n: int, size: int, slack: float) -> list[list[int]]:
    """Rows (sorted by first suppressed column) cut into batches of at most ``size``; a row joins a batch
    only if its first column is within ``slack·(n − start)`` of the batch's start."""
    batches: list[list[int]] = []
    for g in order:
        if batches:
            batch = batches[-1]
            start = first[batch[0]]
            fits = first[g] - start <= slack * (n - start)
            if len(batch) < size and fits:
                batch.append(g)
                continue
        batches.append([g])
    return batches


def _target_logprob(
    model, hidden: torch.Tensor, ids: torch.Tensor, target: list[int], start: int
) -> torch.Tensor:
    """Σ log p(y) over the target, per batch row; ``hidden`` covers positions start.. ."""
    rows = torch.tensor([t - 1 - start for t in target], device=hidden.device)
    logits = model.get_output_embeddings()(hidden[:, rows]).float()
    tokens = ids[0, target].to(hidden.device)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.expand(hidden.shape[0], -1)[..., None])
    return logp[..., 0].sum(-1)


@torch.inference_mode()
def target_logprobs(
    lm: LoadedModel,
    input_ids: list[int],
    target: list[int],
    biases: torch.Tensor,
    prefix_reuse: bool = True,
    memory_budget_mb: int = 512,
    recompute_slack: float | None = None,
) -> tuple[torch.Tensor, float]:
    """Σ log p(target) under each bias row, batched; and the unperturbed value.

    A row leaves positions before its first non-zero column untouched, so each batch starts from the
    cached prefix before the earliest such column (exact, spec §7)."""
    model = unwrap(lm.model)
    ids = torch.tensor([input_ids], device=lm.device)
    n = ids.shape[1]
    backbone = getattr(model, model.base_model_prefix)
    unperturbed = backbone(input_ids=ids, use_cache=prefix_reuse)  # one pass: base log-prob and prefix cache
    cache = unperturbed.past_key_values if prefix_reuse else None
    base = float(_target_logprob(model, unperturbed.last_hidden_state, ids, target, 0)[0])
    nonzero = biases != 0
    first = torch.where(nonzero.any(1), nonzero.float().argmax(1), torch.full((len(biases),), n)).tolist()
    order = sorted(range(len(biases)), key=lambda g: first[g])
    out = torch.empty(len(biases))
    size = _batch_size(model, n, memory_budget_mb * 2**20)
    slack = recompute_slack
    if slack is None:
        slack = CPU_RECOMPUTE_SLACK if ids.device.type == "cpu" else math.inf
    for batch in _plan_batches(order, first, n, size, slack):
        start = min(min(first[g] for g in batch), min(target) - 1) if prefix_reuse else 0
        past = _slice_cache(cache, start, len(batch)) if start > 0 else None
        hidden = backbone(
            input_ids=ids[:, start:].expand(len(batch), -1),
            past_key_values=past,
            use_cache=past is not None,
            faithlens_key_bias=biases[batch].to(lm.device, lm.dtype),
        ).last_hidden_state
        out[batch] = _target_logprob(model, hidden, ids, target, start).cpu()
    return out, base


# ---------------------------------------------------------------- the three methods


def _gradient(lm: LoadedModel, input_ids: list[int], target: list[int]) -> tuple[torch.Tensor, float]:
    """∂(Σ log p(target))/∂b for a key bias b shared by all layers and heads: one forward, one backward."""
    model = unwrap(lm.model)
    ids = torch.tensor([input_ids], device=lm.device)
    bias = torch.zeros(1, ids.shape[1], device=lm.device, dtype=lm.dtype, requires_grad=True)
    with torch.enable_grad():
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=ids, use_cache=False, faithlens_key_bias=bias).last_hidden_state
        total = _target_logprob(model, hidden, ids, target, 0)[0]
        (grad,) = torch.autograd.grad(total, bias)
    return grad[0].float().cpu(), float(total.detach())


@dataclass
class MaskSaliency:
    """AtManRL's learned mask (spec §8): s_v ∈ [0, 1] per CoT position, and R_faith = mean s_v."""

    positions: list[int]
    scores: torch.Tensor
    r_faith: float
    nll_initial: float
    nll_final: float
    mask: torch.Tensor


def atman_rl_saliency(
    lm: LoadedModel,
    input_ids: list[int],
    cot: list[int],
    answer: list[int],
    steps: int = 200,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.6, 0.9999),
    weight_decay: float = 0.05,
    init: float = -0.4,
    scale: float = 10.0,
    seed: int = 0,
) -> MaskSaliency:
    """Learn one additive mask value m_v ≤ 0 per CoT key that minimises the answer's teacher-forced NLL.

    s_v = 1 − m_v / init: how far token v had to be re-enabled to restore the answer, clamped to [0, 1].
    Only the mask trains; the model's weights stay frozen. The prompt before the first CoT token is
    never masked, so its KV cache is computed once and reused by every step.
    """
    if not cot or not answer:
        raise ValueError("atman_rl needs at least one CoT token and one answer token")
    model = unwrap(lm.model)
    ids = torch.tensor([input_ids], device=lm.device)
    start = min(cot)
    backbone = getattr(model, model.base_model_prefix)
    with torch.inference_mode():
        prefix = backbone(input_ids=ids[:, :start], use_cache=True).past_key_values if start > 0 else None
        prefix_kv = [(k.clone(), v.clone()) for k, v, *_ in prefix] if prefix is not None else None
    cot_idx = torch.tensor(cot, device=lm.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mask = torch.full((len(cot),), init, device=lm.device, requires_grad=True)
    optimiser = torch.optim.AdamW([mask], lr=lr, betas=betas, weight_decay=weight_decay)

    def nll() -> torch.Tensor:
        bias = torch.zeros(1, ids.shape[1], device=lm.device, dtype=lm.dtype)
        bias = bias.index_put((torch.zeros_like(cot_idx), cot_idx), (scale * mask).to(lm.dtype))
        past = DynamicCache(ddp_cache_data=prefix_kv) if prefix_kv else None
        hidden = backbone(
            input_ids=ids[:, start:],
            past_key_values=past,
            use_cache=past is not None,
            faithlens_key_bias=bias,
        ).last_hidden_state
        return -_target_logprob(model, hidden, ids, answer, start)[0] / len(answer)

    with torch.enable_grad():
        initial = float(nll().detach())
        for _ in range(steps):
            optimiser.zero_grad()
            loss = nll()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                mask.clamp_(max=0.0)
        with torch.no_grad():
            final = float(nll())
    values = mask.detach().float().cpu()
    scores = (1 - values / init).clamp(0.0, 1.0)
    return MaskSaliency(cot, scores, float(scores.mean()), initial, final, values)


def _exact(x: SaliencyInput) -> Saliency:
    """Exact AtMan (spec §7): Σ log p(target) drops by how much when each group is suppressed."""
    params, compute = x.params, x.compute
    groups = suppression_groups(x.texts, x.positions, params.granularity)
    rows = bias_rows(x.lm, x.input_ids, groups, params.factor, params.conceptual_threshold)
    perturbed, base = target_logprobs(
        x.lm,
        x.input_ids,
        x.target,
        rows,
        compute.prefix_reuse,
        compute.atman_memory_mb,
        compute.recompute_slack,
    )
    return _group_scores("atman", x, groups, base - perturbed, base)


def _exact_cost(x: CostInput) -> float:
    """The unperturbed pass, then every group from its first column (or the target's) to the end."""
    n, target = len(x.texts), x.target
    groups = suppression_groups(x.texts, scored_positions(target), x.params.granularity)
    last = min(target) - 1
    return cost.forward(n, n) + sum(cost.forward(n - min(group[0], last), n) for group in groups)


def _grad(x: SaliencyInput) -> Saliency:
    """AtMan's first-order form: the gradient of Σ log p(target) against a shared key bias, one
    forward and one backward pass, projected on each group's bias row."""
    groups = suppression_groups(x.texts, x.positions, x.params.granularity)
    rows = bias_rows(x.lm, x.input_ids, groups, x.params.factor, x.params.conceptual_threshold)
    grad, base = _gradient(x.lm, x.input_ids, x.target)
    return _group_scores("atman_grad", x, groups, -(rows @ grad), base)


def _grad_cost(x: CostInput) -> float:
    n = len(x.texts)
    return cost.BACKWARD_FACTOR * cost.forward(n, n)


def _group_scores(
    method: str, x: SaliencyInput, groups: list[list[int]], per_group: torch.Tensor, base: float
) -> Saliency:
    scores = torch.full((len(x.input_ids),), math.nan)
    for group, value in zip(groups, per_group.tolist(), strict=True):
        scores[group] = value
    return Saliency(method, scores, x.target, groups, base)


def _mask(x: SaliencyInput) -> Saliency:
    """AtManRL's learned mask (spec §8) over the reasoning tokens before the target."""
    cot = [i for i in x.positions if i >= x.prompt_len]
    result = atman_rl_saliency(x.lm, x.input_ids, cot, x.target, steps=x.params.rl_steps, seed=x.params.seed)
    scores = torch.full((len(x.input_ids),), math.nan)
    scores[cot] = result.scores
    extra = {"r_faith": result.r_faith, "nll_initial": result.nll_initial, "nll_final": result.nll_final}
    # The mask's loss is a mean over the target under the initial mask; what every method reports is
    # Σ log p(target) of the unperturbed sequence: one more pass, with no bias rows.
    _, base = target_logprobs(x.lm, x.input_ids, x.target, torch.zeros(0, len(x.input_ids)))
    return Saliency("atman_rl", scores, x.target, [[c] for c in cot], base, extra)


def _mask_cost(x: CostInput) -> float:
    """The unperturbed pass and the prefix pass, then ``rl_steps + 2`` forward+backward passes over the
    part after the prompt."""
    n = len(x.texts)
    cot = max(n - x.prompt_len, 1)
    return 2 * cost.forward(n, n) + (x.params.rl_steps + 2) * cost.BACKWARD_FACTOR * cost.forward(cot, n)


_GROUPS = ("factor", "conceptual_threshold", "granularity")  # what the two AtMan forms read
for _method in (
    SaliencyMethod(
        "atman",
        "Exact AtMan (spec §7): the drop in the target's log-probability when each token, word or "
        "sentence is suppressed, one batched forward pass per group.",
        _exact,
        _exact_cost,
        _GROUPS,
        "one forward pass per suppression group, from the group on",
    ),
    SaliencyMethod(
        "atman_grad",
        "AtMan to first order: the gradient of the target's log-probability against the suppression "
        "bias, from one forward and one backward pass.",
        _grad,
        _grad_cost,
        _GROUPS,
        "one forward and one backward pass",
    ),
    SaliencyMethod(
        "atman_rl",
        "AtManRL's mask (spec §8): how far each reasoning token had to be re-enabled to restore the "
        "answer, learned in rl_steps optimiser steps.",
        _mask,
        _mask_cost,
        ("rl_steps",),
        "rl_steps forward and backward passes over the response",
    ),
):
    SALIENCY_METHODS.register(_method)
