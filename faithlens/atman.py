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
from faithlens.params import ComputeOptions, Granularity
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


# ---------------------------------------------------------------- the batch plan, per device
#
# Exact AtMan runs one forward pass per suppression row, and every row leaves the positions before its
# first suppressed column untouched. How to cut the rows into batches depends on the device:
#
# * CPU: the work is FLOP-bound and one row of a few hundred tokens already keeps the cores busy. A
#   wider batch only amortises per-pass overhead, while every row of a batch restarts at the batch's
#   earliest column and so redoes positions its cached prefix already holds. Rows join a batch only while
#   that recomputation stays within ``CPU_RECOMPUTE_SLACK`` of the batch's span; the memory budget is a
#   fixed 512 MB (two cores, a shared host).
# * CUDA: one row of a few hundred tokens is far too small a matrix product to fill the GPU, and each pass
#   of an eager HF model costs milliseconds of launches whatever its size. So a batch holds as many rows
#   as a share of the *free* GPU memory allows, rows join it while the recomputation stays within
#   ``GPU_RECOMPUTE_SLACK``, and a batch of fewer than ``GPU_FILL_TOKENS`` tokens takes rows regardless
#   (the last, short spans would otherwise run as many small passes).
# * The cached prefix is reused on both. Reusing it copies 2·kv_dim values per position and layer, where
#   recomputing it costs 2·params_per_layer FLOPs per position: with the GQA shapes we serve that is
#   hundreds of FLOPs saved per byte copied, above the H200's ratio (~180 FLOP/byte), and it halves the
#   FLOPs of 512 suppressions over 520 tokens. Only a batch that starts at position 0 has no prefix.

CPU_RECOMPUTE_SLACK = 0.02
GPU_RECOMPUTE_SLACK = 0.125
GPU_FILL_TOKENS = 16384  # rows × tokens per pass below which a GEMM of these widths under-fills an H100/H200
GPU_FREE_MEMORY_SHARE = 0.5  # of the GPU's free memory, one batch may take (decode streams share it)
CPU_MEMORY_BUDGET_MB = 512
MAX_ROWS = 512


@dataclass(frozen=True)
class BatchPlan:
    """How exact AtMan cuts its suppression rows into forward passes on one device."""

    rows: int  # most rows one pass takes (memory)
    slack: float  # recomputed share of a batch's span that a row may add by joining it
    fill_tokens: int  # a batch below this many tokens takes rows regardless of slack
    prefix_reuse: bool


def row_bytes(model: torch.nn.Module, n: int, dtype: torch.dtype, targets: int = 0) -> int:
    """Memory one suppression row of ``n`` tokens needs during a pass: its KV cache over all layers, its
    float mask (and the mask plus bias), the attention scores of a math-kernel fallback, one layer's
    activations at a time (inference mode frees the others), and the float32 logits and log-probs of its
    ``targets`` target rows."""
    cfg = model.config
    size = torch.finfo(dtype).bits // 8
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * size
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    activations = (6 * cfg.hidden_size + 3 * inter) * size
    head = 2 * targets * cfg.vocab_size * 4
    return n * n * (2 * size + 4 * cfg.num_attention_heads) + n * (kv + activations) + head


def _free_memory_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def batch_plan(lm: LoadedModel, n: int, compute: ComputeOptions, targets: int = 0) -> BatchPlan:
    """The plan for ``lm``'s device; ``compute`` may fix the memory budget and slack (tests, benchmarks).
    Below float32 one row of each batch is the reference row (:func:`target_logprobs`)."""
    on_gpu = lm.device.type == "cuda"
    if compute.atman_memory_mb is not None:
        budget = compute.atman_memory_mb * 2**20
    elif on_gpu:
        budget = int(GPU_FREE_MEMORY_SHARE * _free_memory_bytes(lm.device))
    else:
        budget = CPU_MEMORY_BUDGET_MB * 2**20
    rows = max(1, min(MAX_ROWS, budget // row_bytes(unwrap(lm.model), n, lm.dtype, targets)))
    if lm.dtype != torch.float32:
        rows = max(1, rows - 1)
    slack = compute.recompute_slack
    if slack is None:
        slack = GPU_RECOMPUTE_SLACK if on_gpu else CPU_RECOMPUTE_SLACK
    fill = GPU_FILL_TOKENS if on_gpu and compute.recompute_slack is None else 0
    return BatchPlan(rows, slack, fill, compute.prefix_reuse)


def plan_batches(first: list[int], n: int, plan: BatchPlan) -> list[list[int]]:
    """Row indices (sorted by first suppressed column) cut into batches of at most ``plan.rows``. A row
    joins the open batch if its first column is within ``slack·(n − start)`` of the batch's start, or if
    the batch still holds fewer than ``fill_tokens`` tokens."""
    batches: list[list[int]] = []
    for g in sorted(range(len(first)), key=lambda g: first[g]):
        if batches:
            batch = batches[-1]
            start = first[batch[0]] if plan.prefix_reuse else 0
            fits = not plan.prefix_reuse or first[g] - start <= plan.slack * (n - start)
            underfilled = len(batch) * (n - start) < plan.fill_tokens
            if len(batch) < plan.rows and (fits or underfilled):
                batch.append(g)
                continue
        batches.append([g])
    return batches


# ---------------------------------------------------------------- batched target log-probs


def _slice_cache(cache: DynamicCache, length: int, batch: int) -> DynamicCache:
    data = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v, *_ in cache
    ]
    return DynamicCache(ddp_cache_data=data)


@dataclass
class _TargetHead:
    """Σ log p(target) from final hidden states, with the output projection in float32.

    In bf16 a logit of magnitude 4–8 is rounded to steps of 1/32, so a log-prob summed over a few
    targets carries ±0.03 of rounding that does not cancel between the unperturbed and a perturbed
    pass. Projecting only the target rows in float32 costs one (targets × vocab) product."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    ids: torch.Tensor
    target: list[int]

    @classmethod
    def of(cls, model: torch.nn.Module, ids: torch.Tensor, target: list[int]) -> _TargetHead:
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return cls(head.weight.float(), None if bias is None else bias.float(), ids, target)

    def logprob(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Per batch row; ``hidden`` covers positions ``start``.. ."""
        rows = torch.tensor([t - 1 - start for t in self.target], device=hidden.device)
        logits = torch.nn.functional.linear(hidden[:, rows].float(), self.weight, self.bias)
        tokens = self.ids[0, self.target].to(hidden.device)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.expand(hidden.shape[0], -1)[..., None])
        return logp[..., 0].sum(-1)


