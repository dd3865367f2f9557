"""``Faithlens`` and ``AsyncFaithlens``, shaped like the ``openai`` package's clients.

Every API call is described once, as a :class:`Call` built by one of the ``*_call`` functions below (method,
path, body, query, how to parse the answer). The sync client runs calls with ``httpx.Client`` and the async
one with ``httpx.AsyncClient``; each public method of either client, and of its resources (``models``,
``adapters``, ``jobs``, ``audits``), only builds the call and runs it, so the two stay the same shape (a test compares
their signatures). Retries with exponential back-off on 503 and connection errors, honouring
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from faithlens_client import errors
from faithlens_client.audit import AuditReport
from faithlens_client.params import AnalysisOptions, SaliencyOptions, SamplingOptions
from faithlens_client.types import (
    Adapter,
    Audit,
    AuditEvent,
    AuditReportSummary,
    AuditResult,
    Capabilities,
    Checkpoint,
    Generation,
    Job,
    JobEvent,
    ModelCard,
)

T = TypeVar("T")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ProgressCallback = Callable[[Job, list[JobEvent]], None]
AuditProgressCallback = Callable[[Audit, list[AuditEvent]], None]


def _body(body: Any) -> Any:
    return body


@dataclass
class Call(Generic[T]):
    """One API call. For a streamed call, ``parse`` takes each SSE payload (or NDJSON line) and returns None
    to skip it. ``text``: ``parse`` gets the body as text, not JSON (an HTML page)."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    parse: Callable[[Any], T] = _body
    text: bool = False


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """``Retry-After`` when the server gives one, else 0.5 s doubling, capped at 8 s."""
    if response is not None:
        try:
            return min(float(response.headers.get("retry-after", "")), 60.0)
        except ValueError:
            pass
    return min(0.5 * 2**attempt, 8.0)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise errors.from_response(response.status_code, body)


class _EndOfStream(Exception):
    """The server sent ``data: [DONE]``."""


def _ndjson_item(call: Call[T], line: str) -> T | None:
    """What one NDJSON line carries for ``call``: None for a blank line."""
    return call.parse(json.loads(line)) if line.strip() else None


def _sse_item(call: Call[T], line: str) -> T | None:
    """What one SSE line carries for ``call``: None for nothing, the typed error for an error payload."""
    if not line.startswith("data: "):
        return None
    data = line.removeprefix("data: ")
    if data == "[DONE]":
        raise _EndOfStream
    payload = json.loads(data)
    if isinstance(payload, dict) and "error" in payload and len(payload) == 1:
        raise errors.from_response(500, payload)
    return call.parse(payload)


# -- request builders shared by both clients ------------------------------------------------------------------
def _analysis(
    analysis: AnalysisOptions | dict[str, Any] | None, saliency: str | SaliencyOptions | dict[str, Any] | None
) -> dict[str, Any] | None:
    """The ``analysis`` body, checked against the server's bounds (``params.py``) before it is sent."""
    if analysis is None and saliency is None:
        return None
    options = (
        analysis if isinstance(analysis, AnalysisOptions) else AnalysisOptions.model_validate(analysis or {})
    )
    if saliency is not None:
        method = {"method": saliency} if isinstance(saliency, str) else saliency
        options = options.model_copy(update={"saliency": SaliencyOptions.model_validate(method)})
        options.model_fields_set.add("saliency")
    return options.body()


def generate_call(
    prompt: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    adapter: str | None = None,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
    saliency: str | SaliencyOptions | dict[str, Any] | None = None,
    chat: bool | None = None,
) -> Call[Generation]:
    SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    body = _drop_none(
        {
            "prompt": prompt,
            "messages": messages,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
            "adapter": adapter,
            "analysis": _analysis(analysis, saliency),
            "chat": chat,
        }
    )
    return Call("POST", "/v1/generate", body, parse=Generation.model_validate)


def analyze_call(
    prompt: str | None = None,
    completion: str = "",
    *,
    messages: list[dict[str, Any]] | None = None,
    adapter: str | None = None,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
    saliency: str | SaliencyOptions | dict[str, Any] | None = None,
    chat: bool | None = None,
) -> Call[Generation]:
    body = _drop_none(
        {
            "prompt": prompt,
            "messages": messages,
            "completion": completion,
            "adapter": adapter,
            "analysis": _analysis(analysis, saliency) or {},
            "chat": chat,
        }
    )
    return Call("POST", "/v1/analyze", body, parse=Generation.model_validate)


