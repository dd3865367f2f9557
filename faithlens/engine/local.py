"""LocalEngine: continuous batching on an in-process transformers model, with analyses in time slices.

One thread owns the model. Each turn it runs pending adapter changes (only while no analysis is in
flight: an analysis sees one model from its first unit to its last), drops aborted and expired requests,
admits waiting requests FIFO while the batch has room, runs one decode step for the whole batch, and then
gives the analysis in flight one slice (:mod:`faithlens.slicing`).

The fair policy: while requests decode, a slice lasts ``analysis_share`` times the decode step it follows,
so streams keep ``1 / (1 + share)`` of the time and the analysis the rest; with nothing to decode, slices
of ``analysis_idle_slice_s`` keep new requests from waiting longer than that. A slice ends at the first checkpoint
past its budget, so it may overrun by part of a unit; the next slice is shortened by that much, which
keeps both the share and the gaps between tokens steady. Analyses run one at a time, FIFO.

Everything heavy happens after admission and off the event loop: prompts are bounded in characters, then
tokenised on a tokenizer pool, and every analysis gets a cost estimate (:mod:`faithlens.cost`) and a
deadline before it is queued. A request holds one of ``max_batch_size + max_queue`` slots from the moment
it is accepted; past that, :class:`Overloaded`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from faithlens import cost, lora
from faithlens.analysis import analyze
from faithlens.batching import BASE_ADAPTER, DecodeBatch, SequenceState, visible_text
from faithlens.engine.errors import (
    AdapterNotFound,
    AnalysisTooCostly,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidRequest,
    NotReady,
    Overloaded,
)
from faithlens.engine.protocol import (
    AnalysisRequest,
    AnalysisSpec,
    EngineHealth,
    GenerationRequest,
    Prompt,
    RequestOutput,
    Timings,
    TokenOutput,
)
from faithlens.engine.tokenization import TokenizerPool
from faithlens.model import LoadedModel, encode_completion, encode_prompt, unwrap
from faithlens.params import SamplingParams
from faithlens.slicing import SlicedRun, install_checkpoints

log = logging.getLogger("faithlens.engine")


@dataclass
class EngineConfig:
    """The engine's limits and scheduling knobs (the service fills them from its settings)."""

    max_batch_size: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 4096
    max_prompt_chars: int = 65536
    max_new_tokens: int = 1024
    max_analysis_cost: float = 30000.0
    analysis_timeout_s: float = 120.0
    analysis_share: float = 2.0
    analysis_idle_slice_s: float = 0.1
    tokenizer_threads: int = 2
    retry_after_s: int = 1


class EngineObserver(Protocol):
    """Where the engine reports what it does (the service's Prometheus telemetry implements it)."""

    def on_step(self, batch_size: int) -> None: ...
    def on_prompt(self, tokens: int) -> None: ...
    def on_generated(self, tokens: int) -> None: ...
    def on_queue(self, depth: int) -> None: ...
    def on_analysis(self, seconds: float) -> None: ...
    def on_cancelled(self) -> None: ...
    def on_rejected(self) -> None: ...
    def on_timeout(self) -> None: ...


class _Silent:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


