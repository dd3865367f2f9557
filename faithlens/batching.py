"""The one decode path: continuous batching on a static, slotted KV cache.

The server engine, the trainer's rollouts, ``training.eval``, audits, the rhythm study and
:func:`faithlens.generation.generate` all decode through :class:`DecodeBatch`.

Device side (:mod:`faithlens.decode_step`, :mod:`faithlens.kvcache`, :mod:`faithlens.sampling`): the KV
cache is allocated once as slots × a maximum context; a request prefills into a free slot and frees it
when it ends, so nothing is concatenated, restacked or reallocated while decoding. Each step is one
function of preallocated tensors over the first ``rows`` slots, sampling on the device, and the host
reads its result once (token ids, log-probs and top log-probs of every row in one copy). On CUDA each
step shape is captured as a CUDA graph (``FAITHLENS_CUDA_GRAPHS``).

Host side (this module): which request sits in which slot, a FIFO of requests waiting for one, and,
after the step's one read, everything that needs Python: EOS and length endings, incremental
detokenisation (:class:`Detokenizer`, vLLM's prefix/read offsets, O(1) per token), stop strings
(searched only in the tail a new token can change) and what a stream may show (:func:`visible_text`).

Rows may use different LoRA adapters in the same pass (peft's mixed-batch ``adapter_names``); such a
step runs eagerly, since peft splits the batch by adapter in Python. A batch on one adapter is captured
with that adapter active.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from faithlens.decode_step import (
    Buckets,
    CudaGraphs,
    CudaGraphsMode,
    DecodeStep,
    SlotState,
    StepShape,
    host_read,
    resolve_cuda_graphs,
)
from faithlens.generation import FinishReason, SamplingParams
from faithlens.kvcache import KVPlan, KVShape, SlotKVCache, check_supported, plan_kv
from faithlens.model import LoadedModel, unwrap
from faithlens.sampling import TOP_LOGPROBS_MAX, SamplerFlags, request_seed

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
    num_top_logprobs: int = 0  # alternatives to record per token (OpenAI's top_logprobs, at most 20)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    started: float = field(default_factory=time.perf_counter)
    slot: int | None = None  # the KV cache slot while it decodes
    _position: int = 0  # the cache column of the pending token (the last one sampled)
    _detok: Detokenizer | None = field(default=None, repr=False)
    _text_ends: list[int] = field(default_factory=list, repr=False)  # len(text) after each token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sampler_row(self) -> tuple[SamplingParams, int]:
        return self.params, self.num_top_logprobs


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string, so a stream must not show them."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _has_adapters(lm: LoadedModel) -> bool:
    return hasattr(lm.model, "peft_config")  # faithlens.lora.has_adapters, without its imports


# -- the batch -------------------------------------------------------------------------------------------
DEFAULT_SLOTS = 16  # offline work (rollouts, evals, the study); the server sizes its own


class DecodeBatch:
    """The running batch over a static KV cache of ``slots`` rows × ``max_context`` tokens.

    ``add`` prefills a request into a free slot (or queues it, FIFO, until one frees); ``step`` admits
    queued requests, runs one decode step for every live row and returns the rows that finished (already
    removed). Not thread-safe: one owner (the engine thread, the trainer, ...) drives it.

    Both sizes are the caller's (the engine's limits, or the work at hand: :meth:`for_work`), since the
    cache takes slots × context × the model's per-token KV bytes up front. ``max_context`` is capped at
    the model's; a request whose prompt does not fit is refused, and a row that reaches it ends with
    ``length``. ``cuda_graphs`` and ``kv_memory_fraction`` default to the core
    settings (``FAITHLENS_CUDA_GRAPHS``, ``FAITHLENS_KV_MEMORY_FRACTION``); on CUDA the slots may shrink
    to what free memory holds (:func:`faithlens.kvcache.plan_kv`).
    """

    def __init__(
        self,
        lm: LoadedModel,
        slots: int,
        max_context: int,
        cuda_graphs: CudaGraphsMode | None = None,
        kv_memory_fraction: float | None = None,
        key_block: int | None = None,
    ) -> None:
        from faithlens.settings import get_core_settings

        settings = get_core_settings()
        config = unwrap(lm.model).config
        check_supported(config)
        model_max = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        context = min(max_context, model_max)
        fraction = settings.kv_memory_fraction if kv_memory_fraction is None else kv_memory_fraction
        shape = KVShape.of(config, lm.dtype)
        self.plan: KVPlan = plan_kv(shape, slots, context, lm.device, fraction)
        self.lm = lm
        self._eos = lm.eos_token_ids
        self.cache = SlotKVCache(shape, self.plan.slots, context, lm.device)
        self.state = SlotState.allocate(self.plan.slots, lm.device)
        self.captured = resolve_cuda_graphs(cuda_graphs or settings.cuda_graphs, lm.device)
        block = key_block or (256 if self.captured else 16)  # eager: shapes may vary, keep the waste small
        self.buckets = Buckets(self.plan.slots, context, block, power_of_two_rows=self.captured)
        self._step = DecodeStep(lm, self.cache, self.state)
        self._graphs = CudaGraphs(self._step) if self.captured else None
        self._slots: list[SequenceState | None] = [None] * self.plan.slots
        self.rows: list[SequenceState] = []  # live rows, in the order they joined
        self._waiting: deque[SequenceState] = deque()

    @classmethod
    def for_work(
        cls, lm: LoadedModel, lengths: Sequence[tuple[int, int]], max_slots: int = DEFAULT_SLOTS
    ) -> DecodeBatch:
        """A batch sized to known work, ``(prompt tokens, max new tokens)`` per request: as many slots as
        requests (at most ``max_slots``; the rest queue) and the longest request's context."""
        context = max((prompt + new for prompt, new in lengths), default=1)
        return cls(lm, slots=max(1, min(len(lengths), max_slots)), max_context=context)

    @property
    def slots(self) -> int:
        return self.plan.slots

    @property
    def max_context(self) -> int:
        return self.plan.max_context

    def __len__(self) -> int:
        """Live rows and queued requests: work left."""
        return len(self.rows) + len(self._waiting)

    def has_free_slot(self) -> bool:
        return len(self.rows) < self.slots

    def fits(self, slots: int, max_context: int) -> bool:
        """Whether this batch (idle) can take work needing ``slots`` rows of ``max_context`` tokens."""
        return not len(self) and slots <= self.slots and max_context <= self.max_context

    # -- joining ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, seq: SequenceState) -> None:
        """Prefill ``seq`` into a free slot and sample its first token (it may finish right there), or
        queue it until a slot frees."""
        if not seq.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(seq.prompt_ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(seq.prompt_ids)} tokens; this decode batch holds {self.max_context}"
            )
        if seq.num_top_logprobs > TOP_LOGPROBS_MAX:
            raise ValueError(f"at most {TOP_LOGPROBS_MAX} top log-probs per token")
        if self.has_free_slot() and not self._waiting:
            self._prefill(seq, self._slots.index(None))
        else:
            self._waiting.append(seq)

    def _prefill(self, seq: SequenceState, slot: int) -> None:
        self.state.sampling.set(slot, seq.params, request_seed(seq.params))
        adapter = None if not _has_adapters(self.lm) else seq.adapter
        packed = self._step.prefill(slot, seq.prompt_ids, adapter, SamplerFlags.of([seq.sampler_row()]))
        seq.slot, seq._position = slot, len(seq.prompt_ids)
        self._slots[slot] = seq
        self.rows.append(seq)
        self._accept(seq, host_read(packed)[0])
        if seq.finished:
            self._free(seq)

    def _admit_waiting(self) -> list[SequenceState]:
        """Prefill queued requests into free slots; returns those that finished at once."""
        done = []
        while self._waiting and self.has_free_slot():
            seq = self._waiting.popleft()
            self._prefill(seq, self._slots.index(None))
            if seq.finished:
                done.append(seq)
        return done

    # -- stepping ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SequenceState]:
        """Feed every live row its pending token; returns the rows that finished (already removed)."""
        finished = self._admit_waiting()
        if not self.rows:
            return finished
        flags = SamplerFlags.of(seq.sampler_row() for seq in self.rows)
        shape = self.buckets.shape(
            max(seq.slot for seq in self.rows), max(seq._position for seq in self.rows) + 1, flags
        )
        packed = self._run(shape)
        values = host_read(packed)
        for seq in list(self.rows):
            self._accept(seq, values[seq.slot])
            if seq.finished:
                self._free(seq)
                finished.append(seq)
        return finished

    def _run(self, shape: StepShape) -> torch.Tensor:
        """The step, captured when it can be: on CUDA with graphs on, and unless rows mix adapters."""
        if not _has_adapters(self.lm):
            return self._graphs.run(shape, None) if self._graphs else self._step(shape)
        live = {seq.adapter for seq in self.rows}
        if self._graphs is None or len(live) > 1:  # a mixed batch: peft splits it by adapter, eagerly
            names = [seq.adapter if seq is not None else BASE_ADAPTER for seq in self._slots[: shape.rows]]
            return self._step(shape, names)
        from faithlens import lora  # lora imports the engine's errors, whose package imports this module

        (adapter,) = live
        internal = None if adapter == BASE_ADAPTER else adapter
        return self._graphs.run(shape, adapter, lambda: lora.active(self.lm, internal))

    # -- leaving ------------------------------------------------------------------------------------------------
    def remove(self, indices: Sequence[int]) -> list[SequenceState]:
        """Drop rows (cancelled) by their index in :attr:`rows`; their slots are free at once."""
        gone = [self.rows[i] for i in sorted(set(indices))]
        for seq in gone:
            self._free(seq)
        return gone

    def _free(self, seq: SequenceState) -> None:
        if seq.slot is None:
            return
        self.state.free(seq.slot)
        self._slots[seq.slot] = None
        self.rows.remove(seq)
        seq.slot = None

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _accept(self, seq: SequenceState, values: list[float]) -> None:
        """Take the token the device chose for ``seq`` (from the step's one read) and decide whether it
        finishes. ``values``: token, its raw log-prob, then the top ids and top log-probs when asked."""
        params = seq.params
        token = int(values[0])
        if token in self._eos:
            seq.finish_reason = "stop"
            return
        seq.token_ids.append(token)
        seq.logprobs.append(values[1])
        if seq.num_top_logprobs:
            k = (len(values) - 2) // 2
            ids, logps = values[2 : 2 + k], values[2 + k :]
            seq.top_logprobs.append(
                [(int(i), lp) for i, lp in zip(ids, logps, strict=True)][: seq.num_top_logprobs]
            )
        if seq._detok is None:
            seq._detok = Detokenizer(self.lm.tokenizer)
        unchanged = len(seq._detok.committed)  # the text before this index cannot change
        seq.text = seq._detok.text(seq.token_ids)
        seq._text_ends.append(len(seq.text))
        seq._position = len(seq.prompt_ids) + len(seq.token_ids) - 1
        if params.stop and self._cut_at_stop(seq, unchanged):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= params.max_new_tokens or seq._position + 1 >= self.max_context:
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


def visible_text(seq: SequenceState) -> str:
    """The text a stream may show now: everything except a tail that could still start a stop string."""
    if seq.finished:
        return seq.text  # a trailing U+FFFD is now final (an invalid byte sequence), not a partial character
    if not seq.params.stop:
        return seq.text.rstrip(REPLACEMENT)
    return seq.text[: len(seq.text) - _held_back(seq.text, seq.params.stop)].rstrip(REPLACEMENT)
