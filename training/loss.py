"""The clipped token-level GRPO surrogate with per-token advantages Ã_t = γ_t·A_t, as TRL defines it.

``loss_type`` only changes the normaliser:
  grpo     mean over each sequence's tokens, then over sequences;
  dr_grpo  sum over all tokens / (sequences × max_new_tokens)   (Dr. GRPO);
  dapo     sum over all tokens / all tokens of the step          (DAPO, TRL's default).
The normalisers are computed over the whole step, so micro-batches add up to the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Normaliser:
    loss_type: str
    sequences: int  # in the whole step
    tokens: int  # completion tokens in the whole step
    max_new_tokens: int

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-token weights whose sum over the whole step is 1 (0 on padding)."""
        mask = mask.float()
        if self.loss_type == "grpo":
            lengths = mask.sum(-1, keepdim=True).clamp(min=1)
            return mask / lengths / self.sequences
        if self.loss_type == "dr_grpo":
            return mask / (self.sequences * self.max_new_tokens)
        if self.loss_type == "dapo":
            return mask / max(self.tokens, 1)
        raise ValueError(f"unknown loss_type {self.loss_type!r}")


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π‖π_ref), as TRL: exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normaliser: Normaliser,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss contribution of one micro-batch. All tensors are (B, T) over completion tokens; ``advantages``
    already carry γ (detached)."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon_high if epsilon_high is not None else epsilon))
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = per_token_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    weights = normaliser.weights(mask)
    loss = (per_token * weights).sum()
    m = mask.bool()
    stats = {
        "clip_fraction": float(((ratio != clipped) & m).sum()),
        "kl_sum": float((kl.detach() * mask).sum()) if kl is not None else 0.0,
    }
    return loss, stats
