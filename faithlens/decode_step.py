"""One decode step as a function of preallocated device tensors, and the ways to run it.

:class:`DecodeStep` feeds every row of the first ``rows`` slots its pending token, writes the new keys
and values in place (:class:`~faithlens.kvcache.SlotKVCache`), samples the next tokens on the device
(:mod:`faithlens.sampling`), advances the live rows' tokens, positions and counters in place, and returns
one packed tensor. Its inputs are tensors allocated once (:class:`SlotState`) and a :class:`StepShape`
of Python constants, so for a given shape it is the same graph every time: ``torch.compile(...,
fullgraph=True)`` traces it with no break, and a CUDA graph can hold it (:class:`CudaGraphs`).

The host reads the step's result once (:func:`host_read`); stop strings, detokenisation and streaming
happen after that copy (:mod:`faithlens.batching`).

Shapes come from :class:`Buckets`: when steps are captured, rows round up to a power of two (1, 2, 4, …,
slots) and keys to a multiple of ``key_block``, so a handful of graphs cover every batch; run eagerly,
rows are exact and keys round to a multiple of 16.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from faithlens.kvcache import SlotKVCache, round_up
from faithlens.model import LoadedModel, unwrap
from faithlens.sampling import RowSampling, SamplerFlags, sample

log = logging.getLogger("faithlens.decode")

CudaGraphsMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class StepShape:
    """What one compiled or captured step is specialised to."""

    rows: int
    key_len: int
    flags: SamplerFlags


@dataclass(frozen=True)
class Buckets:
    """How live rows and context round up to a step's shape."""

    slots: int
    max_context: int
    key_block: int
    power_of_two_rows: bool

    def rows(self, needed: int) -> int:
        if not self.power_of_two_rows:
            return needed
        return min(self.slots, 1 << (needed - 1).bit_length())

    def key_len(self, needed: int) -> int:
        return min(self.max_context, round_up(needed, self.key_block))

    def shape(self, highest_slot: int, longest: int, flags: SamplerFlags) -> StepShape:
        return StepShape(self.rows(highest_slot + 1), self.key_len(longest), flags)


@dataclass
class SlotState:
    """Each slot's decode state on the device, allocated once: the pending token (the one to feed next),
    its position (the cache column it is written to), whether the slot is live, and how it samples."""

    tokens: torch.Tensor  # (S,) int64
    positions: torch.Tensor  # (S,) int64
    live: torch.Tensor  # (S,) int64, 1 for a live row: only live rows advance
    sampling: RowSampling

    @classmethod
    def allocate(cls, slots: int, device: torch.device) -> SlotState:
        zeros = torch.zeros(slots, dtype=torch.long, device=device)
        return cls(zeros, zeros.clone(), zeros.clone(), RowSampling.allocate(slots, device))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.positions, self.live, *self.sampling.tensors()

    def free(self, slot: int) -> None:
        """A slot left: park it at position 0 so a step that still spans it writes inside its own slot."""
        self.positions[slot] = 0
        self.live[slot] = 0


def resolve_cuda_graphs(mode: CudaGraphsMode, device: torch.device) -> bool:
    """``auto``: capture on CUDA, run eagerly elsewhere. ``on`` where there is no CUDA is a mistake."""
    if mode == "on" and device.type != "cuda":
        raise ValueError("FAITHLENS_CUDA_GRAPHS=on needs a CUDA device; use auto or off")
    return mode != "off" and device.type == "cuda"


def host_read(packed: torch.Tensor) -> list[list[float]]:
    """The step's one read from the device: one copy of the packed result (on a CPU, one copy too)."""
    return packed.to("cpu", copy=True).tolist()


