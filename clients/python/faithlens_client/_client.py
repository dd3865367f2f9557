"""``Faithlens`` and ``AsyncFaithlens``, shaped like the ``openai`` package's clients.

Every API call is described once, as a :class:`Call` (method, path, body, how to parse the answer); the
sync client runs calls with ``httpx.Client`` and the async one with ``httpx.AsyncClient``, so the resource
classes below serve both. Retries with exponential back-off on 503 and connection errors, honouring
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
from faithlens_client.types import Adapter, Checkpoint, Generation, Job, JobEvent, ModelCard

T = TypeVar("T")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass
class Call(Generic[T]):
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    parse: Callable[[Any], T] = lambda body: body  # type: ignore[assignment, return-value]


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


def _sse_data(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload and len(payload) == 1:
            raise errors.from_response(500, payload)
        yield payload


# -- request builders shared by both clients ------------------------------------------------------------------
def _analysis(
    analysis: dict[str, Any] | None, saliency: str | dict[str, Any] | None
) -> dict[str, Any] | None:
    if saliency is None:
        return analysis
    options = {"method": saliency} if isinstance(saliency, str) else saliency
    return {**(analysis or {}), "saliency": options}


def generate_call(
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    adapter: str | None = None,
    analysis: dict[str, Any] | None = None,
    saliency: str | dict | None = None,
    chat: bool | None = None,
) -> Call[Generation]:
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
    messages: list[dict] | None = None,
    adapter: str | None = None,
    analysis: dict[str, Any] | None = None,
    saliency: str | dict | None = None,
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


def chat_body(
    messages: list[dict], model: str | None, analysis: dict | None, stream: bool, **options: Any
) -> dict:
    return _drop_none(
        {"messages": messages, "model": model, "faithlens": analysis, "stream": stream or None, **options}
    )


class _Models:
    def __init__(self, client: Any) -> None:
        self._client = client

    def list(self):
        return self._client._run(
            Call("GET", "/v1/models", parse=lambda b: [ModelCard.model_validate(m) for m in b["data"]])
        )


class _Adapters:
    def __init__(self, client: Any) -> None:
        self._client = client

    def list(self):
        return self._client._run(
            Call("GET", "/v1/adapters", parse=lambda b: [Adapter.model_validate(a) for a in b["data"]])
        )

    def load(self, name: str, path: str):
        return self._client._run(
            Call("POST", "/v1/adapters/load", {"name": name, "path": path}, parse=Adapter.model_validate)
        )

    def unload(self, name: str):
        return self._client._run(
            Call("POST", "/v1/adapters/unload", {"name": name}, parse=Adapter.model_validate)
        )


class _Jobs:
    def __init__(self, client: Any) -> None:
        self._client = client

    def create(
        self,
        *,
        method: dict[str, Any],
        training_data: str | list[dict] = "gsm8k-train",
        adapter_name: str,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
    ):
        """``method`` is ``{"type": "grpo" | "atmanrl", ...hyperparameters}``."""
        body = _drop_none(
            {
                "method": method,
                "training_data": training_data,
                "adapter_name": adapter_name,
                "seed": seed,
                "metadata": metadata,
                "model": model,
            }
        )
        return self._client._run(Call("POST", "/v1/jobs", body, parse=Job.model_validate))

    def list(self, limit: int = 20, after: str | None = None):
        params = _drop_none({"limit": limit, "after": after})
        return self._client._run(
            Call("GET", "/v1/jobs", params=params, parse=lambda b: [Job.model_validate(j) for j in b["data"]])
        )

    def get(self, job_id: str):
        return self._client._run(Call("GET", f"/v1/jobs/{job_id}", parse=Job.model_validate))

    def cancel(self, job_id: str):
        return self._client._run(Call("POST", f"/v1/jobs/{job_id}/cancel", parse=Job.model_validate))

    def checkpoints(self, job_id: str):
        return self._client._run(
            Call(
                "GET",
                f"/v1/jobs/{job_id}/checkpoints",
                parse=lambda b: [Checkpoint.model_validate(c) for c in b["data"]],
            )
        )

    def events(self, job_id: str, after: int = 0):
        return self._client._run(
            Call(
                "GET",
                f"/v1/jobs/{job_id}/events",
                params={"after": after},
                parse=lambda b: [JobEvent.model_validate(e) for e in b["data"]],
            )
        )


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> None:
        self.base_url = (base_url or os.environ.get("FAITHLENS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("FAITHLENS_API_KEY")
        self.timeout, self.max_retries = timeout, max_retries
        self.models, self.adapters, self.jobs = _Models(self), _Adapters(self), _Jobs(self)

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
    """What ``wait`` tracks between polls, shared by both clients."""

    job_id: str
    on_progress: Callable[[Job, list[JobEvent]], None] | None
    timeout: float | None
    seen: int = 0
    started: float = field(default_factory=time.monotonic)

    def update(self, job: Job, new: list[JobEvent]) -> bool:
        """Report news; True when the job is done. Raises TimeoutError past the deadline."""
        self.seen += len(new)
        if self.on_progress is not None and (new or job.finished):
            self.on_progress(job, new)
        if job.finished:
            return True
        if self.timeout is not None and time.monotonic() - self.started > self.timeout:
            raise TimeoutError(f"job {self.job_id} still {job.status} after {self.timeout}s")
        return False


class Faithlens(_Base):
    """Synchronous client. ``api_key`` defaults to ``$FAITHLENS_API_KEY``."""

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
                return call.parse(response.json())
            time.sleep(delay)
            attempt += 1

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Generation:
        return self._run(generate_call(prompt, **kwargs))

    def analyze(self, prompt: str | None = None, completion: str = "", **kwargs: Any) -> Generation:
        return self._run(analyze_call(prompt, completion, **kwargs))

    def chat(
        self,
        messages: list[dict],
        *,
        model: str | None = None,
        stream: bool = False,
        analysis: dict | None = None,
        **options: Any,
    ) -> dict | Iterator[dict]:
        """OpenAI chat completion (a dict), or with ``stream=True`` an iterator of chunks; annotations come as
        ``response["faithlens"]`` / a last chunk with ``faithlens``."""
        body = chat_body(messages, model, analysis, stream, **options)
        if not stream:
            return self._run(Call("POST", "/v1/chat/completions", body))
        return self._stream("/v1/chat/completions", body)

    def _stream(
        self, path: str, body: dict | None, method: str = "POST", params: dict | None = None
    ) -> Iterator[Any]:
        with self._http.stream(method, path, json=body, params=params) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            yield from _sse_data(response.iter_lines())

    def follow_job(self, job_id: str) -> Iterator[JobEvent]:
        """Events as they happen, until the job finishes."""
        for payload in self._stream(f"/v1/jobs/{job_id}/events", None, "GET", {"follow": "true"}):
            if payload.get("object") == "fine_tuning.job.event":
                yield JobEvent.model_validate(payload)

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[Job, list[JobEvent]], None] | None = None,
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

    def audit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        completion: str | None = None,
        saliency: str | None = "atman",
        adapter: str | None = None,
        max_new_tokens: int = 256,
        analysis: dict | None = None,
    ) -> AuditReport:
        """Annotate a completion you have, or generate one (greedy) and annotate it."""
        if completion is not None:
            result = self.analyze(
                prompt, completion, messages=messages, adapter=adapter, analysis=analysis, saliency=saliency
            )
        else:
            result = self.generate(
                prompt,
                messages=messages,
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                analysis=analysis or {},
                saliency=saliency,
                chat=prompt is not None or None,
            )
        return AuditReport.from_generation(result)


class AsyncFaithlens(_Base):
    """Asynchronous client with the same calls, awaited."""

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
                return call.parse(response.json())
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> Generation:
        return await self._run(generate_call(prompt, **kwargs))

    async def analyze(self, prompt: str | None = None, completion: str = "", **kwargs: Any) -> Generation:
        return await self._run(analyze_call(prompt, completion, **kwargs))

    async def chat(
        self, messages: list[dict], *, model: str | None = None, analysis: dict | None = None, **options: Any
    ) -> dict:
        return await self._run(
            Call("POST", "/v1/chat/completions", chat_body(messages, model, analysis, False, **options))
        )

    async def chat_stream(
        self, messages: list[dict], *, model: str | None = None, analysis: dict | None = None, **options: Any
    ) -> AsyncIterator[dict]:
        body = chat_body(messages, model, analysis, True, **options)
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                for payload in _sse_data(iter([line])):
                    yield payload

    async def wait(
        self,
        job_id: str,
        on_progress: Callable[[Job, list[JobEvent]], None] | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        progress = _Progress(job_id, on_progress, timeout)
        while True:
            job = await self.jobs.get(job_id)
            if progress.update(job, await self.jobs.events(job_id, after=progress.seen)):
                return job
            await asyncio.sleep(poll_interval)
