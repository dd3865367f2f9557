"""A naive reference for spec §1–4: materialise eager attention and apply the formulas literally."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faithlens.model import unwrap


@dataclass
class Reference:
    heads: list[tuple[int, int]]
    distance: torch.Tensor
    local: list[int]
    global_: list[int]
    waad: torch.Tensor  # response-relative
    fai: torch.Tensor  # all positions, NaN where T(s) is empty


def eager_attentions(model, input_ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Post-softmax attention maps of every layer, from the eager implementation."""
    model = unwrap(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ids = torch.tensor([input_ids], device=model.device)
            out = model(ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return out.attentions


def reference_metrics(model, input_ids, p, layers, W=10, H_lo=10, H_hi=100, fraction=0.3) -> Reference:
    attn = eager_attentions(model, input_ids)
    n = len(input_ids)
    rows = list(range(p, n))
    heads, maps = [], []
    for layer in layers:
        for h in range(attn[layer].shape[1]):
            heads.append((layer, h))
            maps.append(attn[layer][0, h].double().cpu())
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # t − s
    causal = lag >= 0
    distance = torch.tensor(
        [sum(float((a[t] * lag[t] * causal[t]).sum()) for t in rows) / len(rows) for a in maps],
        dtype=torch.float64,
    )
    order = sorted(range(len(heads)), key=lambda i: float(distance[i]))  # Python's sort is stable
    m = max(1, int(fraction * len(heads)))
    local, global_ = order[:m], order[-m:]
    a_loc = sum(maps[i] for i in local) / m
    a_glob = sum(maps[i] for i in global_) / m
    waad = torch.tensor(
        [sum(float(a_loc[t, s]) * min(t - s, W) for s in range(t + 1)) for t in rows], dtype=torch.float64
    )
    fai = torch.full((n,), float("nan"), dtype=torch.float64)
    for s in range(n):
        hi = n - 1 if H_hi is None else min(n - 1, s + H_hi)
        targets = [t for t in rows if s + H_lo <= t <= hi]
        if targets:
            fai[s] = sum(float(a_glob[t, s]) for t in targets) / len(targets)
    return Reference(heads, distance, local, global_, waad, fai)