@dataclass
class _Request:
    """One request's state: written by the engine thread, read by the event loop through its queue."""

    id: str
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    sampling: SamplingParams | None = None
    top_logprobs: int = 0
    adapter: str | None = None
    analysis: AnalysisSpec | None = None
    seq: SequenceState | None = None
    run: SlicedRun | None = None
    deadline: float | None = None
    aborted: bool = False
    closed: bool = False
    accepted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    generated_at: float | None = None
    analysis_started: float | None = None
    finished_at: float | None = None
    emitted_text: int = 0
    emitted_tokens: int = 0

    @property
    def response_ids(self) -> list[int]:
        return self.seq.token_ids if self.seq is not None else self.completion_ids

    def timings(self) -> Timings:
        end = self.finished_at or time.perf_counter()
        admitted = self.admitted_at or self.analysis_started or end
        generated = self.generated_at or admitted
        return Timings(
            admitted - self.accepted_at, generated - admitted, end - generated, end - self.accepted_at
        )

    def send(self, item: RequestOutput | EngineError) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class LocalEngine:
    """The continuous-batching engine on a :class:`LoadedModel`; implements :class:`EngineClient`."""

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, observer: Any = None) -> None:
        self.lm = lm
        self.config = config or EngineConfig()
        self.observer: EngineObserver = observer or _Silent()
        self.model_name = lm.name
        self.max_model_len = int(getattr(unwrap(lm.model).config, "max_position_embeddings", 0) or 1 << 30)
        self._tokenizers = TokenizerPool(lm.tokenizer, self.config.tokenizer_threads)
        self._decode: DecodeBatch | None = None  # made on the engine thread (_make_batch)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._by_row: dict[int, _Request] = {}
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._analyses: deque[_Request] = deque()
        self._active: _Request | None = None
        self._overshoot = 0.0  # seconds the last analysis slice ran past its budget
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._adapters: set[str] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="faithlens-engine", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        install_checkpoints(self.lm.model)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._start_error is not None:
            raise self._start_error

    @property
    def _batch(self) -> DecodeBatch:
        assert self._decode is not None, "the engine has not started"
        return self._decode

    def _make_batch(self) -> DecodeBatch:
        """The static KV cache, allocated once: a slot per batch row, each holding the longest request the
        limits admit (on CUDA the slots may shrink to what free memory holds: docs/operations.md).

        Made on the engine thread, like every other tensor op of the engine: on a CPU, OpenMP work that
        another thread (the event loop) ran first makes the engine thread's own parallel ops about 3×
        slower (measured: a decode step of the tiny model 2.5 → 7.2 ms after a zeroing on the main thread).
        """
        return DecodeBatch(
            self.lm,
            slots=self.config.max_batch_size,
            max_context=min(self.max_model_len, self.config.max_prompt_tokens + self.config.max_new_tokens),
        )

    async def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join, 30)
        self._tokenizers.close()

    def health(self) -> EngineHealth:
        alive = self._thread.is_alive() and not self._stopping
        return EngineHealth(
            ready=alive,
            detail="running" if alive else "the engine is not running",
            running=len(self._decode) if self._decode is not None else 0,
            waiting=len(self._waiting),
            analyses=len(self._analyses) + (self._active is not None),
        )

    # -- the EngineClient calls --------------------------------------------------------------------------------
    async def tokenize(self, prompt: Prompt, param: str = "prompt") -> list[int]:
        self._check_characters(prompt, param)
        return await self._tokenizers.run(
            lambda tok: encode_prompt(tok, prompt.text, prompt.messages, prompt.chat)
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        names = request.field_names
        req = self._accept(request.request_id)
        try:
            req.prompt_ids = await self._prompt_ids(request.prompt, names.get("prompt", "prompt"))
            req.sampling = self._sampling(request, len(req.prompt_ids))
            req.top_logprobs = request.top_logprobs
            req.adapter = self._adapter(request.adapter, names.get("adapter", "adapter"))
            if request.analysis is not None:
                n = len(req.prompt_ids) + req.sampling.max_new_tokens
                self._check_analysis(request.analysis, [" x"] * n, len(req.prompt_ids), bound=True)
                req.analysis = request.analysis
            self._enqueue(req, self._waiting)
        except BaseException:
            self._release(req)
            raise
        async for output in self._outputs(req):
            yield output

    async def analyze(self, request: AnalysisRequest) -> RequestOutput:
        req = self._accept(request.request_id)
        try:
            req.prompt_ids = await self._prompt_ids(request.prompt, "prompt")
            self._check_characters(Prompt(request.completion), "completion")
            ids, texts = await self._tokenizers.run(
                lambda tok: _encode_response(tok, req.prompt_ids, request.completion)
            )
            if not ids:
                raise InvalidRequest("the completion is empty after tokenisation", "completion")
            total = len(req.prompt_ids) + len(ids)
            if total > self.max_model_len or len(ids) > self.config.max_prompt_tokens:
                raise ContextLengthExceeded(f"prompt + completion is {total} tokens", "completion")
            req.completion_ids = ids
            req.adapter = self._adapter(request.adapter, "adapter")
            self._check_analysis(request.analysis, texts, len(req.prompt_ids), bound=False)
            req.analysis = request.analysis
            req.deadline = req.accepted_at + self.config.analysis_timeout_s
            self._enqueue(req, self._analyses)
        except BaseException:
            self._release(req)
            raise
        final = None
        async for output in self._outputs(req):
            final = output
        assert final is not None
        return final

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        with self._wake:
            req = self._requests.get(request_id)
            if req is not None:
                req.aborted = True
                self._wake.notify()

    async def add_adapter(self, name: str, path: Path) -> None:
        await self._call(lambda: self._attach(name, path))

    async def remove_adapter(self, name: str) -> None:
        await self._call(lambda: self._detach(name))

    # -- admission (event loop) ---------------------------------------------------------------------------------
    def _accept(self, request_id: str) -> _Request:
        """Take a slot before any work: the request counts towards the limit from here on."""
        with self._wake:
            if not self._thread.is_alive() or self._stopping:
                raise NotReady("the engine is not running")
            if len(self._requests) >= self.config.max_queue + self.config.max_batch_size:
                self.observer.on_rejected()
                raise Overloaded(self.config.retry_after_s)
            if request_id in self._requests:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            req = self._requests[request_id] = _Request(request_id, asyncio.get_running_loop())
            return req

    def _release(self, req: _Request) -> None:
        with self._wake:
            if self._requests.get(req.id) is req:
                del self._requests[req.id]

    def _enqueue(self, req: _Request, line: deque[_Request]) -> None:
        self.observer.on_prompt(len(req.prompt_ids))
        with self._wake:
            line.append(req)
            self._wake.notify()

    async def _outputs(self, req: _Request) -> AsyncIterator[RequestOutput]:
        """The request's outputs until its last; leaving early (client gone) aborts it."""
        try:
            while True:
                item = await req.outputs.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not req.closed:
                self._abort(req.id)

    def _check_characters(self, prompt: Prompt, param: str) -> None:
        chars, limit = prompt.characters(), self.config.max_prompt_chars
        if chars > limit:
            raise ContextLengthExceeded(f"the {param} has {chars} characters; the limit is {limit}", param)

    async def _prompt_ids(self, prompt: Prompt, param: str) -> list[int]:
        param = "messages" if prompt.messages is not None else param
        ids = await self.tokenize(prompt, param)
        if not ids:
            raise InvalidRequest("the prompt is empty after tokenisation", param)
        limit = self.config.max_prompt_tokens
        if len(ids) > limit:
            raise ContextLengthExceeded(f"the prompt has {len(ids)} tokens; the limit is {limit}", param)
        return ids

    def _sampling(self, request: GenerationRequest, prompt_len: int) -> SamplingParams:
        param = request.field_names.get("max_new_tokens", "max_new_tokens")
        sampling, limit = request.sampling, self.config.max_new_tokens
        if request.fit_context:
            left = min(limit, self.max_model_len - prompt_len)
            if left < 1:
                raise ContextLengthExceeded(
                    f"the prompt fills the model's context of {self.max_model_len}", param
                )
            sampling = sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, left)})
        if sampling.max_new_tokens > limit:
            raise ContextLengthExceeded(f"{param} is {sampling.max_new_tokens}; the limit is {limit}", param)
        if prompt_len + sampling.max_new_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"prompt ({prompt_len}) + {param} ({sampling.max_new_tokens}) exceeds the model's context of "
                f"{self.max_model_len} tokens",
                param,
            )
        return sampling

    def _adapter(self, name: str | None, param: str) -> str | None:
        if name is not None and name not in self._adapters:
            raise AdapterNotFound(f"no adapter named {name!r} is loaded", param)
        return name

    def _check_analysis(self, spec: AnalysisSpec, texts: list[str], prompt_len: int, bound: bool) -> None:
        """Refuse, before any work, what cannot run or would cost more than the limit."""
        saliency = spec.saliency
        try:
            spec.params.resolved_layers(unwrap(self.lm.model).config.num_hidden_layers)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "analysis.layers") from exc
        if bound and saliency is not None:  # the response is not known yet: its longest, most costly form
            saliency = saliency.model_copy(update={"target": [len(texts) - 1], "granularity": "token"})
        try:
            estimate = cost.analysis_cost(texts, prompt_len, saliency)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "analysis.saliency.target") from exc
        limit = self.config.max_analysis_cost
        if estimate > limit:
            raise AnalysisTooCostly(
                _too_costly_message(texts, prompt_len, saliency, estimate, limit, bound), estimate, limit
            )

    # -- calls onto the engine thread ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        future: Future = Future()
        with self._wake:
            if not self._thread.is_alive() or self._stopping:
                raise NotReady("the engine is not running")
            self._calls.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def _attach(self, name: str, path: Path) -> None:
        lora.attach(self.lm, path, name)
        self._adapters.add(name)

    def _detach(self, name: str) -> None:
        lora.detach(self.lm, name)
        self._adapters.discard(name)

    # -- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._decode = self._make_batch()
        except BaseException as exc:  # start() raises it: a cache that does not fit, a bad setting
            self._start_error = exc
            return
        finally:
            self._started.set()
        log.info(
            "engine started",
            extra={
                "config": dataclasses.asdict(self.config),
                "kv_cache": dataclasses.asdict(self._batch.plan),
                "cuda_graphs": self._batch.captured,
            },
        )
        while True:
            with self._wake:
                while not (
                    self._stopping
                    or self._calls
                    or self._waiting
                    or self._analyses
                    or self._active is not None
                    or len(self._batch)
                ):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception:  # a bug must not kill the engine: fail what was running, keep serving
                log.exception("engine turn failed")
                self._fail_running(InternalError("internal server error"))
        self._fail_everything(NotReady("the server is shutting down"))

    def _turn(self) -> None:
        if self._active is None:
            self._run_calls()
        self._drop_aborted_and_expired()
        self._admit()
        step_s = self._decode_step()
        self._analysis_slice(step_s)
        self.observer.on_queue(len(self._waiting) + len(self._analyses))

    def _run_calls(self) -> None:
        while True:
            with self._wake:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _drop_aborted_and_expired(self) -> None:
        now = time.perf_counter()
        gone = [i for i, row in enumerate(self._batch.rows) if self._by_row[id(row)].aborted]
        for row in self._batch.remove(gone):
            self._close(self._by_row.pop(id(row)), _cancelled(self.observer))
        active = self._active
        if active is not None and (active.aborted or _expired(active, now)):
            error = _cancelled(self.observer) if active.aborted else _deadline(active, self.observer)
            self._stop_active(error)
        with self._wake:
            for line in (self._waiting, self._analyses):
                for req in [r for r in line if r.aborted or _expired(r, now)]:
                    line.remove(req)
                    self._close(
                        req, _cancelled(self.observer) if req.aborted else _deadline(req, self.observer)
                    )

    def _admit(self) -> None:
        while self._batch.has_free_slot():
            with self._wake:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            assert req.sampling is not None
            req.admitted_at = time.perf_counter()
            req.seq = SequenceState(
                req.prompt_ids, req.sampling, req.adapter or BASE_ADAPTER, req.top_logprobs
            )
            try:
                self._batch.add(req.seq)
            except Exception:
                log.exception("prefill failed", extra={"request": req.id})
                self._close(req, InternalError("internal server error"))
                continue
            if req.seq.finished:
                self._generation_done(req)
            else:
                self._by_row[id(req.seq)] = req
                self._stream(req)

    def _decode_step(self) -> float:
        if not len(self._batch):
            return 0.0
        started = time.perf_counter()
        self.observer.on_step(len(self._batch))
        finished = self._batch.step()
        for row in self._batch.rows:
            self._stream(self._by_row[id(row)])
        for row in finished:
            self._generation_done(self._by_row.pop(id(row)))
        return time.perf_counter() - started

    def _stream(self, req: _Request) -> None:
        """Send what became visible since the last output."""
        seq = req.seq
        assert seq is not None
        text = visible_text(seq)
        tokens = len(seq.token_ids) if seq.finished or len(text) == len(seq.text) else req.emitted_tokens
        if len(text) > req.emitted_text or tokens > req.emitted_tokens:
            new = [self._token_output(seq, i) for i in range(req.emitted_tokens, tokens)]
            delta = text[req.emitted_text :]
            req.emitted_text, req.emitted_tokens = len(text), tokens
            req.send(self._output(req, text=text, delta=delta, new_tokens=new))

    def _token_output(self, seq: SequenceState, i: int) -> TokenOutput:
        decode = self.lm.tokenizer.decode
        top = [(decode([t]), lp) for t, lp in seq.top_logprobs[i]] if seq.top_logprobs else []
        return TokenOutput(seq.token_ids[i], decode([seq.token_ids[i]]), seq.logprobs[i], top)

    def _output(self, req: _Request, **fields: Any) -> RequestOutput:
        return RequestOutput(
            request_id=req.id,
            prompt_token_ids=req.prompt_ids,
            token_ids=list(req.response_ids),
            timings=req.timings(),
            **fields,
        )

    def _generation_done(self, req: _Request) -> None:
        assert req.seq is not None
        self._stream(req)
        req.generated_at = time.perf_counter()
        self.observer.on_generated(len(req.seq.token_ids))
        if req.analysis is None:
            self._close(req)
            return
        req.deadline = req.generated_at + self.config.analysis_timeout_s
        req.send(self._output(req, text=req.seq.text, finish_reason=req.seq.finish_reason))
        with self._wake:
            self._analyses.append(req)

    # -- analyses, in slices ----------------------------------------------------------------------------------
    def _analysis_slice(self, step_s: float) -> None:
        if self._active is None and not self._start_next_analysis():
            return
        req = self._active
        assert req is not None and req.run is not None
        budget = (
            self.config.analysis_share * step_s if len(self._batch) else self.config.analysis_idle_slice_s
        )
        budget -= self._overshoot  # a unit cannot be cut: what the last slice overran, this one gives back
        started = time.perf_counter()
        with lora.active(self.lm, req.adapter):
            done = req.run.run_slice(max(budget, 0.0))
        self._overshoot = min(max(time.perf_counter() - started - max(budget, 0.0), 0.0), 1.0)
        if done:
            self._finish_active()

    def _start_next_analysis(self) -> bool:
        with self._wake:
            if self._calls or not self._analyses:  # adapter changes go first, between analyses
                return False
            req = self._analyses.popleft()
        req.analysis_started = time.perf_counter()
        if req.generated_at is None:
            req.admitted_at = req.generated_at = req.analysis_started
        if req.deadline is None:
            req.deadline = req.accepted_at + self.config.analysis_timeout_s
        spec = req.analysis
        assert spec is not None
        prompt_ids, response_ids = req.prompt_ids, list(req.response_ids)
        req.run = SlicedRun(
            lambda: analyze(self.lm, prompt_ids, response_ids, spec.params, saliency=spec.saliency),
            name=f"faithlens-analysis-{req.id}",
        )
        self._active = req
        return True

    def _finish_active(self) -> None:
        req, self._active = self._active, None
        assert req is not None and req.run is not None
        run = req.run
        self.observer.on_analysis(time.perf_counter() - (req.analysis_started or time.perf_counter()))
        if isinstance(run.error, EngineError):
            self._close(req, run.error)
        elif isinstance(run.error, ValueError):  # options that do not fit this sequence
            self._close(req, InvalidRequest(str(run.error), "analysis"))
        elif run.error is not None:
            log.error("analysis failed", extra={"request": req.id}, exc_info=run.error)
            self._close(req, InternalError("internal server error"))
        else:
            self._close(req, analysis=run.result)

    def _stop_active(self, error: EngineError) -> None:
        req = self._active
        assert req is not None and req.run is not None
        with lora.active(self.lm, req.adapter):
            req.run.stop(error)
        self._finish_active()

    # -- endings ----------------------------------------------------------------------------------------------
    def _close(self, req: _Request, error: EngineError | None = None, analysis: Any = None) -> None:
        if req.closed:
            return
        req.closed = True
        req.finished_at = time.perf_counter()
        self._release(req)
        if error is not None:
            req.send(error)
            return
        text = req.seq.text if req.seq is not None else self.lm.tokenizer.decode(req.completion_ids)
        finish_reason = req.seq.finish_reason if req.seq is not None else None
        req.send(self._output(req, text=text, finish_reason=finish_reason, analysis=analysis, finished=True))

    def _fail_running(self, error: EngineError) -> None:
        for row in self._batch.remove(list(range(len(self._batch.rows)))):
            self._close(self._by_row.pop(id(row)), error)
        if self._active is not None:
            self._stop_active(error)

    def _fail_everything(self, error: EngineError) -> None:
        self._fail_running(error)
        with self._wake:
            pending = [*self._waiting, *self._analyses]
            self._waiting.clear()
            self._analyses.clear()
            calls = list(self._calls)
            self._calls.clear()
        for req in pending:
            self._close(req, error)
        for _, future in calls:
            future.cancel()


