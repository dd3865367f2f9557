"""Annotating a response: one streaming scoring pass, then the spec's metrics and flags.

:func:`compute_metrics` is the engine room: a probe (:func:`new_probe`) rides on one forward pass and
:func:`metrics_from_probe` turns what it saw into metrics and flags (the trainer uses these two on its own
forward pass); :func:`analyze` turns the result into the public :class:`~faithlens.schema.Analysis`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import torch

from faithlens.answer import char_span_to_tokens, find_answer_span
from faithlens.attention import AttentionProbe
from faithlens.faithfulness import counterfactual, saliency_shares, spearman_fai_saliency
from faithlens.metrics import (
    Flags,
    HeadSplit,
    compute_flags,
    fai_counts,
    fai_from_sums,
    group_mean,
    split_heads,
)
from faithlens.model import LoadedModel, unwrap
from faithlens.params import AnalysisParams, ComputeOptions, SaliencyParams
from faithlens.saliency import Saliency, compute_saliency
from faithlens.schema import Analysis, AnswerSpan, HeadGroups, Summary, TokenAnnotation
from faithlens.slicing import checkpoint

HeadList = list[tuple[int, int]]
FixedHeads = tuple[HeadList, HeadList]  # a fixed (local, global) split instead of the per-sequence one


@dataclass
class ProbeMetrics:
    """What one probe's vectors yield (spec §2–5): the head split, WAAD, FAI and the flags."""

    heads: HeadList  # every (layer, head) considered, in probe order
    split: HeadSplit
    head_distance: torch.Tensor  # mean backward distance d per head
    waad: torch.Tensor  # response-relative
    fai: torch.Tensor  # every position, NaN where undefined
    flags: Flags


@dataclass
class SequenceMetrics(ProbeMetrics):
    """Everything one scoring pass yields, in tensors, before it is dressed as a schema."""

    input_ids: list[int]
    prompt_len: int
    layers: list[int]
    logprobs: torch.Tensor | None  # response-relative; NaN for a first token with no context
    timings: dict[str, float] = field(default_factory=dict)
    next_token: NextTokenStats | None = None  # with logprobs: entropies and (if asked) top-k ids too


@dataclass
class NextTokenStats:
    """What the model's next-token distributions say about the response tokens (response-relative rows;
    NaN, or -1 ids, for a first token with no context)."""

    logprobs: torch.Tensor  # log p(x_t | x_<t)
    entropy: torch.Tensor  # −Σ_v p_v log p_v of the distribution that produced x_t, in nats (spec §11)
    top_ids: torch.Tensor | None  # (rows, top_k) the most likely tokens there, most likely first


def _next_token_stats(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_len: int,
    top_k: int = 0,
    chunk: int = 64,
) -> NextTokenStats:
    """Log-probs, entropies and top-k ids at the response positions, with the LM head applied in chunks
    (no N×V logits)."""
    head = model.get_output_embeddings()
    n = input_ids.shape[-1]
    rows = n - prompt_len
    logprobs = torch.full((rows,), float("nan"), dtype=torch.float32)
    entropy = torch.full((rows,), float("nan"), dtype=torch.float32)
    top_ids = torch.full((rows, top_k), -1, dtype=torch.long) if top_k else None
    first = max(prompt_len, 1)
    for t0 in range(first, n, chunk):
        checkpoint()  # one chunk of the LM head is one unit of work (faithlens.slicing)
        t1 = min(n, t0 + chunk)
        logp = torch.log_softmax(head(hidden[0, t0 - 1 : t1 - 1]).float(), dim=-1)
        rel = slice(t0 - prompt_len, t1 - prompt_len)
        logprobs[rel] = logp.gather(-1, input_ids[0, t0:t1, None])[:, 0].cpu()
        entropy[rel] = -(logp.exp() * logp).sum(-1).cpu()
        if top_ids is not None:
            top_ids[rel] = logp.topk(top_k, dim=-1).indices.cpu()
    return NextTokenStats(logprobs, entropy, top_ids)


def _collect_heads(probe: AttentionProbe, layers: list[int], n: int, prompt_len: int):
    heads: HeadList = []
    distance, waad, fai_sum = [], [], []
    n_rows = max(n - prompt_len, 1)
    for layer in layers:
        for h in range(probe.distance[layer].shape[0]):
            heads.append((layer, h))
        distance.append(probe.distance[layer] / n_rows)
        waad.append(probe.waad[layer])
        fai_sum.append(probe.fai_sum[layer])
    return heads, torch.cat(distance).cpu(), torch.cat(waad).cpu(), torch.cat(fai_sum).cpu()


