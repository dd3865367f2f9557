"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``; the official ``openai`` package works
unchanged. ``faithlens`` in the request adds annotations: a ``faithlens`` field in the response, or, when
streaming, one last chunk (``choices: []``) before ``data: [DONE]``."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from faithlens.engine import (
    EngineError,
    GenerationRequest,
    Prompt,
    RequestOutput,
    TokenOutput,
    new_request_id,
)
from faithlens.params import SamplingParams
from faithlens.schema import Analysis
from service.auth import require
from service.errors import from_engine
from service.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    FinishReason,
    _Common,
    _OpenAIObject,
    chat_logprobs,
    completion_logprobs,
    event_stream,
)
from service.routes.native import ERRORS
from service.schemas import ErrorResponse, Usage
from service.state import (
    ServerState,
    analysis_spec,
    get_state,
    leased_adapter,
    present,
    resolve_model,
    until_disconnected,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS, dependencies=[Depends(require("infer"))])

ObjectT = TypeVar("ObjectT", bound=_OpenAIObject)
_STREAMED = (
    "With `stream: true`, an event stream of `{}` objects, then `data: [DONE]`; an error after the "
    "stream began is sent as one `ErrorResponse` event, with no `[DONE]` after it."
)


def _request(
    state: ServerState, body: _Common, prompt: Prompt, adapter: str | None, requested: int | None, top: int
) -> GenerationRequest:
    """``max_tokens`` unset means what is left of the context (as vLLM), capped by the server limit."""
    param = (
        "max_completion_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens
        else "max_tokens"
    )
    sampling = SamplingParams(
        max_new_tokens=requested or state.settings.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
    )
    return GenerationRequest(
        prompt,
        sampling,
        adapter,
        analysis_spec(body.faithlens),
        fit_context=requested is None,
        top_logprobs=top,
        request_id=new_request_id("gen"),
        field_names={"max_new_tokens": param, "adapter": "model"},
    )


def _usage(output: RequestOutput) -> Usage:
    prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _annotations(output: RequestOutput, body: _Common, state: ServerState) -> Analysis | None:
    if output.analysis is None or body.faithlens is None:
        return None
    adapter = resolve_model(state, body.model)
    return present(output.analysis, body.faithlens, state.model_name, adapter)


def _split(tokens: list[TokenOutput]) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
    return [t.text for t in tokens], [t.logprob for t in tokens], [t.top for t in tokens]


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: event_stream(
            ChatCompletionChunk,
            ErrorResponse,
            documented=(ChatCompletion, ErrorResponse),
            description="A chat completion. " + _STREAMED.format("ChatCompletionChunk"),
        )
    },
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletion | StreamingResponse:
    body.check_supported()
    state = get_state(request)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    top = (body.top_logprobs or 0) if body.logprobs else 0
    requested = body.max_completion_tokens or body.max_tokens
    engine_request = _request(state, body, Prompt(messages=messages), None, requested, top)
    response_id = engine_request.request_id.replace("gen-", "chatcmpl-")
    model = body.model or state.model_name
    created = int(time.time())

    def logprobs_of(tokens: list[TokenOutput]) -> ChatLogprobs | None:
        return chat_logprobs(*_split(tokens)) if body.logprobs else None

    chunk = functools.partial(_chunk, ChatCompletionChunk, response_id, created, model)

    def delta(
        content: ChatDelta, tokens: list[TokenOutput], finish_reason: FinishReason | None = None
    ) -> ChatCompletionChunk:
        logprobs = logprobs_of(tokens) if tokens else None
        return chunk([ChatChunkChoice(delta=content, logprobs=logprobs, finish_reason=finish_reason)])

    if body.stream:
        return await _event_stream(
            state,
            engine_request,
            body,
            delta(ChatDelta(role="assistant", content=""), []),
            lambda text, toks: delta(ChatDelta(content=text), toks),
            lambda reason: delta(ChatDelta(), [], reason),
            chunk,
        )
    output, tokens = await _complete(state, engine_request, body, request)
    choice = ChatChoice(
        message=ChatMessage(content=output.text),
        logprobs=logprobs_of(tokens),
        finish_reason=output.finish_reason,
    )
    return _final(ChatCompletion, output, body, state, response_id, created, model, choice)


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: event_stream(
            CompletionChunk,
            ErrorResponse,
            documented=(Completion, ErrorResponse),
            description="A completion. " + _STREAMED.format("CompletionChunk"),
        )
    },
)
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    body.check_supported()
    state = get_state(request)
    engine_request = _request(
        state, body, Prompt(body.prompt_text()), None, body.max_tokens, body.logprobs or 0
    )
    response_id = engine_request.request_id.replace("gen-", "cmpl-")
    model = body.model or state.model_name
    created = int(time.time())
    offset = 0

    def logprobs_of(tokens: list[TokenOutput]) -> CompletionLogprobs | None:
        nonlocal offset
        if body.logprobs is None:
            return None
        out = completion_logprobs(*_split(tokens), offset)
        offset += sum(len(t.text) for t in tokens)
        return out

    def choice(text: str, tokens: list[TokenOutput], finish_reason: FinishReason | None) -> CompletionChoice:
        return CompletionChoice(text=text, logprobs=logprobs_of(tokens), finish_reason=finish_reason)

    chunk = functools.partial(_chunk, CompletionChunk, response_id, created, model)

    if body.stream:
        return await _event_stream(
            state,
            engine_request,
            body,
            None,
            lambda text, toks: chunk([choice(text, toks, None)]),
            lambda reason: chunk([choice("", [], reason)]),
            chunk,
        )
    output, tokens = await _complete(state, engine_request, body, request)
    return _final(
        Completion,
        output,
        body,
        state,
        response_id,
        created,
        model,
        choice(output.text, tokens, output.finish_reason),
    )


