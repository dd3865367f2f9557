"""Saliency methods, as a registry: one entry per method, holding its options, its cost and its function.

:func:`compute_saliency` resolves the target (spec §7) and the positions to score, runs the method, and
post-processes its scores; :func:`faithlens.cost.saliency_cost` asks the same entry what the method will
cost before it runs. The built-in methods (exact AtMan, its gradient form, the AtManRL mask) are
registered by :mod:`faithlens.atman`; a plugin module (see :mod:`faithlens.registry`) can register more,
and the API, both CLIs, ``training.eval`` and the docs list whatever is registered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from faithlens.answer import char_span_to_tokens, find_answer_span
from faithlens.model import LoadedModel
from faithlens.params import ComputeOptions, SaliencyParams, SaliencyTarget
from faithlens.registry import Registry


@dataclass
class Saliency:
    """Per-position scores over the full sequence (NaN where a position was not scored).
    ``base_logprob`` is Σ log p(target) of the unperturbed sequence, whatever the method."""

    method: str
    scores: torch.Tensor
    target: list[int]
    groups: list[list[int]]
    base_logprob: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaliencyInput:
    """What every method gets: the sequence, its target and the positions before it to score."""

    lm: LoadedModel
    input_ids: list[int]
    prompt_len: int
    texts: list[str]
    target: list[int]
    positions: list[int]  # every non-target position before the last target token
    params: SaliencyParams
    compute: ComputeOptions


@dataclass(frozen=True)
class CostInput:
    """What a cost estimate sees: the token texts and the resolved target, no model."""

    texts: list[str]
    prompt_len: int
    target: list[int]
    params: SaliencyParams


@dataclass(frozen=True)
class SaliencyMethod:
    """One saliency method. ``options`` names the :class:`SaliencyParams` fields it reads (beyond the
    ones every method shares: target, postprocess, normalize, seed and counterfactual_k); ``cost``
    estimates its own work in forward-token units (:mod:`faithlens.cost`), not counting the scoring pass
    and the counterfactual check, which every method shares."""

    name: str
    description: str
    compute: Callable[[SaliencyInput], Saliency]
    cost: Callable[[CostInput], float]
    options: tuple[str, ...] = ()
    cost_note: str = ""


SALIENCY_METHODS: Registry[SaliencyMethod] = Registry("saliency method", builtins=("faithlens.atman",))


def resolve_target(texts: list[str], prompt_len: int, target: SaliencyTarget) -> list[int]:
    """Target positions: the answer span (default), else the whole response, else the client's indices."""
    n = len(texts)
    if isinstance(target, list):
        bad = [t for t in target if not 1 <= t < n]
        if bad or not target:
            raise ValueError(f"target indices {bad or target} must lie in [1, {n - 1}]")
        return sorted(set(target))
    if target == "answer":
        span = find_answer_span("".join(texts[prompt_len:]))
        tokens = char_span_to_tokens(texts[prompt_len:], span) if span else None
        if tokens is not None:
            return list(range(prompt_len + tokens[0], prompt_len + tokens[1]))
    return list(range(max(prompt_len, 1), n))


def scored_positions(target: list[int]) -> list[int]:
    """The positions a method scores: everything before the last target token that is not a target."""
    tset = set(target)
    return [i for i in range(max(target)) if i not in tset]


def postprocess(scores: torch.Tensor, params: SaliencyParams) -> torch.Tensor:
    if params.postprocess == "absolute":
        scores = scores.abs()
    elif params.postprocess == "square":
        scores = scores.square()
    if params.normalize:
        present = scores[~torch.isnan(scores)]
        if present.numel():
            lo, hi = present.min(), present.max()
            scores = (
                (scores - lo) / (hi - lo)
                if hi > lo
                else torch.zeros_like(scores).masked_fill(scores.isnan(), math.nan)
            )
    return scores


def compute_saliency(
    lm: LoadedModel,
    input_ids: list[int],
    prompt_len: int,
    params: SaliencyParams | None = None,
    compute: ComputeOptions | None = None,
) -> Saliency:
    """Saliency of every position before the target (prompt and reasoning), by the chosen method."""
    params = params or SaliencyParams()
    method = SALIENCY_METHODS.get(params.method)
    texts = lm.token_texts(input_ids)
    target = resolve_target(texts, prompt_len, params.target)
    found = method.compute(
        SaliencyInput(
            lm,
            list(input_ids),
            prompt_len,
            texts,
            target,
            scored_positions(target),
            params,
            compute or ComputeOptions(),
        )
    )
    found.scores = postprocess(found.scores, params)
    return found


def method_cost(texts: list[str], prompt_len: int, params: SaliencyParams) -> float:
    """The method's own cost estimate (the target is resolved as the method will resolve it)."""
    method = SALIENCY_METHODS.get(params.method)
    return method.cost(CostInput(texts, prompt_len, resolve_target(texts, prompt_len, params.target), params))
