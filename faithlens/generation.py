"""Generation: greedy or seeded sampling, stop strings, min_new_tokens, per-token log-probs.

:func:`generate` decodes through :class:`faithlens.batching.DecodeBatch`, the one decode path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from faithlens.model import LoadedModel
from faithlens.params import SamplingParams

if TYPE_CHECKING:
    from faithlens.batching import SequenceState

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
    return generate_batch(lm, [(prompt_ids, params or SamplingParams())], adapter, top_logprobs)[0]


def generate_batch(
    lm: LoadedModel,
    requests: list[tuple[list[int], SamplingParams]],
    adapter: str | None = None,
    top_logprobs: int = 0,
    slots: int | None = None,
) -> list[Generation]:
    """Generate several continuations together in one :class:`~faithlens.batching.DecodeBatch` (the
    rhythm study's perturbation trials). A request decodes the same tokens alone or in a batch (the
    decode path's batch invariance, tests/test_decode_path.py); ``seconds`` is the batch's wall time.
    ``slots``: rows decoded at once (default :data:`~faithlens.batching.DEFAULT_SLOTS`; the rest queue)."""
    from faithlens.batching import BASE_ADAPTER, DecodeBatch, SequenceState  # batching imports this module

    started = time.perf_counter()
    seqs = [
        SequenceState(list(ids), params, adapter or BASE_ADAPTER, top_logprobs) for ids, params in requests
    ]
    lengths = [(len(seq.prompt_ids), seq.params.max_new_tokens) for seq in seqs]
    batch = DecodeBatch.for_work(lm, lengths, **({} if slots is None else {"max_slots": slots}))
    for seq in seqs:
        batch.add(seq)
    while len(batch):
        batch.step()
    seconds = time.perf_counter() - started
    return [_finished(seq, seconds) for seq in seqs]


def _finished(seq: SequenceState, seconds: float) -> Generation:
    assert seq.finish_reason is not None
    return Generation(
        prompt_ids=list(seq.prompt_ids),
        token_ids=seq.token_ids,
        text=seq.text,
        logprobs=seq.logprobs,
        top_logprobs=seq.top_logprobs,
        finish_reason=seq.finish_reason,
        seconds=seconds,
    )
