"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``; the official ``openai`` package works
unchanged. ``faithlens`` in the request adds annotations: a ``faithlens`` field in the response, or, when
streaming, one last chunk (``choices: []``) before ``data: [DONE]``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from faithlens.generation import SamplingParams
from service.auth import require
from service.engine import Job, TokenOut
from service.errors import APIError
from service.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    chat_logprobs,
    completion_logprobs,
)
from service.routes.native import ERRORS
from service.state import (
    ServerState,
    check_new_tokens,
    filter_metrics,
    finish,
    get_state,
    new_job,
    resolve_model,
    tokenize_prompt,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS, dependencies=[Depends(require("infer"))])


def _sampling(
    state: ServerState, body: _Common, prompt_len: int, requested: int | None, top: int
) -> SamplingParams:
    """``max_tokens`` unset means what is left of the context (as vLLM), capped by the server limit."""
    param = (
        "max_completion_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens
        else "max_tokens"
    )
    max_new = requested or min(state.settings.max_new_tokens, state.max_model_len - prompt_len)
    check_new_tokens(state, prompt_len, max_new, param)
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        top_logprobs=top,
    )


def _usage(job: Job) -> dict[str, int]:
    completion = len(job.response_ids)
    return {
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": completion,
        "total_tokens": len(job.prompt_ids) + completion,
    }


def _annotations(job: Job, body: _Common, state: ServerState) -> dict[str, Any] | None:
    if job.annotations is None or body.faithlens is None:
        return None
    analysis = filter_metrics(job.annotations, body.faithlens)
    analysis.model = state.model_name
    return analysis.to_json_dict()


def _split(tokens: list[TokenOut]) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
    return [t.text for t in tokens], [t.logprob for t in tokens], [t.top for t in tokens]


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    body.check_supported()
    state = get_state(request)
    adapter = resolve_model(state, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await tokenize_prompt(state, None, messages, False)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    sampling = _sampling(state, body, len(prompt_ids), body.max_completion_tokens or body.max_tokens, top)
    job = new_job(state, prompt_ids, sampling, adapter, body.faithlens, adapter_param="model")
    model = body.model or state.model_name
    created = int(time.time())
    job_id = job.id.replace("gen-", "chatcmpl-")

    def logprobs_of(tokens: list[TokenOut]) -> dict | None:
        return chat_logprobs(*_split(tokens)) if body.logprobs else None

    if body.stream:

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {
                "id": job_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }

        def delta(content: dict, tokens: list[TokenOut], finish_reason: str | None = None) -> dict:
            return chunk(
                [
                    {
                        "index": 0,
                        "delta": content,
                        "logprobs": logprobs_of(tokens) if tokens else None,
                        "finish_reason": finish_reason,
                    }
                ]
            )

        first = delta({"role": "assistant", "content": ""}, [])
        return _event_stream(
            job,
            body,
            state,
            first,
            lambda text, toks: delta({"content": text}, toks),
            lambda reason: delta({}, [], reason),
            chunk,
        )

    await finish(job, request)
    assert job.seq is not None
    message = {"role": "assistant", "content": job.seq.text, "refusal": None}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs_of(job.tokens_out),
        "finish_reason": job.seq.finish_reason,
    }
    return _final(job, body, state, job_id, "chat.completion", created, model, choice)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    body.check_supported()
    state = get_state(request)
    adapter = resolve_model(state, body.model)
    prompt_ids = await tokenize_prompt(state, body.prompt_text(), None, False)
    sampling = _sampling(state, body, len(prompt_ids), body.max_tokens, body.logprobs or 0)
    job = new_job(state, prompt_ids, sampling, adapter, body.faithlens, adapter_param="model")
    model = body.model or state.model_name
    created = int(time.time())
    job_id = job.id.replace("gen-", "cmpl-")
    offset = 0

    def logprobs_of(tokens: list[TokenOut]) -> dict | None:
        nonlocal offset
        if body.logprobs is None:
            return None
        out = completion_logprobs(*_split(tokens), offset)
        offset += sum(len(t.text) for t in tokens)
        return out

    def choice(text: str, tokens: list[TokenOut], finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs_of(tokens), "finish_reason": finish_reason}

    if body.stream:

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {
                "id": job_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }

        return _event_stream(
            job,
            body,
            state,
            None,
            lambda text, toks: chunk([choice(text, toks, None)]),
            lambda reason: chunk([choice("", [], reason)]),
            chunk,
        )

    await finish(job, request)
    assert job.seq is not None
    return _final(
        job,
        body,
        state,
        job_id,
        "text_completion",
        created,
        model,
        choice(job.seq.text, job.tokens_out, job.seq.finish_reason),
    )


def _final(
    job: Job,
    body: _Common,
    state: ServerState,
    job_id: str,
    kind: str,
    created: int,
    model: str,
    choice: dict,
) -> JSONResponse:
    """The non-streaming answer: one choice, usage, and the annotations when they were asked for."""
    payload = {
        "id": job_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": _usage(job),
    }
    if (annotations := _annotations(job, body, state)) is not None:
        payload["faithlens"] = annotations
    return JSONResponse(payload)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _event_stream(
    job: Job,
    body: _Common,
    state: ServerState,
    first: dict | None,
    on_delta: Callable[[str, list[TokenOut]], dict],
    on_finish: Callable[[str], dict],
    chunk: Callable[..., dict],
) -> StreamingResponse:
    """OpenAI's SSE framing. If the client goes away, the generator is closed and the job cancelled."""

    async def stream() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            async for event in job.events():
                if event.kind == "delta":
                    yield _sse(on_delta(event.text, event.tokens))
                elif event.kind == "generated":
                    assert job.seq is not None
                    yield _sse(on_finish(job.seq.finish_reason or "stop"))
                elif event.kind == "error":
                    error = job.error or APIError(500, "internal_error", "internal server error")
                    yield _sse(error.body())
                    return
            if (annotations := _annotations(job, body, state)) is not None:
                yield _sse(chunk([], faithlens=annotations))
            if body.include_usage:
                yield _sse(chunk([], usage=_usage(job)))
            yield _sse("[DONE]")
        finally:
            if job.finished_at is None:
                job.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