def _cache_argument(lm: LoadedModel) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use the name this version takes, so
    no deprecation shim runs inside the step."""
    params = inspect.signature(unwrap(lm.model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecodeStep:
    """The tensor-only step (see the module docstring). Not thread-safe: the batch's owner calls it."""

    def __init__(self, lm: LoadedModel, cache: SlotKVCache, state: SlotState) -> None:
        self.lm, self.cache, self.state = lm, cache, state
        vocab = unwrap(lm.model).get_output_embeddings().weight.shape[0]
        self.eos = torch.zeros(vocab, dtype=torch.bool, device=lm.device)
        self.eos[[i for i in lm.eos_token_ids if i < vocab]] = True
        self._cache_arg = _cache_argument(lm)

    def __call__(self, shape: StepShape, adapters: list[str] | None = None) -> torch.Tensor:
        """One step over slots ``[0, shape.rows)``; ``adapters`` (one per slot) for peft's mixed batches."""
        rows, key_len = shape.rows, shape.key_len
        state = self.state
        positions = state.positions[:rows]
        columns = torch.arange(key_len, device=positions.device)
        mask = (columns[None, :] <= positions[:, None])[:, None, None, :]
        logits = self._forward(
            state.tokens[:rows, None],
            positions[:, None],
            mask,
            self.cache.for_step(rows, key_len, positions),
            adapters,
        )
        live = state.live[:rows]
        sampled = sample(logits, state.sampling.rows(0, rows), self.eos, shape.flags)
        state.tokens[:rows].copy_(torch.where(live.bool(), sampled.tokens, state.tokens[:rows]))
        state.positions[:rows].add_(live)
        state.sampling.count[:rows].add_(live)
        return sampled.packed()

    def prefill(
        self, slot: int, prompt_ids: list[int], adapter: str | None, flags: SamplerFlags
    ) -> torch.Tensor:
        """Write the prompt's keys and values into ``slot`` and sample its first token (eager: prompts
        have every length). The slot's sampling parameters are set already."""
        device, state, length = self.lm.device, self.state, len(prompt_ids)
        ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(length, device=device)
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        logits = self._forward(
            ids,
            positions[None],
            mask,
            self.cache.for_prefill(slot, length),
            None if adapter is None else [adapter],
        )
        sampled = sample(logits, state.sampling.rows(slot, slot + 1), self.eos, flags)
        state.tokens[slot : slot + 1].copy_(sampled.tokens)
        state.positions[slot] = length
        state.live[slot] = 1
        state.sampling.count[slot] = 1
        return sampled.packed()

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: SlotKVCache,
        adapters: list[str] | None,
    ) -> torch.Tensor:
        kwargs = {self._cache_arg: cache}
        if adapters is not None:
            kwargs["adapter_names"] = adapters
        out = self.lm.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1]


class CudaGraphs:
    """One CUDA graph per (shape, adapter), captured on first use and replayed after (vLLM's per-batch-size
    graphs; here per key bucket too). All graphs share one memory pool.

    Capture records without running, so the state is untouched; the warm-up run before it (cuBLAS and
    allocator initialisation) does run, so the state it advances is saved and put back. Its cache writes
    need no undoing: the real step writes the same keys and values to the same columns.

    A graph holds the kernels of the adapter that was active when it was captured, so the adapter is
    switched on only around the capture (``active``), and every graph is dropped when an adapter is
    attached or detached (``LoadedModel.revision``): a replay must never read freed LoRA weights. A peft
    model whose rows mix adapters cannot be captured (peft splits the batch by adapter in Python); the
    caller runs such steps eagerly.
    """

    def __init__(self, step: DecodeStep) -> None:
        self.step = step
        with torch.cuda.device(step.lm.device):
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[StepShape, str | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._revision = step.lm.revision

    def run(
        self,
        shape: StepShape,
        adapter: str | None = None,
        active: Callable[[], AbstractContextManager] = nullcontext,
    ) -> torch.Tensor:
        if self.step.lm.revision != self._revision:
            self.graphs.clear()
            self._revision = self.step.lm.revision
        key = (shape, adapter)
        if key not in self.graphs:
            with active():
                self.graphs[key] = self._capture(shape)
            log.info("captured a decode step", extra={"rows": shape.rows, "key_len": shape.key_len})
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, shape: StepShape) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with torch.cuda.device(self.step.lm.device):
            saved = [t.clone() for t in self.step.state.tensors()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step(shape)
            torch.cuda.current_stream().wait_stream(stream)
            for tensor, value in zip(self.step.state.tensors(), saved, strict=True):
                tensor.copy_(value)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(shape)
        return graph, out
