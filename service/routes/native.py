"""faithlens' own endpoints: annotated generation and analysis of a given completion."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, Request

from faithlens.engine import AnalysisRequest, GenerationRequest, Prompt, RequestOutput, new_request_id
from service.auth import require
from service.schemas import (
    AnalysisOptions,
    AnalyzeRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    PromptInput,
    Timings,
    Usage,
)
from service.state import ServerState, analysis_spec, get_state, leased_adapter, present, until_disconnected

# Every other error has the same body (500 internal_error, 405, ...); "default" also keeps FastAPI from
# documenting a 422, which this server never sends (an invalid body is a 400).
ERRORS: dict[int | str, dict] = {
    **{status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503, 504)},
    "default": {"model": ErrorResponse, "description": "Any other error (docs/api.md lists the codes)."},
}
router = APIRouter(
    prefix="/v1", tags=["faithlens"], responses=ERRORS, dependencies=[Depends(require("infer"))]
)


def _prompt(body: PromptInput) -> Prompt:
    return Prompt(body.prompt, body.message_dicts(), body.chat)


def _response(
    state: ServerState,
    output: RequestOutput,
    kind: str,
    adapter: str | None,
    options: AnalysisOptions | None,
) -> GenerateResponse:
    prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
    annotations = output.analysis
    if annotations is not None and options is not None:
        annotations = present(annotations, options, state.model_name, adapter)
    return GenerateResponse(
        id=output.request_id,
        object=kind,
        model=state.model_name,
        adapter=adapter,
        text=output.text,
        finish_reason=output.finish_reason,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        timings=Timings(**vars(output.timings)),
        annotations=annotations,
    )


@router.post("/generate", response_model=GenerateResponse, response_model_by_alias=True)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """Generate a continuation, annotated per token when ``analysis`` is given."""
    state = get_state(request)
    sampling = body.sampling()
    async with leased_adapter(state, body.adapter, "adapter") as adapter:
        engine_request = GenerationRequest(
            _prompt(body), sampling, adapter, analysis_spec(body.analysis), request_id=new_request_id("gen")
        )
        output = await until_disconnected(state.engine.generate(engine_request), request)
    return _response(state, output, "faithlens.generation", body.adapter, body.analysis)


@router.post("/analyze", response_model=GenerateResponse, response_model_by_alias=True)
async def analyze(body: AnalyzeRequest, request: Request) -> GenerateResponse:
    """Annotate a completion the client already has (no generation)."""
    state = get_state(request)
    async with leased_adapter(state, body.adapter, "adapter") as adapter:
        engine_request = AnalysisRequest(
            _prompt(body), body.completion, analysis_spec(body.analysis), adapter, new_request_id("ana")
        )
        output = await until_disconnected(_one(state.engine.analyze(engine_request)), request)
    return _response(state, output, "faithlens.analysis", body.adapter, body.analysis)


async def _one(awaitable: Awaitable[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """An awaitable's result as a one-item async iterator (so one disconnect watcher serves both)."""
    yield await awaitable
