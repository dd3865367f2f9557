"""Continuous batching for decoding: sequences join and leave one running batch between steps.

The batch keeps one dense, left-padded KV cache. A new sequence is prefilled alone and merged in (its
cache and the batch's are left-padded to a common length); finished rows are dropped with an index
select, and columns that became padding for every row are trimmed. Each step then feeds one token per
row in a single forward pass, so requests that overlap in time share their decode passes, as in vLLM,
without a paged cache (which HF models do not have).

Rows may use different LoRA adapters in the same pass: peft's mixed-batch ``adapter_names``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from faithlens.generation import FinishReason, SamplingParams
from faithlens.model import LoadedModel

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class SequenceState:
    """One request's decoding state. ``token_ids`` excludes EOS and anything from a stop string on."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str = BASE_ADAPTER
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    started: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    _pending: int | None = None  # the sampled token not yet fed to the model

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private RNG per request, so a seeded request samples the same tokens whatever it shares a batch
    with."""
    if params.temperature < GREEDY_BELOW:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed % 2**63)  # any int a client sends (OpenAI allows negatives)
    return gen


GREEDY_BELOW = 1e-5  # temperatures this small are greedy (as in vLLM); dividing by them overflows


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature ~0, else temperature + nucleus sampling with the request's own RNG."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if not torch.isfinite(probs).all():
        return int(logits.argmax())
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
        keep[0] = True  # the nucleus always holds the top token, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string, so a stream must not show them."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class DecodeBatch:
    """The running batch. Not thread-safe: one owner (the engine thread) drives it."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.rows: list[SequenceState] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 for real tokens
        self._eos = lm.eos_token_ids
        self._max_len = getattr(lm.model.config, "max_position_embeddings", None) or 1 << 30

    def __len__(self) -> int:
        return len(self.rows)

    # -- forward passes -------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, adapters: list[str], **kwargs) -> torch.Tensor:
        if hasattr(self.lm.model, "peft_config"):
            kwargs["adapter_names"] = adapters
        out = self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    @torch.inference_mode()
    def add(self, seq: SequenceState) -> None:
        """Prefill ``seq`` alone, sample its first token and merge it into the batch (unless that token
        already finishes it)."""
        ids = torch.tensor([seq.prompt_ids], device=self.lm.device)
        cache = DynamicCache()
        logits = self._forward(ids, [seq.adapter], past_key_values=cache)
        seq.generator = seq.generator or make_generator(seq.params, self.lm.device)
        self._accept(seq, logits[0])
        if not seq.finished:
            self._merge(seq, cache)

    @torch.inference_mode()
    def step(self) -> list[SequenceState]:
        """Feed every row its pending token; returns the rows that finished (already removed)."""
        if not self.rows:
            return []
        assert self._cache is not None and self._mask is not None
        device = self.lm.device
        ids = torch.tensor([[row._pending] for row in self.rows], device=device)
        positions = torch.tensor(
            [[len(r.prompt_ids) + len(r.token_ids) - 1] for r in self.rows], device=device
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(
            ids,
            [row.adapter for row in self.rows],
            past_key_values=self._cache,
            attention_mask=self._mask,
            position_ids=positions,
        )
        for row, row_logits in zip(self.rows, logits, strict=True):
            self._accept(row, row_logits)
        return self.remove([i for i, row in enumerate(self.rows) if row.finished])

    def remove(self, indices: Sequence[int]) -> list[SequenceState]:
        """Drop rows (finished or cancelled) and the cache columns no remaining row needs."""
        if not indices:
            return []
        gone = set(indices)
        removed = [self.rows[i] for i in sorted(gone)]
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return removed
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._trim()
        return removed

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _accept(self, seq: SequenceState, logits: torch.Tensor) -> None:
        """Sample one token for ``seq`` and decide whether it finishes."""
        params = seq.params
        token = sample(logits, params, seq.generator)
        if token in self._eos:
            seq.finish_reason = "stop"
            return
        logp = torch.log_softmax(logits.float(), dim=-1)
        seq.token_ids.append(token)
        seq.logprobs.append(float(logp[token]))
        if params.top_logprobs:
            values, indices = logp.topk(params.top_logprobs)
            seq.top_logprobs.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        seq.text = self.lm.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
        seq._pending = token
        if params.stop and self._cut_at_stop(seq):
            seq.finish_reason = "stop"
        elif (
            len(seq.token_ids) >= params.max_new_tokens
            or len(seq.prompt_ids) + len(seq.token_ids) >= self._max_len
        ):
            seq.finish_reason = "length"

    def _cut_at_stop(self, seq: SequenceState) -> bool:
        hits = [at for at in (seq.text.find(s) for s in seq.params.stop if s) if at >= 0]
        if not hits:
            return False
        cut = min(hits)
        keep = len(seq.token_ids)
        decode = self.lm.tokenizer.decode
        while keep > 0 and len(decode(seq.token_ids[:keep], skip_special_tokens=True)) > cut:
            keep -= 1
        del seq.token_ids[keep:], seq.logprobs[keep:], seq.top_logprobs[keep:]
        seq.text = seq.text[:cut]
        return True

    def _merge(self, seq: SequenceState, cache: DynamicCache) -> None:
        new_mask = torch.ones(1, len(seq.prompt_ids), dtype=torch.long, device=self.lm.device)
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            self.rows = [seq]
            return
        assert self._mask is not None
        length = max(self._mask.shape[1], new_mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)], dim=0)
            values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)], dim=0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_pad_left(self._mask, length), _pad_left(new_mask, length)], dim=0)
        self.rows.append(seq)

    def _trim(self) -> None:
        """Cut leading columns that are padding in every row."""
        assert self._cache is not None and self._mask is not None
        real = self._mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start == 0:
            return
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the sequence axis (-2 for K/V of shape (B, H, L, D), -1 for a (B, L) mask) with zeros."""
    axis = -1 if t.dim() == 2 else -2
    missing = length - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def visible_text(seq: SequenceState) -> str:
    """The text a stream may show now: everything except a tail that could still start a stop string."""
    if seq.finished:
        return seq.text  # a trailing U+FFFD is now final (an invalid byte sequence), not a partial character
    if not seq.params.stop:
        return seq.text.rstrip("\ufffd")
    return seq.text[: len(seq.text) - _held_back(seq.text, seq.params.stop)].rstrip("\ufffd")