@torch.inference_mode()
def target_logprobs(
    lm: LoadedModel,
    input_ids: list[int],
    target: list[int],
    biases: torch.Tensor,
    compute: ComputeOptions | None = None,
) -> tuple[torch.Tensor, float]:
    """Σ log p(target) under each bias row, batched (:func:`batch_plan`); and the unperturbed value.

    A row leaves positions before its first non-zero column untouched, so each batch starts from the
    cached prefix before the earliest such column (exact, spec §7).

    Below float32 each batch also runs an all-zero row, and its rows are reported relative to it
    (``base + row − zero row``): a GEMM's rounding depends on its shape, so the unperturbed pass (one row,
    no cache) and a batch of 64 rows from a cached prefix differ by more than many of the scores."""
    compute = compute or ComputeOptions()
    model = unwrap(lm.model)
    ids = torch.tensor([input_ids], device=lm.device)
    n = ids.shape[1]
    plan = batch_plan(lm, n, compute, len(target))
    backbone = getattr(model, model.base_model_prefix)
    head = _TargetHead.of(model, ids, target)
    unperturbed = backbone(input_ids=ids, use_cache=plan.prefix_reuse)  # base log-prob and prefix cache
    cache = unperturbed.past_key_values if plan.prefix_reuse else None
    base = float(head.logprob(unperturbed.last_hidden_state, 0)[0])
    del unperturbed
    biases = biases.cpu()
    nonzero = biases != 0
    first = torch.where(nonzero.any(1), nonzero.float().argmax(1), torch.full((len(biases),), n)).tolist()
    first = [min(f, min(target) - 1) for f in first]  # no pass starts after the first target's input
    reference_row = lm.dtype != torch.float32
    out = torch.empty(len(biases), dtype=torch.float64)
    for batch in plan_batches(first, n, plan):
        start = min(first[g] for g in batch) if plan.prefix_reuse else 0
        rows = biases[batch]
        if reference_row:
            rows = torch.cat([rows, torch.zeros(1, n, dtype=rows.dtype)])
        past = _slice_cache(cache, start, len(rows)) if start > 0 else None
        hidden = backbone(
            input_ids=ids[:, start:].expand(len(rows), -1),
            past_key_values=past,
            use_cache=past is not None,
            faithlens_key_bias=rows.to(lm.device, lm.dtype),
        ).last_hidden_state
        values = head.logprob(hidden, start).double().cpu()
        out[batch] = values[:-1] - values[-1] + base if reference_row else values
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
        total = _TargetHead.of(model, ids, target).logprob(hidden, 0)[0]
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


MASK_LR_BUDGET = 0.2  # spec §8: lr = 0.2 / steps (1e-3 at the default 200 steps)


def mask_lr(steps: int) -> float:
    """The mask's learning rate for a fit of ``steps`` steps (spec §8's step budget). Adam moves each mask
    value about one lr per step, so with a fixed lr a short fit never leaves its initialisation."""
    return MASK_LR_BUDGET / steps


def atman_rl_saliency(
    lm: LoadedModel,
    input_ids: list[int],
    cot: list[int],
    answer: list[int],
    steps: int = 200,
    lr: float | None = None,
    betas: tuple[float, float] = (0.6, 0.9999),
    weight_decay: float = 0.05,
    init: float = -0.4,
    scale: float = 10.0,
    seed: int = 0,
) -> MaskSaliency:
    """Learn one additive mask value m_v ≤ 0 per CoT key that minimises the answer's teacher-forced NLL.

    s_v = 1 − m_v / init: how far token v had to be re-enabled to restore the answer, clamped to [0, 1].
    ``lr`` defaults to the step budget :func:`mask_lr` (0.2 / steps). Only the mask trains; the model's weights stay frozen. The prompt before the first CoT token is
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
    head = _TargetHead.of(model, ids, answer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mask = torch.full((len(cot),), init, device=lm.device, requires_grad=True)
    optimiser = torch.optim.AdamW(
        [mask], lr=mask_lr(steps) if lr is None else lr, betas=betas, weight_decay=weight_decay
    )

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
        return -head.logprob(hidden, start)[0] / len(answer)

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
    params = x.params
    groups = suppression_groups(x.texts, x.positions, params.granularity)
    rows = bias_rows(x.lm, x.input_ids, groups, params.factor, params.conceptual_threshold)
    perturbed, base = target_logprobs(x.lm, x.input_ids, x.target, rows, x.compute)
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
