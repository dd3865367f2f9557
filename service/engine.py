"""The engine: the one owner of the model. A thread runs continuous batching and analyses between steps;
the event loop talks to it through jobs.

Scheduling, per loop turn: run queued calls (tokenising, adapter loads), admit waiting requests FIFO
while the batch has room (each is prefilled and joins), one decode step for the whole batch, then at
most one pending analysis. Every admitted request advances on every step, and admission is FIFO, so no
request starves. The waiting line is bounded: past ``max_queue`` a submit fails with 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from faithlens import lora
from faithlens.analysis import AnalysisParams, analyze
from faithlens.atman import SaliencyParams
from faithlens.batching import BASE_ADAPTER, DecodeBatch, SequenceState, visible_text
from faithlens.generation import SamplingParams
from faithlens.model import LoadedModel
from faithlens.schema import Analysis
from service.errors import APIError, overloaded
from service.metrics import ServiceMetrics

log = logging.getLogger("faithlens.engine")

EventKind = Literal["delta", "generated", "done", "error"]


@dataclass
class TokenOut:
    """A generated token as the API shows it: its own text, log-prob and top alternatives."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    kind: EventKind
    text: str = ""
    tokens: list[TokenOut] = field(default_factory=list)


@dataclass
class AnalysisRequest:
    params: AnalysisParams
    saliency: SaliencyParams | None


