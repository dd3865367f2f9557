"""The interface between the API routes and whatever generates and analyses: :class:`EngineClient`.

It plays the part of vLLM's ``EngineClient``. Routes build plain requests, call these methods, and turn
the plain outputs into the API's schemas; they never see the model, the tokenizer or the scheduler.
Errors are :mod:`faithlens.engine.errors`. :class:`~faithlens.engine.local.LocalEngine` (continuous
batching on a transformers model, analyses in time slices) is one implementation; docs/architecture.md
says how to add another.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from faithlens.generation import FinishReason
from faithlens.params import AnalysisParams, SaliencyParams, SamplingParams
from faithlens.schema import Analysis

Messages = list[dict[str, str]]


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Prompt:
    """Raw ``text`` (or ``text`` wrapped in the chat template with ``chat``), or chat ``messages``."""

    text: str | None = None
    messages: Messages | None = None
    chat: bool = False

    def characters(self) -> int:
        if self.messages is not None:
            return sum(len(m.get("content", "")) for m in self.messages)
        return len(self.text or "")


@dataclass
class AnalysisSpec:
    """What to compute on a sequence: the spec's parameters (§2–5) and, optionally, saliency (§7–8)."""

    params: AnalysisParams = field(default_factory=AnalysisParams)
    saliency: SaliencyParams | None = None


@dataclass
class GenerationRequest:
    """Generate a continuation of ``prompt``; annotate it afterwards when ``analysis`` is given.

    ``fit_context``: ``sampling.max_new_tokens`` is only an upper bound, lowered to what the model's
    context leaves after the prompt (OpenAI's unset ``max_tokens``). ``field_names`` maps the engine's
    field names to the client's (``max_new_tokens`` → ``max_tokens``) so errors name what the client sent.
    """

    prompt: Prompt
    sampling: SamplingParams
    adapter: str | None = None
    analysis: AnalysisSpec | None = None
    fit_context: bool = False
    top_logprobs: int = 0  # alternatives reported per token (OpenAI's logprobs.top_logprobs)
    request_id: str = field(default_factory=new_request_id)
    field_names: dict[str, str] = field(default_factory=dict)


@dataclass
class AnalysisRequest:
    """Annotate ``completion`` as a response to ``prompt`` (no generation)."""

    prompt: Prompt
    completion: str
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    adapter: str | None = None
    request_id: str = field(default_factory=new_request_id)


@dataclass
class TokenOutput:
    """A generated token as an API shows it: its own text, log-prob and top alternatives."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Timings:
    queue_s: float = 0.0
    generate_s: float = 0.0
    analysis_s: float = 0.0
    total_s: float = 0.0


@dataclass
class RequestOutput:
    """One step of a request's life. A generation yields one per visible delta, then one with
    ``finish_reason`` (generation ended), then, if asked, one with ``analysis``; the last has
    ``finished``. ``text`` and ``token_ids`` are the whole response so far."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta: str = ""
    new_tokens: list[TokenOutput] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    analysis: Analysis | None = None
    finished: bool = False
    timings: Timings = field(default_factory=Timings)


@dataclass
class EngineHealth:
    """Can the engine serve inference now, and how loaded is it."""

    ready: bool
    detail: str
    running: int = 0
    waiting: int = 0
    analyses: int = 0


@runtime_checkable
class EngineClient(Protocol):
    """What the routes may ask of an engine. Every method is safe to call from the event loop."""

    model_name: str
    max_model_len: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Closing the iterator early aborts the request."""
        ...

    async def analyze(self, request: AnalysisRequest) -> RequestOutput:
        """Annotate a given completion; one final output."""
        ...

    async def abort(self, request_id: str) -> None:
        """Drop the request's work at the next unit boundary; its caller gets :class:`Cancelled`."""
        ...

    async def add_adapter(self, name: str, path: Path) -> None:
        """Attach a LoRA adapter under ``name`` (an already validated directory)."""
        ...

    async def remove_adapter(self, name: str) -> None:
        """Detach the adapter ``name``; unknown names are ignored."""
        ...

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, as :meth:`generate` would feed them."""
        ...

    def health(self) -> EngineHealth: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
