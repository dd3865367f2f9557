"""Continuous batching for decoding: sequences join and leave one running batch between steps.

This is the one decode path: the server engine, the trainer's rollouts, ``training.eval`` and
:func:`faithlens.generation.generate` (a batch of one) all sample through :class:`DecodeBatch`.

The batch keeps one dense, left-padded KV cache. A new sequence is prefilled alone and merged in (its
cache and the batch's are left-padded to a common length); finished rows are dropped with an index
select, and columns that became padding for every row are trimmed. Each step then feeds one token per
row in a single forward pass, so requests that overlap in time share their decode passes, as in vLLM,
without a paged cache (which HF models do not have).

A step costs what attention must, O(context), and nothing that grows faster:

* the KV cache (:class:`GrowingCache`) and the attention mask write each new column in place into
  preallocated storage whose capacity doubles when full (amortised O(1) copies per token), and hand
  the model views of the filled part;
* the text is detokenised incrementally (:class:`Detokenizer`, vLLM's prefix/read offsets), so a token
  costs O(1) to decode, and stop strings are searched for only in the tail a new token can change.

Rows may use different LoRA adapters in the same pass: peft's mixed-batch ``adapter_names``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from faithlens.generation import FinishReason, SamplingParams
from faithlens.model import LoadedModel

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 character


# -- incremental detokenisation ------------------------------------------------------------------------
@dataclass
class Detokenizer:
    """Incremental detokenisation with vLLM's prefix and read offsets (``detokenize_incrementally``).

    Only the tokens since the last commit are decoded, with the committed ones before them as context
    (``tokens[prefix_offset:read_offset]``), so a token costs O(1) whatever the length. Text is committed
    once it does not end in U+FFFD (an incomplete UTF-8 character); until then the pending tail is shown
    as the full decode would show it. For the byte-level tokenizers used here ``text(ids)`` equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``: a commit point is a character boundary, and
    lossy UTF-8 decoding of what follows it does not depend on what precedes it.
    """

    tokenizer: Any
    prefix_offset: int = 0
    read_offset: int = 0
    prefix_text: str = ""  # decode(ids[prefix_offset:read_offset])
    committed: str = ""  # decode(ids[:read_offset]); never changes once committed

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, which extend the ids of the previous call by new tokens."""
        new = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new) <= len(self.prefix_text):
            return self.committed  # the new tokens show nothing (yet): skipped specials
        tail = new[len(self.prefix_text) :]
        if new.endswith(REPLACEMENT):
            return self.committed + tail  # pending: an incomplete character, shown as decode shows it
        self.committed += tail
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.prefix_text = self.tokenizer.decode(
            ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        return self.committed


# -- sequences -------------------------------------------------------------------------------------------
@dataclass
class SequenceState:
    """One request's decoding state. ``token_ids`` excludes EOS and anything from a stop string on."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str = BASE_ADAPTER
    num_top_logprobs: int = 0  # alternatives to record per token (OpenAI's top_logprobs)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    started: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    _pending: int | None = None  # the sampled token not yet fed to the model
    _detok: Detokenizer | None = field(default=None, repr=False)
    _text_ends: list[int] = field(default_factory=list, repr=False)  # len(text) after each token

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


# -- growing storage -------------------------------------------------------------------------------------
def _capacity(columns: int) -> int:
    """Storage for at least ``columns`` columns: a power of two, so full storage doubles."""
    return max(16, 1 << (columns - 1).bit_length())


class SeqBuffer:
    """A tensor that grows along one sequence axis in place.

    ``storage`` is preallocated with room to spare; columns ``[start, end)`` are filled and ``view`` is
    a view of them. An append writes into the spare room; when none is left the filled part moves to
    storage of twice the size, so each column is copied O(1) times on average. Dropping leading columns
    only moves ``start``.
    """

    def __init__(self, storage: torch.Tensor, axis: int, start: int = 0, end: int = 0) -> None:
        self.storage, self.axis, self.start, self.end = storage, axis, start, end

    @classmethod
    def empty(cls, like: torch.Tensor, axis: int, columns: int) -> SeqBuffer:
        """An empty buffer for tensors shaped like ``like``, with room for ``columns`` columns."""
        shape = list(like.shape)
        shape[axis] = _capacity(columns)
        return cls(like.new_empty(shape), axis)

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> int:
        return self.storage.shape[self.axis]

    @property
    def view(self) -> torch.Tensor:
        return self.storage.narrow(self.axis, self.start, self.end - self.start)

    def append(self, columns: torch.Tensor) -> None:
        n = columns.shape[self.axis]
        if self.end + n > self.capacity:
            self._move(self.storage.shape[0], len(self) + n)
        self.storage.narrow(self.axis, self.end, n).copy_(columns)
        self.end += n

    def _move(self, rows: int, columns: int, index: torch.Tensor | None = None) -> None:
        """Move the filled part (rows ``index``) to the front of fresh storage with room for ``columns``."""
        live = self.view if index is None else self.view.index_select(0, index)
        shape = list(self.storage.shape)
        shape[0], shape[self.axis] = rows, _capacity(columns)
        storage = self.storage.new_empty(shape)
        storage.narrow(self.axis, 0, live.shape[self.axis]).copy_(live)
        self.storage, self.start, self.end = storage, 0, live.shape[self.axis]

    def select_rows(self, index: torch.Tensor) -> None:
        self._move(len(index), len(self) + 1, index.to(self.storage.device))

    def drop_left(self, columns: int) -> None:
        self.start += min(columns, len(self))

    def drop_right(self, columns: int) -> None:
        self.end -= min(columns, len(self))

    @classmethod
    def stack_left_padded(cls, parts: Sequence[SeqBuffer], room: int = 1) -> SeqBuffer:
        """Stack the rows of ``parts``, each right-aligned (left-padded with zeros) to the longest."""
        axis = parts[0].axis
        length = max(len(p) for p in parts)
        shape = list(parts[0].storage.shape)
        shape[0], shape[axis] = sum(p.storage.shape[0] for p in parts), _capacity(length + room)
        storage = parts[0].storage.new_zeros(shape)
        row = 0
        for part in parts:
            rows = part.storage.shape[0]
            storage[row : row + rows].narrow(axis, length - len(part), len(part)).copy_(part.view)
            row += rows
        return cls(storage, axis, 0, length)


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose ``update`` writes in place into
    preallocated storage (:class:`SeqBuffer`, capacity doubling) instead of ``torch.cat``-ing a new
    tensor every step. ``keys`` and ``values`` are views of the filled part, shaped as DynamicLayer's, so
    masks and positions (``get_seq_length``, ``get_mask_sizes``) work unchanged."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._k: SeqBuffer | None = None
        self._v: SeqBuffer | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        room = key_states.shape[-2] + 1  # the prefill and the first decoded token
        self._k = SeqBuffer.empty(key_states, 2, room)
        self._v = SeqBuffer.empty(value_states, 2, room)
        self.is_initialized = True

    def _sync(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k.view, self._v.view

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        self._k.append(key_states)
        self._v.append(value_states)
        self._sync()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return len(self._k) if self.is_initialized and self._k is not None else 0

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._k.drop_right(-tokens_to_remove)
        self._v.drop_right(-tokens_to_remove)
        self._sync()

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` positions of every row (padding no row needs any more)."""
        if self.is_initialized:
            self._k.drop_left(columns)
            self._v.drop_left(columns)
            self._sync()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k.select_rows(indices)
            self._v.select_rows(indices)
            self._sync()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = self._k.storage.shape[0]
            self.batch_select_indices(torch.arange(rows, device=self.device).repeat_interleave(repeats))

    @classmethod
    def stack_left_padded(cls, layers: Sequence[GrowingLayer]) -> GrowingLayer:
        """One layer holding the rows of ``layers``, each left-padded to the longest."""
        out = cls()
        out.dtype, out.device = layers[0].dtype, layers[0].device
        out._k = SeqBuffer.stack_left_padded([layer._k for layer in layers])
        out._v = SeqBuffer.stack_left_padded([layer._v for layer in layers])
        out.is_initialized = True
        out._sync()
        return out


class GrowingCache(DynamicCache):
    """A DynamicCache of :class:`GrowingLayer` s: in-place, amortised O(1) appends per token."""

    def __init__(self, layers: list[GrowingLayer] | None = None) -> None:
        if layers is None:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
        else:
            Cache.__init__(self, layers=list(layers))

    @classmethod
    def stack_left_padded(cls, caches: Sequence[GrowingCache]) -> GrowingCache:
        per_layer = zip(*(cache.layers for cache in caches), strict=True)
        return cls([GrowingLayer.stack_left_padded(layers) for layers in per_layer])

    def drop_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_left(columns)


# -- the batch -------------------------------------------------------------------------------------------
class DecodeBatch:
    """The running batch. Not thread-safe: one owner (the engine thread) drives it."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.rows: list[SequenceState] = []
        self._cache: GrowingCache | None = None
        self._mask: SeqBuffer | None = None  # (B, L) 1 for real tokens, 0 for left padding
        self._eos = lm.eos_token_ids
        self._eos_index = torch.tensor(sorted(self._eos), dtype=torch.long, device=lm.device)
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
        cache = GrowingCache()
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
        self._mask.append(self._mask.storage.new_ones(len(self.rows), 1))
        logits = self._forward(
            ids,
            [row.adapter for row in self.rows],
            past_key_values=self._cache,
            attention_mask=self._mask.view,
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
        index = torch.tensor(keep, device=self.lm.device)
        self._cache.batch_select_indices(index)
        self._mask.select_rows(index)
        self._trim()
        return removed

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _accept(self, seq: SequenceState, logits: torch.Tensor) -> None:
        """Sample one token for ``seq`` and decide whether it finishes.

        Before ``min_new_tokens`` tokens EOS is masked out of what is sampled (HF's
        MinNewTokensLogitsProcessor); the reported log-probs stay the model's raw ones.
        """
        params = seq.params
        scores = logits
        if len(seq.token_ids) < params.min_new_tokens and len(self._eos_index):
            scores = logits.clone()
            scores[self._eos_index] = float("-inf")
        token = sample(scores, params, seq.generator)
        if token in self._eos:
            seq.finish_reason = "stop"
            return
        logp = torch.log_softmax(logits.float(), dim=-1)
        seq.token_ids.append(token)
        seq.logprobs.append(float(logp[token]))
        if seq.num_top_logprobs:
            values, indices = logp.topk(seq.num_top_logprobs)
            seq.top_logprobs.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        if seq._detok is None:
            seq._detok = Detokenizer(self.lm.tokenizer)
        unchanged = len(seq._detok.committed)  # the text before this index cannot change
        seq.text = seq._detok.text(seq.token_ids)
        seq._text_ends.append(len(seq.text))
        seq._pending = token
        if params.stop and self._cut_at_stop(seq, unchanged):
            seq.finish_reason = "stop"
        elif (
            len(seq.token_ids) >= params.max_new_tokens
            or len(seq.prompt_ids) + len(seq.token_ids) >= self._max_len
        ):
            seq.finish_reason = "length"

    @staticmethod
    def _cut_at_stop(seq: SequenceState, unchanged: int) -> bool:
        """Cut at the earliest stop string: keep the tokens that end before it (OpenAI excludes the stop).

        Earlier steps searched the text up to ``unchanged``, so only matches that end after it are new.
        """
        stops = [s for s in seq.params.stop if s]
        if not stops:
            return False
        start = max(0, unchanged - max(len(s) for s in stops) + 1)
        hits = [at for at in (seq.text.find(s, start) for s in stops) if at >= 0]
        if not hits:
            return False
        cut = min(hits)
        keep = len(seq.token_ids)
        while keep > 0 and seq._text_ends[keep - 1] > cut:
            keep -= 1
        del seq.token_ids[keep:], seq.logprobs[keep:], seq.top_logprobs[keep:], seq._text_ends[keep:]
        seq.text = seq.text[:cut]
        return True

    def _merge(self, seq: SequenceState, cache: GrowingCache) -> None:
        ones = torch.ones(1, len(seq.prompt_ids), dtype=torch.long, device=self.lm.device)
        new_mask = SeqBuffer.empty(ones, 1, ones.shape[1] + 1)
        new_mask.append(ones)
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            self.rows = [seq]
            return
        assert self._mask is not None
        self._cache = GrowingCache.stack_left_padded([self._cache, cache])
        self._mask = SeqBuffer.stack_left_padded([self._mask, new_mask])
        self.rows.append(seq)

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        assert self._cache is not None and self._mask is not None
        real = self._mask.view.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start:
            self._mask.drop_left(start)
            self._cache.drop_left(start)


def visible_text(seq: SequenceState) -> str:
    """The text a stream may show now: everything except a tail that could still start a stop string."""
    if seq.finished:
        return seq.text  # a trailing U+FFFD is now final (an invalid byte sequence), not a partial character
    if not seq.params.stop:
        return seq.text.rstrip(REPLACEMENT)
    return seq.text[: len(seq.text) - _held_back(seq.text, seq.params.stop)].rstrip(REPLACEMENT)