@dataclass
class Job:
    """One request's work, shared by the event loop (reads) and the engine thread (writes)."""

    id: str
    prompt_ids: list[int]
    sampling: SamplingParams | None  # None: analyze a given completion, no generation
    completion_ids: list[int] = field(default_factory=list)
    adapter_name: str | None = None
    adapter_internal: str | None = None
    analysis: AnalysisRequest | None = None
    on_release: Callable[[], None] | None = None
    seq: SequenceState | None = None
    annotations: Analysis | None = None
    error: APIError | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    generated_at: float | None = None
    finished_at: float | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue[Event] | None = None
    tokens_out: list[TokenOut] = field(default_factory=list)
    _cancelled: bool = False
    _emitted_text: int = 0
    _emitted_tokens: int = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to drop this job at its next turn (client went away)."""
        self._cancelled = True

    @property
    def response_ids(self) -> list[int]:
        return self.seq.token_ids if self.seq is not None else self.completion_ids

    def timings(self) -> dict[str, float]:
        end = self.finished_at or time.perf_counter()
        admitted = self.admitted_at or end
        generated = self.generated_at or admitted
        return {
            "queue_s": admitted - self.enqueued_at,
            "generate_s": generated - admitted,
            "analysis_s": end - generated,
            "total_s": end - self.enqueued_at,
        }

    async def events(self) -> AsyncIterator[Event]:
        """Deltas as they are decoded, then ``generated``, then ``done`` (or ``error``)."""
        assert self._events is not None
        while True:
            event = await self._events.get()
            yield event
            if event.kind in ("done", "error"):
                return

    async def result(self) -> Job:
        async for event in self.events():
            if event.kind == "error":
                assert self.error is not None
                raise self.error
        return self

    def _emit(self, event: Event) -> None:
        if self._loop is not None and self._events is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)


class Engine:
    """Owns the model; everything that touches it runs on the engine thread."""

    def __init__(
        self,
        lm: LoadedModel,
        max_batch_size: int,
        max_queue: int,
        metrics: ServiceMetrics,
        retry_after_s: int = 1,
    ) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._batch = DecodeBatch(lm)
        self._jobs_by_row: dict[int, Job] = {}
        self._waiting: deque[Job] = deque()
        self._analyses: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="faithlens-engine", daemon=True)
        self.housekeeping: Callable[[], None] | None = None  # run at every turn (adapter collection)
        self._open = 0  # submitted and not yet closed; bounded by max_batch_size + max_queue

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._analyses)

    # -- the event loop's side ---------------------------------------------------------------------------
    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between two steps and await its result."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def submit(self, job: Job) -> Job:
        """Queue a job; raises 503 ``overloaded`` when the waiting line is full."""
        job._loop = asyncio.get_running_loop()
        job._events = asyncio.Queue()
        with self._wake:
            if not self.alive:
                raise APIError(503, "not_ready", "the engine is not running")
            if self._open >= self.max_queue + self.max_batch_size:
                self.metrics.rejected.inc()
                raise overloaded(self.retry_after_s)
            self._open += 1
            (self._waiting if job.sampling is not None else self._analyses).append(job)
            self.metrics.queue_depth.set(self.queue_depth)
            self._wake.notify()
        return job

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("engine started", extra={"max_batch_size": self.max_batch_size, "max_queue": self.max_queue})
        while True:
            with self._wake:
                while not (
                    self._stopping or self._calls or self._waiting or self._analyses or len(self._batch)
                ):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception:  # a bug must not kill the engine: fail what was running, keep serving
                log.exception("engine turn failed")
                self._fail_running(APIError(500, "internal_error", "internal server error"))
        self._fail_everything()

    def _turn(self) -> None:
        self._run_calls()
        if self.housekeeping is not None:
            self.housekeeping()
        self._drop_cancelled()
        self._admit()
        if len(self._batch):
            self.metrics.batch_size.observe(len(self._batch))
            finished = self._batch.step()
            for row in self._batch.rows:
                self._stream(self._job_of(row))
            for row in finished:
                self._generation_done(self._jobs_by_row.pop(id(row)))
        if self._analyses:
            self._analyse(self._analyses.popleft())
        self.metrics.queue_depth.set(self.queue_depth)

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

    def _job_of(self, row: SequenceState) -> Job:
        return self._jobs_by_row[id(row)]

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._batch.rows) if self._job_of(row).cancelled]
        for row in self._batch.remove(gone):
            self._close(self._jobs_by_row.pop(id(row)), cancelled=True)
        with self._wake:
            for line in (self._waiting, self._analyses):
                for job in [j for j in line if j.cancelled]:
                    line.remove(job)
                    self._close(job, cancelled=True)

    def _admit(self) -> None:
        while len(self._batch) < self.max_batch_size:
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            assert job.sampling is not None
            job.admitted_at = time.perf_counter()
            job.seq = SequenceState(job.prompt_ids, job.sampling, job.adapter_internal or BASE_ADAPTER)
            try:
                self._batch.add(job.seq)
            except Exception:
                log.exception("prefill failed", extra={"job": job.id})
                job.error = APIError(500, "internal_error", "internal server error")
                self._close(job)
                continue
            if job.seq.finished:
                self._stream(job)
                self._generation_done(job)
            else:
                self._jobs_by_row[id(job.seq)] = job
                self._stream(job)

    def _stream(self, job: Job) -> None:
        """Send what became visible since the last event."""
        seq = job.seq
        assert seq is not None
        text = visible_text(seq)
        tokens = len(seq.token_ids) if seq.finished or len(text) == len(seq.text) else job._emitted_tokens
        if len(text) > job._emitted_text or tokens > job._emitted_tokens:
            new = [self._token_out(seq, i) for i in range(job._emitted_tokens, tokens)]
            job.tokens_out.extend(new)
            job._emit(Event("delta", text[job._emitted_text :], new))
            job._emitted_text, job._emitted_tokens = len(text), tokens

    def _token_out(self, seq: SequenceState, i: int) -> TokenOut:
        decode = self.lm.tokenizer.decode
        top = [(decode([t]), lp) for t, lp in seq.top_logprobs[i]] if seq.top_logprobs else []
        return TokenOut(seq.token_ids[i], decode([seq.token_ids[i]]), seq.logprobs[i], top)

    def _generation_done(self, job: Job) -> None:
        assert job.seq is not None
        self._stream(job)
        job.generated_at = time.perf_counter()
        self.metrics.generated_tokens.inc(len(job.seq.token_ids))
        job._emit(Event("generated"))
        if job.analysis is None:
            self._close(job)
        else:
            self._analyses.append(job)

    def _analyse(self, job: Job) -> None:
        if job.generated_at is None:  # an analyze-only job
            job.admitted_at = job.generated_at = time.perf_counter()
        assert job.analysis is not None
        started = time.perf_counter()
        try:
            with lora.active(self.lm, job.adapter_internal):
                job.annotations = analyze(
                    self.lm,
                    job.prompt_ids,
                    job.response_ids,
                    job.analysis.params,
                    adapter=job.adapter_name,
                    saliency=job.analysis.saliency,
                )
        except ValueError as exc:  # parameters that do not fit this sequence (e.g. layers out of range)
            job.error = APIError(400, "invalid_request", str(exc), "analysis")
        except Exception:
            log.exception("analysis failed", extra={"job": job.id})
            job.error = APIError(500, "internal_error", "internal server error")
        self.metrics.analysis_seconds.observe(time.perf_counter() - started)
        self._close(job)

    def _close(self, job: Job, cancelled: bool = False) -> None:
        job.finished_at = time.perf_counter()
        with self._wake:
            self._open -= 1
        if job.on_release is not None:
            job.on_release()
            job.on_release = None
        if cancelled:
            self.metrics.cancelled.inc()
            job.error = APIError(499, "cancelled", "the client went away")
        job._emit(Event("error") if job.error is not None else Event("done"))

    def _fail_running(self, error: APIError) -> None:
        rows = list(range(len(self._batch)))
        for row in self._batch.remove(rows):
            job = self._jobs_by_row.pop(id(row))
            job.error = error
            self._close(job)

    def _fail_everything(self) -> None:
        self._fail_running(APIError(503, "not_ready", "the server is shutting down"))
        for line in (self._waiting, self._analyses):
            while line:
                job = line.popleft()
                job.error = APIError(503, "not_ready", "the server is shutting down")
                self._close(job)
        while self._calls:
            _, future = self._calls.popleft()
            future.cancel()