def _encode_response(tokenizer: Any, prompt_ids: list[int], completion: str) -> tuple[list[int], list[str]]:
    """The completion's ids and every token's text (prompt and completion), for the cost estimate."""
    ids = encode_completion(tokenizer, completion)
    return ids, [tokenizer.decode([i]) for i in [*prompt_ids, *ids]]


def _expired(req: _Request, now: float) -> bool:
    return req.deadline is not None and now > req.deadline


def _cancelled(observer: EngineObserver) -> Cancelled:
    observer.on_cancelled()
    return Cancelled("the client went away")


def _deadline(req: _Request, observer: EngineObserver) -> DeadlineExceeded:
    observer.on_timeout()
    spent = time.perf_counter() - req.accepted_at
    return DeadlineExceeded(
        f"the analysis did not finish within its deadline ({spent:.0f} s since the request was accepted); "
        "its work was dropped. Ask for less (a coarser granularity, atman_grad, a shorter text) or run it "
        "as an audit job",
        "analysis",
    )


def _too_costly_message(
    texts: list[str], prompt_len: int, saliency: Any, estimate: float, limit: float, bound: bool
) -> str:
    what = "at most " if bound else ""
    message = (
        f"the analysis would cost about {what}{estimate:,.0f} forward-token units; the limit is {limit:,.0f}"
        " (FAITHLENS_MAX_ANALYSIS_COST)."
    )
    fits = cost.alternatives(texts, prompt_len, saliency, limit)
    if fits:
        message += " These would fit: " + ", ".join(f"{a.change} (≈{a.cost:,.0f})" for a in fits) + "."
    elif bound:
        message += " Lower max_new_tokens, or generate first and analyse with /v1/analyze."
    else:
        message += " Shorten the text, or run it as an audit job."
    return message
