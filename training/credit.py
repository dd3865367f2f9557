"""Per-token credit γ from the preplan-and-anchor rhythm (spec §6), as a registry of strategies (pure math on
flag vectors). A plugin module (:mod:`faithlens.registry`) may register more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from faithlens.metrics import Flags
from faithlens.registry import Registry


@dataclass(frozen=True)
class CreditStrategy:
    """One way to turn a response's flags into per-token credit γ (spec §6). ``weights`` gets the
    flags as boolean tensors and returns γ for the n response tokens; without ``needs_flags`` it is
    called with ``flags=None`` and no scoring pass runs."""

    name: str
    description: str
    weights: Callable[[FlagTensors | None, int, float, float], torch.Tensor]
    needs_flags: bool = True


@dataclass(frozen=True)
class FlagTensors:
    preplan: torch.Tensor
    anchor: torch.Tensor
    dominated: torch.Tensor
    intro: torch.Tensor

    @classmethod
    def of(cls, flags: Flags) -> FlagTensors:
        def as_bool(values: list[bool]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.bool)

        return cls(
            as_bool(flags.preplan),
            as_bool(flags.anchor),
            as_bool(flags.dominated_anchor),
            as_bool(flags.intro),
        )


CREDIT_STRATEGIES: Registry[CreditStrategy] = Registry("credit strategy")


def gamma(
    flags: Flags | None, n: int, credit: str, gamma_amp: float = 1.5, alpha: float = 0.5
) -> torch.Tensor:
    """γ_t for the n response tokens, by the registered strategy ``credit``."""
    strategy = CREDIT_STRATEGIES.get(credit)
    if strategy.needs_flags and flags is None:
        raise ValueError(f"credit {credit!r} needs the response's flags")
    return strategy.weights(FlagTensors.of(flags) if flags is not None else None, n, gamma_amp, alpha)


def _none(flags: FlagTensors | None, n: int, gamma_amp: float, alpha: float) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)


def _local_chunk(flags: FlagTensors | None, n: int, gamma_amp: float, alpha: float) -> torch.Tensor:
    assert flags is not None
    return 1 + (gamma_amp - 1) * flags.preplan.float()


def _global_anchor(flags: FlagTensors | None, n: int, gamma_amp: float, alpha: float) -> torch.Tensor:
    assert flags is not None
    return 1 + (gamma_amp - 1) * flags.anchor.float()


def _coupled(flags: FlagTensors | None, n: int, gamma_amp: float, alpha: float) -> torch.Tensor:
    """Terms add where the sets overlap: an intro token that is also an anchor outside D gets both."""
    assert flags is not None
    boost = gamma_amp - 1
    return (
        1
        + boost * (flags.anchor & ~flags.dominated).float()
        + (1 - alpha) * boost * flags.dominated.float()
        + alpha * boost * flags.intro.float()
    )


for _strategy in (
    CreditStrategy("none", "γ = 1 everywhere: plain GRPO.", _none, needs_flags=False),
    CreditStrategy(
        "local_chunk", "Amplify preplan tokens (the local chunk before an anchor) by gamma_amp.", _local_chunk
    ),
    CreditStrategy("global_anchor", "Amplify anchor tokens by gamma_amp.", _global_anchor),
    CreditStrategy(
        "coupled",
        "Amplify anchors, split a dominated anchor's boost with its intro token by alpha.",
        _coupled,
    ),
):
    CREDIT_STRATEGIES.register(_strategy)


def shape_advantages(
    advantage: float, gammas: torch.Tensor, sign: Literal["both", "positive"] = "both"
) -> torch.Tensor:
    """Ã_t = γ_t·A_t. ``positive`` shapes only non-negative advantages (v1); ``both`` is v2's best."""
    if sign == "positive" and advantage < 0:
        return torch.full_like(gammas, advantage)
    return gammas * advantage
