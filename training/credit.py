"""Per-token credit γ from the preplan-and-anchor rhythm (spec §6). Pure math on flag vectors."""

from __future__ import annotations

from typing import Literal

import torch

from faithlens.metrics import Flags

Credit = Literal["none", "local_chunk", "global_anchor", "coupled"]
CREDITS: tuple[str, ...] = ("none", "local_chunk", "global_anchor", "coupled")


def gamma(
    flags: Flags | None, n: int, credit: Credit, gamma_amp: float = 1.5, alpha: float = 0.5
) -> torch.Tensor:
    """γ_t for the n response tokens. Terms add where the sets overlap (coupled: an intro token that is
    also an anchor outside D gets both amplifications)."""
    out = torch.ones(n, dtype=torch.float32)
    if credit == "none":
        return out
    if flags is None:
        raise ValueError(f"credit {credit!r} needs the response's flags")
    boost = gamma_amp - 1.0
    preplan = torch.tensor(flags.preplan, dtype=torch.bool)
    anchor = torch.tensor(flags.anchor, dtype=torch.bool)
    dominated = torch.tensor(flags.dominated_anchor, dtype=torch.bool)
    intro = torch.tensor(flags.intro, dtype=torch.bool)
    if credit == "local_chunk":
        return out + boost * preplan.float()
    if credit == "global_anchor":
        return out + boost * anchor.float()
    if credit == "coupled":
        return (
            out
            + boost * (anchor & ~dominated).float()
            + (1 - alpha) * boost * dominated.float()
            + alpha * boost * intro.float()
        )
    raise ValueError(f"unknown credit {credit!r}; expected one of {CREDITS}")


def shape_advantages(
    advantage: float, gammas: torch.Tensor, sign: Literal["both", "positive"] = "both"
) -> torch.Tensor:
    """Ã_t = γ_t·A_t. ``positive`` shapes only non-negative advantages (v1); ``both`` is v2's best."""
    if sign == "positive" and advantage < 0:
        return torch.full_like(gammas, advantage)
    return gammas * advantage