def _resolve_split(
    params: AnalysisParams, heads: HeadList, distance: torch.Tensor, fixed: FixedHeads | None
) -> HeadSplit:
    if fixed is None:
        return split_heads(distance, params.head_fraction)
    position = {pair: i for i, pair in enumerate(heads)}
    try:
        return HeadSplit(
            local=[position[tuple(p)] for p in fixed[0]],
            global_=[position[tuple(p)] for p in fixed[1]],
        )
    except KeyError as exc:
        raise ValueError(f"head {exc.args[0]} is not in the model") from exc


def new_probe(
    lm: LoadedModel | torch.nn.Module,
    prompt_len: int,
    params: AnalysisParams,
    heads: FixedHeads | None = None,
    compute: ComputeOptions | None = None,
) -> AttentionProbe:
    """A probe for one sequence whose response starts at ``prompt_len`` (spec §1–4 parameters); with
    fixed ``heads``, only their layers are probed. ``lm`` may be a bare (or peft-wrapped) model: a TRL
    trainer holds no :class:`LoadedModel`."""
    model = unwrap(lm.model if isinstance(lm, LoadedModel) else lm)
    compute = compute or ComputeOptions()
    layers = (
        sorted({layer for group in heads for layer, _ in group})
        if heads is not None
        else params.resolved_layers(model.config.num_hidden_layers)
    )
    return AttentionProbe(
        layers=layers,
        response_start=prompt_len,
        window=params.W,
        h_lo=params.H_lo,
        h_hi=params.H_hi,
        memory_budget_bytes=compute.probe_memory_mb * 2**20,
    )


def metrics_from_probe(
    probe: AttentionProbe, n: int, params: AnalysisParams, fixed: FixedHeads | None = None
) -> ProbeMetrics:
    """Turn a probe that has seen one n-token sequence into the spec's metrics and flags (with a
    ``fixed`` (local, global) head split instead of the per-sequence one, if given)."""
    prompt_len = probe.response_start
    heads, distance, waad_heads, fai_heads = _collect_heads(probe, probe.layers, n, prompt_len)
    split = _resolve_split(params, heads, distance, fixed)
    waad = group_mean(waad_heads, split.local)
    fai = fai_from_sums(
        group_mean(fai_heads, split.global_), fai_counts(n, prompt_len, params.H_lo, params.H_hi)
    )
    flags = compute_flags(waad, fai[prompt_len:], params.q, params.k, params.tau_waad, params.tau_delta)
    return ProbeMetrics(heads, split, distance, waad, fai, flags)


@torch.inference_mode()
def compute_metrics(
    lm: LoadedModel,
    input_ids: list[int],
    prompt_len: int,
    params: AnalysisParams | None = None,
    with_logprobs: bool = True,
    heads: FixedHeads | None = None,
    compute: ComputeOptions | None = None,
    top_k: int = 0,
) -> SequenceMetrics:
    """One scoring forward pass over prompt+response, streaming per-head metrics (spec §1–5); with
    ``with_logprobs``, the response tokens' log-probs and entropies, and their ``top_k`` likeliest
    alternatives from the same pass."""
    params = params or AnalysisParams()
    if not 0 <= prompt_len < len(input_ids):
        raise ValueError("the response must have at least one token")
    model = unwrap(lm.model)
    probe = new_probe(lm, prompt_len, params, heads, compute)
    ids = torch.tensor([input_ids], device=lm.device)
    started = time.perf_counter()
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids, use_cache=False, faithlens_probe=probe).last_hidden_state
    stats = _next_token_stats(model, hidden, ids, prompt_len, top_k) if with_logprobs else None
    scored = time.perf_counter()
    found = metrics_from_probe(probe, len(input_ids), params, heads)
    return SequenceMetrics(
        **{f.name: getattr(found, f.name) for f in fields(found)},
        input_ids=list(input_ids),
        prompt_len=prompt_len,
        layers=probe.layers,
        logprobs=stats.logprobs if stats else None,
        timings={"scoring": scored - started, "metrics": time.perf_counter() - scored},
        next_token=stats,
    )


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _answer_span(texts: list[str], prompt_len: int) -> AnswerSpan | None:
    span = find_answer_span("".join(texts))
    tokens = char_span_to_tokens(texts, span) if span else None
    if span is None or tokens is None:
        return None
    return AnswerSpan(start=prompt_len + tokens[0], end=prompt_len + tokens[1], text=span.text)


