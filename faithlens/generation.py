"""Generation: greedy or seeded sampling, stop strings, min_new_tokens, per-token log-probs.

:func:`generate` decodes through :class:`faithlens.batching.DecodeBatch`, the one decode path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from faithlens.model import LoadedModel
from faithlens.params import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    """A finished generation. Token ids exclude the EOS token and anything from a stop string on."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: FinishReason
    seconds: float


def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams | None = None,
    adapter: str | None = None,
    top_logprobs: int = 0,
) -> Generation:
    """Generate one continuation of ``prompt_ids`` (with the attached LoRA ``adapter``, if named).
    Log-probs are the model's raw ones (before sampling transforms), as vLLM reports them.

    A batch of one on :class:`faithlens.batching.DecodeBatch`, the decode path the server, the trainer
    and ``training.eval`` use: the same prompt, seed and params give the same tokens everywhere.
    """
    from faithlens.batching import BASE_ADAPTER, DecodeBatch, SequenceState  # batching imports this module

    params = params or SamplingParams()
    started = time.perf_counter()
    seq = SequenceState(list(prompt_ids), params, adapter or BASE_ADAPTER, top_logprobs)
    batch = DecodeBatch(lm)
    batch.add(seq)
    while len(batch):
        batch.step()
    assert seq.finish_reason is not None
    return Generation(
        prompt_ids=list(prompt_ids),
        token_ids=seq.token_ids,
        text=seq.text,
        logprobs=seq.logprobs,
        top_logprobs=seq.top_logprobs,
        finish_reason=seq.finish_reason,
        seconds=time.perf_counter() - started,
    )