def audit_call(
    prompt: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    completion: str | None = None,
    saliency: str | SaliencyOptions | dict[str, Any] | None = "atman",
    adapter: str | None = None,
    max_new_tokens: int = 256,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
) -> Call[AuditReport]:
    """``analyze`` of ``completion`` when given, else a greedy ``generate``; a plain ``prompt`` is a user
    message either way (the chat template is applied)."""
    chat = prompt is not None or None
    if completion is not None:
        call = analyze_call(
            prompt,
            completion,
            messages=messages,
            adapter=adapter,
            analysis=analysis,
            saliency=saliency,
            chat=chat,
        )
    else:
        call = generate_call(
            prompt,
            messages=messages,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            analysis=analysis or {},
            saliency=saliency,
            chat=chat,
        )
    return Call(
        call.method,
        call.path,
        call.json,
        parse=lambda body: AuditReport.from_generation(Generation.model_validate(body)),
    )


def chat_call(
    messages: list[dict[str, Any]],
    model: str | None = None,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
    stream: bool = False,
    **options: Any,
) -> Call[dict[str, Any]]:
    """An OpenAI chat completion; ``analysis`` goes in the ``faithlens`` extension field."""
    body = _drop_none(
        {
            "messages": messages,
            "model": model,
            "faithlens": _analysis(analysis, None),
            "stream": stream or None,
            **options,
        }
    )
    return Call("POST", "/v1/chat/completions", body)


def capabilities_call() -> Call[Capabilities]:
    return Call("GET", "/v1/capabilities", parse=Capabilities.model_validate)


def follow_job_call(job_id: str) -> Call[JobEvent | None]:
    """The job's events as SSE; the stream's last payload (the job's final status) is skipped."""

    def event(payload: Any) -> JobEvent | None:
        if isinstance(payload, dict) and payload.get("object") == "fine_tuning.job.event":
            return JobEvent.model_validate(payload)
        return None

    return Call("GET", f"/v1/jobs/{job_id}/events", params={"follow": "true"}, parse=event)


def list_models_call() -> Call[list[ModelCard]]:
    return Call("GET", "/v1/models", parse=lambda b: [ModelCard.model_validate(m) for m in b["data"]])


def list_adapters_call() -> Call[list[Adapter]]:
    return Call("GET", "/v1/adapters", parse=lambda b: [Adapter.model_validate(a) for a in b["data"]])


def load_adapter_call(name: str, path: str) -> Call[Adapter]:
    return Call("POST", "/v1/adapters/load", {"name": name, "path": path}, parse=Adapter.model_validate)


def unload_adapter_call(name: str) -> Call[Adapter]:
    return Call("POST", "/v1/adapters/unload", {"name": name}, parse=Adapter.model_validate)


def create_job_call(
    *,
    method: dict[str, Any],
    training_data: str | list[dict[str, Any]] | dict[str, Any] = "gsm8k-train",
    adapter_name: str,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    model: str | None = None,
    validation_data: str | None = None,
) -> Call[Job]:
    body = _drop_none(
        {
            "method": method,
            "training_data": training_data,
            "validation_data": validation_data,
            "adapter_name": adapter_name,
            "seed": seed,
            "metadata": metadata,
            "model": model,
        }
    )
    return Call("POST", "/v1/jobs", body, parse=Job.model_validate)


def list_jobs_call(limit: int = 20, after: str | None = None) -> Call[list[Job]]:
    params = _drop_none({"limit": limit, "after": after})
    return Call("GET", "/v1/jobs", params=params, parse=lambda b: [Job.model_validate(j) for j in b["data"]])