def _saliency_summary(
    lm: LoadedModel,
    metrics: SequenceMetrics,
    sal: Saliency,
    params: SaliencyParams,
    compute: ComputeOptions | None,
) -> dict:
    reasoning_share, prompt_share = saliency_shares(sal, metrics.prompt_len)
    return {
        "saliency_method": sal.method,
        "saliency_target": sal.target,
        "target_logprob": sal.base_logprob,
        "reasoning_saliency_share": reasoning_share,
        "prompt_saliency_share": prompt_share,
        "spearman_fai_saliency": spearman_fai_saliency(metrics.fai, sal, metrics.prompt_len),
        "counterfactual": counterfactual(lm, metrics.input_ids, metrics.prompt_len, sal, params, compute),
        "r_faith": sal.extra.get("r_faith"),
    }


def to_schema(
    lm: LoadedModel,
    metrics: SequenceMetrics,
    params: AnalysisParams,
    adapter: str | None,
    saliency: tuple[Saliency, SaliencyParams] | None = None,
    compute: ComputeOptions | None = None,
) -> Analysis:
    """Dress :class:`SequenceMetrics` (and saliency, if computed) as the public annotation schema."""
    p = metrics.prompt_len
    scores = [_finite(float(x)) for x in saliency[0].scores] if saliency else [None] * len(metrics.input_ids)
    texts = lm.token_texts(metrics.input_ids)
    flags = metrics.flags
    logprobs = metrics.logprobs.tolist() if metrics.logprobs is not None else None
    tokens = [
        TokenAnnotation(
            index=p + i,
            id=metrics.input_ids[p + i],
            text=texts[p + i],
            logprob=_finite(logprobs[i]) if logprobs else None,
            fai=_finite(float(metrics.fai[p + i])),
            waad=float(metrics.waad[i]),
            preplan=flags.preplan[i],
            anchor=flags.anchor[i],
            dominated_anchor=flags.dominated_anchor[i],
            intro=flags.intro[i],
            saliency=scores[p + i],
        )
        for i in range(len(metrics.input_ids) - p)
    ]
    summary = Summary(
        num_prompt_tokens=p,
        num_response_tokens=len(tokens),
        num_anchors=sum(flags.anchor),
        num_preplan=sum(flags.preplan),
        num_dominated_anchors=sum(flags.dominated_anchor),
        num_coupled_pairs=len(flags.coupled_pairs),
        coupled_pairs=[(p + u, p + t) for u, t in flags.coupled_pairs],
        mean_fai=_mean([t.fai for t in tokens]),
        mean_waad=_mean([t.waad for t in tokens]),
        tau_waad=flags.tau_waad,
        tau_delta=flags.tau_delta,
        **(_saliency_summary(lm, metrics, *saliency, compute) if saliency else {}),
    )
    return Analysis(
        model=lm.name,
        adapter=adapter,
        prompt_token_ids=metrics.input_ids[:p],
        prompt_tokens=texts[:p],
        prompt_fai=[_finite(float(x)) for x in metrics.fai[:p]],
        prompt_saliency=scores[:p] if saliency else None,
        tokens=tokens,
        layers=metrics.layers,
        heads=HeadGroups(
            local=[metrics.heads[i] for i in metrics.split.local],
            global_=[metrics.heads[i] for i in metrics.split.global_],
        ),
        params={**params.as_dict(), "layers": metrics.layers},
        answer_span=_answer_span(texts[p:], p),
        summary=summary,
        timings=dict(metrics.timings),
    )


def analyze(
    lm: LoadedModel,
    prompt_ids: list[int],
    response_ids: list[int],
    params: AnalysisParams | None = None,
    adapter: str | None = None,
    saliency: SaliencyParams | None = None,
    compute: ComputeOptions | None = None,
) -> Analysis:
    """Annotate ``response_ids`` (following ``prompt_ids``) with FAI, WAAD, flags and, when asked,
    saliency and the faithfulness summary."""
    params = params or AnalysisParams()
    ids = list(prompt_ids) + list(response_ids)
    metrics = compute_metrics(lm, ids, len(prompt_ids), params, compute=compute)
    computed = None
    if saliency is not None:
        started = time.perf_counter()
        computed = (compute_saliency(lm, ids, len(prompt_ids), saliency, compute), saliency)
        metrics.timings["saliency"] = time.perf_counter() - started
    return to_schema(lm, metrics, params, adapter, computed, compute)