async def _complete(
    state: ServerState, engine_request: GenerationRequest, body: _Common, request: Request
) -> tuple[RequestOutput, list[TokenOutput]]:
    """Run a non-streaming request to its end: its last output and every generated token."""
    tokens: list[TokenOutput] = []

    async def outputs() -> AsyncIterator[RequestOutput]:
        async with leased_adapter(state, resolve_model(state, body.model), "model") as adapter:
            engine_request.adapter = adapter
            async for output in state.engine.generate(engine_request):
                tokens.extend(output.new_tokens)
                yield output

    output = await until_disconnected(outputs(), request, engine_request.field_names)
    return output, tokens


def _chunk(
    kind: type[ObjectT], response_id: str, created: int, model: str, choices: list[Any], **extra: Any
) -> ObjectT:
    """One OpenAI object of type ``kind`` around ``choices``: a stream chunk, or the final object.
    ``extra`` is ``usage`` and ``faithlens``."""
    return kind(id=response_id, created=created, model=model, choices=choices, **extra)


def _final(
    kind: type[ObjectT],
    output: RequestOutput,
    body: _Common,
    state: ServerState,
    response_id: str,
    created: int,
    model: str,
    choice: BaseModel,
) -> ObjectT:
    """The non-streaming answer: one choice, usage, and the annotations when they were asked for."""
    return _chunk(
        kind,
        response_id,
        created,
        model,
        [choice],
        usage=_usage(output),
        faithlens=_annotations(output, body, state),
    )


def _sse(data: BaseModel | str) -> str:
    """One event. pydantic's JSON writes a float that is not finite as null: an event is always JSON."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json(by_alias=True)
    return f"data: {data}\n\n"


async def _event_stream(
    state: ServerState,
    engine_request: GenerationRequest,
    body: _Common,
    first: _OpenAIObject | None,
    on_delta: Callable[[str, list[TokenOutput]], _OpenAIObject],
    on_finish: Callable[[str], _OpenAIObject],
    chunk: Callable[..., _OpenAIObject],
) -> StreamingResponse:
    """OpenAI's SSE framing. The first output is awaited before the response starts, so errors of
    admission (unknown model, limits, overload) keep their HTTP status; later errors become an error
    event. If the client goes away, the generator is closed, which aborts the request."""
    lease = leased_adapter(state, resolve_model(state, body.model), "model")
    engine_request.adapter = await lease.__aenter__()
    outputs = state.engine.generate(engine_request)
    try:
        head = await anext(outputs)
    except BaseException as exc:
        await lease.__aexit__(None, None, None)
        if isinstance(exc, EngineError):
            raise from_engine(exc, engine_request.field_names) from exc
        raise

    async def rest() -> AsyncIterator[RequestOutput]:
        yield head
        async for output in outputs:
            yield output

    async def stream() -> AsyncIterator[str]:
        finish_sent = False
        last: RequestOutput | None = None
        try:
            if first is not None:
                yield _sse(first)
            async for output in rest():
                last = output
                if output.delta or output.new_tokens:
                    yield _sse(on_delta(output.delta, output.new_tokens))
                if output.finish_reason is not None and not finish_sent:
                    finish_sent = True
                    yield _sse(on_finish(output.finish_reason))
            assert last is not None
            if (annotations := _annotations(last, body, state)) is not None:
                yield _sse(chunk([], faithlens=annotations))
            if body.include_usage:
                yield _sse(chunk([], usage=_usage(last)))
            yield _sse("[DONE]")
        except EngineError as exc:
            yield _sse(ErrorResponse.model_validate(from_engine(exc, engine_request.field_names).body()))
        finally:
            with contextlib.suppress(BaseException):
                await outputs.aclose()  # type: ignore[attr-defined]
            await lease.__aexit__(None, None, None)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