def get_job_call(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{job_id}", parse=Job.model_validate)


def cancel_job_call(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", parse=Job.model_validate)


def job_checkpoints_call(job_id: str) -> Call[list[Checkpoint]]:
    return Call(
        "GET",
        f"/v1/jobs/{job_id}/checkpoints",
        parse=lambda b: [Checkpoint.model_validate(c) for c in b["data"]],
    )


def job_events_call(job_id: str, after: int = 0) -> Call[list[JobEvent]]:
    return Call(
        "GET",
        f"/v1/jobs/{job_id}/events",
        params={"after": after},
        parse=lambda b: [JobEvent.model_validate(e) for e in b["data"]],
    )


AuditInput = str | list[dict[str, Any]] | dict[str, Any]


def create_audit_call(
    input: AuditInput,
    *,
    limit: int | None = None,
    model: str | None = None,
    adapter: str | None = None,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
    saliency: str | SaliencyOptions | dict[str, Any] | None = None,
    sampling: SamplingOptions | dict[str, Any] | None = None,
    reports: list[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Call[Audit]:
    """``input``: a dataset name (``gsm8k-dev``, ``gsm8k-train``; ``limit`` its first rows), a list of rows
    ``{id?, prompt | messages, completion?, reference?}``, or ``{"jsonl": text}`` (one row per line)."""
    if sampling is not None and not isinstance(sampling, SamplingOptions):
        sampling = SamplingOptions.model_validate(sampling)
    body = _drop_none(
        {
            "input": input,
            "limit": limit,
            "model": model,
            "adapter": adapter,
            "analysis": _analysis(analysis, saliency),
            "sampling": sampling.body() if sampling is not None else None,
            "reports": reports,
            "metadata": metadata,
        }
    )
    return Call("POST", "/v1/audits", body, parse=Audit.model_validate)


def list_audits_call(limit: int = 20, after: str | None = None) -> Call[list[Audit]]:
    params = _drop_none({"limit": limit, "after": after})
    return Call(
        "GET", "/v1/audits", params=params, parse=lambda b: [Audit.model_validate(a) for a in b["data"]]
    )


def get_audit_call(audit_id: str) -> Call[Audit]:
    return Call("GET", f"/v1/audits/{audit_id}", parse=Audit.model_validate)


def cancel_audit_call(audit_id: str) -> Call[Audit]:
    return Call("POST", f"/v1/audits/{audit_id}/cancel", parse=Audit.model_validate)


def audit_events_call(audit_id: str, after: int = 0) -> Call[list[AuditEvent]]:
    return Call(
        "GET",
        f"/v1/audits/{audit_id}/events",
        params={"after": after},
        parse=lambda b: [AuditEvent.model_validate(e) for e in b["data"]],
    )


def audit_results_call(audit_id: str) -> Call[AuditResult]:
    """NDJSON: one :class:`AuditResult` per line, in input order."""
    return Call("GET", f"/v1/audits/{audit_id}/results", parse=AuditResult.model_validate)


def audit_report_call(audit_id: str) -> Call[AuditReportSummary]:
    return Call("GET", f"/v1/audits/{audit_id}/report", parse=AuditReportSummary.model_validate)


def audit_report_html_call(audit_id: str) -> Call[str]:
    return Call("GET", f"/v1/audits/{audit_id}/report", params={"format": "html"}, text=True)


# -- resources: sync and async twins, one line per method ------------------------------------------------------
class Models:
    def __init__(self, client: Faithlens) -> None:
        self._client = client

    def list(self) -> list[ModelCard]:
        """The base model and the served adapters."""
        return self._client._run(list_models_call())


class AsyncModels:
    def __init__(self, client: AsyncFaithlens) -> None:
        self._client = client

    async def list(self) -> list[ModelCard]:
        """The base model and the served adapters."""
        return await self._client._run(list_models_call())


class Adapters:
    def __init__(self, client: Faithlens) -> None:
        self._client = client

    def list(self) -> list[Adapter]:
        return self._client._run(list_adapters_call())

    def load(self, name: str, path: str) -> Adapter:
        """Serve the adapter at ``path`` (inside the server's adapter store) as ``name``."""
        return self._client._run(load_adapter_call(name, path))

    def unload(self, name: str) -> Adapter:
        return self._client._run(unload_adapter_call(name))


class AsyncAdapters:
    def __init__(self, client: AsyncFaithlens) -> None:
        self._client = client

    async def list(self) -> list[Adapter]:
        return await self._client._run(list_adapters_call())

    async def load(self, name: str, path: str) -> Adapter:
        """Serve the adapter at ``path`` (inside the server's adapter store) as ``name``."""
        return await self._client._run(load_adapter_call(name, path))

    async def unload(self, name: str) -> Adapter:
        return await self._client._run(unload_adapter_call(name))


class Jobs:
    def __init__(self, client: Faithlens) -> None:
        self._client = client

    def create(
        self,
        *,
        method: dict[str, Any],
        training_data: str | list[dict[str, Any]] | dict[str, Any] = "gsm8k-train",
        adapter_name: str,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        validation_data: str | None = None,
    ) -> Job:
        """``method`` is ``{"type": "grpo" | "atmanrl", ...hyperparameters}`` (``"backend": "trl"`` trains
        it with TRL's GRPOTrainer instead of the native trainer); ``training_data`` a data set's name
        (``gsm8k-train``, ``arith-add:1-50/train``), a list of ``{question, answer}`` rows or
        ``{"jsonl": text}``. ``validation_data`` names a data set evaluated every ``eval_steps`` steps (set
        in ``method``); the job's metrics events carry ``eval_accuracy``."""
        return self._client._run(
            create_job_call(
                method=method,
                training_data=training_data,
                adapter_name=adapter_name,
                seed=seed,
                metadata=metadata,
                model=model,
                validation_data=validation_data,
            )
        )

    def list(self, limit: int = 20, after: str | None = None) -> list[Job]:
        return self._client._run(list_jobs_call(limit, after))

    def get(self, job_id: str) -> Job:
        return self._client._run(get_job_call(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._client._run(cancel_job_call(job_id))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return self._client._run(job_checkpoints_call(job_id))

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        return self._client._run(job_events_call(job_id, after))


class AsyncJobs:
    def __init__(self, client: AsyncFaithlens) -> None:
        self._client = client

    async def create(
        self,
        *,
        method: dict[str, Any],
        training_data: str | list[dict[str, Any]] | dict[str, Any] = "gsm8k-train",
        adapter_name: str,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        validation_data: str | None = None,
    ) -> Job:
        """``method`` is ``{"type": "grpo" | "atmanrl", ...hyperparameters}`` (``"backend": "trl"`` trains
        it with TRL's GRPOTrainer instead of the native trainer); ``training_data`` a data set's name
        (``gsm8k-train``, ``arith-add:1-50/train``), a list of ``{question, answer}`` rows or
        ``{"jsonl": text}``. ``validation_data`` names a data set evaluated every ``eval_steps`` steps (set
        in ``method``); the job's metrics events carry ``eval_accuracy``."""
        return await self._client._run(
            create_job_call(
                method=method,
                training_data=training_data,
                adapter_name=adapter_name,
                seed=seed,
                metadata=metadata,
                model=model,
                validation_data=validation_data,
            )
        )

    async def list(self, limit: int = 20, after: str | None = None) -> list[Job]:
        return await self._client._run(list_jobs_call(limit, after))

    async def get(self, job_id: str) -> Job:
        return await self._client._run(get_job_call(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._client._run(cancel_job_call(job_id))

    async def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return await self._client._run(job_checkpoints_call(job_id))

    async def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        return await self._client._run(job_events_call(job_id, after))


class Audits:
    def __init__(self, client: Faithlens) -> None:
        self._client = client

    def create(
        self,
        input: AuditInput,
        *,
        limit: int | None = None,
        model: str | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        sampling: SamplingOptions | dict[str, Any] | None = None,
        reports: list[str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Audit:
        """Audit a dataset: ``input`` is a dataset name (``gsm8k-dev``; ``limit`` its first rows), a list of
        rows ``{id?, prompt | messages, completion?, reference?}`` or ``{"jsonl": text}``. Rows without a
        completion are generated with ``sampling``."""
        return self._client._run(
            create_audit_call(
                input,
                limit=limit,
                model=model,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                sampling=sampling,
                reports=reports,
                metadata=metadata,
            )
        )

    def list(self, limit: int = 20, after: str | None = None) -> list[Audit]:
        return self._client._run(list_audits_call(limit, after))

    def get(self, audit_id: str) -> Audit:
        return self._client._run(get_audit_call(audit_id))

    def cancel(self, audit_id: str) -> Audit:
        return self._client._run(cancel_audit_call(audit_id))

    def events(self, audit_id: str, after: int = 0) -> list[AuditEvent]:
        return self._client._run(audit_events_call(audit_id, after))

    def wait(
        self,
        audit_id: str,
        on_progress: AuditProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Audit:
        """Poll until the audit finishes; ``on_progress(audit, new_events)`` after each poll with news (its
        ``request_counts`` say how far it is)."""
        progress = _Progress(audit_id, on_progress, timeout, what="audit")
        while True:
            audit = self.get(audit_id)
            if progress.update(audit, self.events(audit_id, after=progress.seen)):
                return audit
            time.sleep(poll_interval)

    def results(self, audit_id: str) -> Iterator[AuditResult]:
        """One typed row per input row, in input order, streamed (while the audit runs: the rows done)."""
        return self._client._lines(audit_results_call(audit_id))

    def report(self, audit_id: str) -> AuditReportSummary:
        """The reports of a completed audit (409 ``ConflictError`` before)."""
        return self._client._run(audit_report_call(audit_id))

    def report_html(self, audit_id: str) -> str:
        """The report as a self-contained HTML page."""
        return self._client._run(audit_report_html_call(audit_id))


class AsyncAudits:
    def __init__(self, client: AsyncFaithlens) -> None:
        self._client = client

    async def create(
        self,
        input: AuditInput,
        *,
        limit: int | None = None,
        model: str | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        sampling: SamplingOptions | dict[str, Any] | None = None,
        reports: list[str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Audit:
        """Audit a dataset: ``input`` is a dataset name (``gsm8k-dev``; ``limit`` its first rows), a list of
        rows ``{id?, prompt | messages, completion?, reference?}`` or ``{"jsonl": text}``. Rows without a
        completion are generated with ``sampling``."""
        return await self._client._run(
            create_audit_call(
                input,
                limit=limit,
                model=model,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                sampling=sampling,
                reports=reports,
                metadata=metadata,
            )
        )

    async def list(self, limit: int = 20, after: str | None = None) -> list[Audit]:
        return await self._client._run(list_audits_call(limit, after))

    async def get(self, audit_id: str) -> Audit:
        return await self._client._run(get_audit_call(audit_id))

    async def cancel(self, audit_id: str) -> Audit:
        return await self._client._run(cancel_audit_call(audit_id))

    async def events(self, audit_id: str, after: int = 0) -> list[AuditEvent]:
        return await self._client._run(audit_events_call(audit_id, after))

    async def wait(
        self,
        audit_id: str,
        on_progress: AuditProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Audit:
        """Poll until the audit finishes; ``on_progress(audit, new_events)`` after each poll with news (its
        ``request_counts`` say how far it is)."""
        progress = _Progress(audit_id, on_progress, timeout, what="audit")
        while True:
            audit = await self.get(audit_id)
            if progress.update(audit, await self.events(audit_id, after=progress.seen)):
                return audit
            await asyncio.sleep(poll_interval)

    def results(self, audit_id: str) -> AsyncIterator[AuditResult]:
        """One typed row per input row, in input order, streamed: ``async for row in
        client.audits.results(audit_id)``."""
        return self._client._lines(audit_results_call(audit_id))

    async def report(self, audit_id: str) -> AuditReportSummary:
        """The reports of a completed audit (409 ``ConflictError`` before)."""
        return await self._client._run(audit_report_call(audit_id))

    async def report_html(self, audit_id: str) -> str:
        """The report as a self-contained HTML page."""
        return await self._client._run(audit_report_html_call(audit_id))


# -- the clients -----------------------------------------------------------------------------------------------
class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> None:
        self.base_url = (base_url or os.environ.get("FAITHLENS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("FAITHLENS_API_KEY")
        self.timeout, self.max_retries = timeout, max_retries

    @property
    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "faithlens-client/0.1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _retry_in(self, attempt: int, response: httpx.Response | None, exc: Exception | None) -> float | None:
        """Seconds to wait before the next attempt, or None when this outcome is final."""
        retryable = response is None or response.status_code == 503
        if attempt < self.max_retries and retryable:
            return _retry_delay(attempt, response)
        if response is None:
            raise errors.APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
        return None


@dataclass
class _Progress:
    """What ``wait`` tracks between polls (of a job or an audit), shared by both clients."""

    job_id: str
    on_progress: Callable[[Any, list[Any]], None] | None
    timeout: float | None
    seen: int = 0
    started: float = field(default_factory=time.monotonic)
    what: str = "job"
    last: Any = None

    def update(self, job: Job | Audit, new: list[Any]) -> bool:
        """Report news (new events, or for an audit new counts); True when it is done. Raises TimeoutError
        past the deadline."""
        self.seen += len(new)
        counts = getattr(job, "request_counts", None)
        moved = counts is not None and counts != self.last
        self.last = counts
        if self.on_progress is not None and (new or moved or job.finished):
            self.on_progress(job, new)
        if job.finished:
            return True
        if self.timeout is not None and time.monotonic() - self.started > self.timeout:
            raise TimeoutError(f"{self.what} {self.job_id} still {job.status} after {self.timeout}s")
        return False


class Faithlens(_Base):
    """Synchronous client. ``api_key`` defaults to ``$FAITHLENS_API_KEY``, ``base_url`` to
    ``$FAITHLENS_BASE_URL`` (else http://127.0.0.1:8000)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=self._headers
        )
        self.models = Models(self)
        self.adapters = Adapters(self)
        self.jobs = Jobs(self)
        self.audits = Audits(self)

    def __enter__(self) -> Faithlens:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            response, failure = None, None
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, params=call.params or None
                )
            except httpx.TransportError as exc:
                failure = exc
            delay = self._retry_in(attempt, response, failure)
            if delay is None:
                assert response is not None
                _raise_for(response)
                return call.parse(response.text if call.text else response.json())
            time.sleep(delay)
            attempt += 1

    def _lines(self, call: Call[T | None]) -> Iterator[T]:
        """An NDJSON answer, parsed line by line as it arrives."""
        with self._http.stream(
            call.method, call.path, json=call.json, params=call.params or None
        ) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if (item := _ndjson_item(call, line)) is not None:
                    yield item

    def _stream(self, call: Call[T | None]) -> Iterator[T]:
        with self._http.stream(
            call.method, call.path, json=call.json, params=call.params or None
        ) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            try:
                for line in response.iter_lines():
                    if (item := _sse_item(call, line)) is not None:
                        yield item
            except _EndOfStream:
                return

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        chat: bool | None = None,
    ) -> Generation:
        """Generate; with ``analysis`` (``{}`` for the defaults) or ``saliency``, annotated."""
        return self._run(
            generate_call(
                prompt,
                messages=messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                chat=chat,
            )
        )

    def analyze(
        self,
        prompt: str | None = None,
        completion: str = "",
        *,
        messages: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        chat: bool | None = None,
    ) -> Generation:
        """Annotate a completion you have."""
        return self._run(
            analyze_call(
                prompt,
                completion,
                messages=messages,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                chat=chat,
            )
        )

    def audit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        completion: str | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = "atman",
        adapter: str | None = None,
        max_new_tokens: int = 256,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
    ) -> AuditReport:
        """Annotate a completion you have, or generate one (greedy) and annotate it."""
        return self._run(
            audit_call(
                prompt,
                messages=messages,
                completion=completion,
                saliency=saliency,
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                analysis=analysis,
            )
        )

    def capabilities(self) -> Capabilities:
        """The saliency methods, credit strategies, granularities and metrics this server offers."""
        return self._run(capabilities_call())

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: bool = False,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI chat completion (a dict), or with ``stream=True`` an iterator of chunks; annotations come as
        ``response["faithlens"]`` / a last chunk with ``faithlens``."""
        call = chat_call(messages, model, analysis, stream, **options)
        return self._stream(call) if stream else self._run(call)

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """``chat(..., stream=True)``, typed as an iterator."""
        return self._stream(chat_call(messages, model, analysis, True, **options))

    def follow_job(self, job_id: str) -> Iterator[JobEvent]:
        """The job's events (past ones first) as they happen, until the job finishes."""
        return self._stream(follow_job_call(job_id))

    def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Poll until the job finishes; ``on_progress(job, new_events)`` after each poll with news."""
        progress = _Progress(job_id, on_progress, timeout)
        while True:
            job = self.jobs.get(job_id)
            if progress.update(job, self.jobs.events(job_id, after=progress.seen)):
                return job
            time.sleep(poll_interval)


class AsyncFaithlens(_Base):
    """Asynchronous client: the same calls as :class:`Faithlens`, awaited (streams are async iterators)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=self._headers
        )
        self.models = AsyncModels(self)
        self.adapters = AsyncAdapters(self)
        self.jobs = AsyncJobs(self)
        self.audits = AsyncAudits(self)

    async def __aenter__(self) -> AsyncFaithlens:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            response, failure = None, None
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params or None
                )
            except httpx.TransportError as exc:
                failure = exc
            delay = self._retry_in(attempt, response, failure)
            if delay is None:
                assert response is not None
                _raise_for(response)
                return call.parse(response.text if call.text else response.json())
            await asyncio.sleep(delay)
            attempt += 1

    async def _lines(self, call: Call[T | None]) -> AsyncIterator[T]:
        """An NDJSON answer, parsed line by line as it arrives."""
        async with self._http.stream(
            call.method, call.path, json=call.json, params=call.params or None
        ) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if (item := _ndjson_item(call, line)) is not None:
                    yield item

    async def _stream(self, call: Call[T | None]) -> AsyncIterator[T]:
        async with self._http.stream(
            call.method, call.path, json=call.json, params=call.params or None
        ) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            try:
                async for line in response.aiter_lines():
                    if (item := _sse_item(call, line)) is not None:
                        yield item
            except _EndOfStream:
                return

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        chat: bool | None = None,
    ) -> Generation:
        """Generate; with ``analysis`` (``{}`` for the defaults) or ``saliency``, annotated."""
        return await self._run(
            generate_call(
                prompt,
                messages=messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                chat=chat,
            )
        )

    async def analyze(
        self,
        prompt: str | None = None,
        completion: str = "",
        *,
        messages: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = None,
        chat: bool | None = None,
    ) -> Generation:
        """Annotate a completion you have."""
        return await self._run(
            analyze_call(
                prompt,
                completion,
                messages=messages,
                adapter=adapter,
                analysis=analysis,
                saliency=saliency,
                chat=chat,
            )
        )

    async def audit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        completion: str | None = None,
        saliency: str | SaliencyOptions | dict[str, Any] | None = "atman",
        adapter: str | None = None,
        max_new_tokens: int = 256,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
    ) -> AuditReport:
        """Annotate a completion you have, or generate one (greedy) and annotate it."""
        return await self._run(
            audit_call(
                prompt,
                messages=messages,
                completion=completion,
                saliency=saliency,
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                analysis=analysis,
            )
        )

    async def capabilities(self) -> Capabilities:
        """The saliency methods, credit strategies, granularities and metrics this server offers."""
        return await self._run(capabilities_call())

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: bool = False,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """OpenAI chat completion (a dict), or with ``stream=True`` an async iterator of chunks (``await`` the
        call, then ``async for``); annotations come as ``response["faithlens"]`` / a last chunk with
        ``faithlens``."""
        call = chat_call(messages, model, analysis, stream, **options)
        return self._stream(call) if stream else await self._run(call)

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        analysis: AnalysisOptions | dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """``chat(..., stream=True)`` without the ``await``: ``async for chunk in client.chat_stream(...)``."""
        return self._stream(chat_call(messages, model, analysis, True, **options))

    def follow_job(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events (past ones first) as they happen, until the job finishes:
        ``async for event in client.follow_job(job_id)``."""
        return self._stream(follow_job_call(job_id))

    async def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Poll until the job finishes; ``on_progress(job, new_events)`` after each poll with news."""
        progress = _Progress(job_id, on_progress, timeout)
        while True:
            job = await self.jobs.get(job_id)
            if progress.update(job, await self.jobs.events(job_id, after=progress.seen)):
                return job
            await asyncio.sleep(poll_interval)
