"""The preplan-and-anchor math on per-head vectors (spec §2–5): head split, group means, flags.

Pure tensor functions with no model in sight, so each is unit-testable on hand-made vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def default_layers(num_layers: int) -> list[int]:
    """Five layers evenly spaced from floor(L/3) to floor(2L/3) inclusive (spec §1)."""
    a, b = num_layers // 3, 2 * num_layers // 3
    return sorted({a + (i * (b - a)) // 4 for i in range(5)})


@dataclass(frozen=True)
class HeadSplit:
    """Indices into the flat (layer, head) list of the locally and globally focused heads."""

    local: list[int]
    global_: list[int]


def split_heads(mean_distance: torch.Tensor, fraction: float = 0.3) -> HeadSplit:
    """Bottom ``fraction`` of heads by mean backward distance are local, the top are global (spec §2)."""
    n_heads = mean_distance.numel()
    n = max(1, int(fraction * n_heads))
    order = torch.sort(mean_distance, stable=True).indices.tolist()
    return HeadSplit(local=order[:n], global_=order[-n:])


def fai_counts(seq_len: int, response_start: int, h_lo: int, h_hi: int | None) -> torch.Tensor:
    """|T(s)| for every position s: response rows t with s+H_lo ≤ t ≤ min(N−1, s+H_hi) (spec §4)."""
    s = torch.arange(seq_len)
    lo = torch.clamp(s + h_lo, min=response_start)
    hi = torch.full_like(s, seq_len - 1) if h_hi is None else torch.clamp(s + h_hi, max=seq_len - 1)
    return (hi - lo + 1).clamp(min=0)


def group_mean(per_head: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Plain mean over the heads of one group (rows of ``per_head``)."""
    return per_head[heads].mean(0)


def fai_from_sums(fai_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """FAI = sum / |T(s)|, NaN where T(s) is empty (reported as null, never 0)."""
    fai = fai_sum.double() / counts.clamp(min=1)
    return fai.masked_fill(counts == 0, float("nan"))


@dataclass(frozen=True)
class Flags:
    """Response-relative flags (index 0 is the first response token)."""

    preplan: list[bool]
    anchor: list[bool]
    dominated_anchor: list[bool]
    intro: list[bool]
    coupled_pairs: list[tuple[int, int]]  # (intro position, dominated anchor position)
    delta: list[float]
    tau_waad: float | None
    tau_delta: float | None


def _top_q(values: torch.Tensor, q: float) -> torch.Tensor:
    """value ≥ the (1−q) quantile, with linear interpolation: ties at the threshold are in (spec §5)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return values >= torch.quantile(values, 1.0 - q)


def compute_flags(
    waad: torch.Tensor,
    fai: torch.Tensor,
    q: float = 0.4,
    k: int = 3,
    tau_waad: float | None = None,
    tau_delta: float | None = None,
) -> Flags:
    """Preplan, anchor, locally dominated anchor and intro flags over one response (spec §5).

    ``waad`` and ``fai`` are response-relative; NaN in ``fai`` marks an undefined FAI, which is never
    an anchor and does not enter the quantile.
    """
    waad = waad.double().cpu()
    fai = fai.double().cpu()
    n = waad.numel()
    delta = (waad[:-1] - waad[1:]).abs() if n > 1 else torch.zeros(0, dtype=torch.float64)
    preplan = torch.zeros(n, dtype=torch.bool)
    preplan[: delta.numel()] = _top_q(delta, q)
    defined = ~torch.isnan(fai)
    anchor = torch.zeros(n, dtype=torch.bool)
    anchor[defined] = _top_q(fai[defined], q)
    tw = float(torch.quantile(waad, 0.5)) if tau_waad is None and n else tau_waad
    td = float(torch.quantile(delta, 0.5)) if tau_delta is None and delta.numel() else tau_delta
    dominated = [False] * n
    intro = [False] * n
    pairs: list[tuple[int, int]] = []
    for t in range(n):
        if not anchor[t] or td is None or waad[t] > tw:
            continue
        lo = max(0, t - k)
        if lo >= t:
            continue
        window = delta[lo:t]
        if window.max() >= td:
            u = lo + int(torch.argmax(window))  # the earliest maximum
            dominated[t] = True
            intro[u] = True
            pairs.append((u, t))
    return Flags(
        preplan=preplan.tolist(),
        anchor=anchor.tolist(),
        dominated_anchor=dominated,
        intro=intro,
        coupled_pairs=pairs,
        delta=delta.tolist(),
        tau_waad=tw,
        tau_delta=td,
    )
