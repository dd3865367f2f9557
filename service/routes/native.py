"""faithlens' own endpoints: annotated generation and analysis of a given completion."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from faithlens.generation import SamplingParams
from service.auth import require
from service.engine import Job
from service.errors import APIError
from service.schemas import AnalyzeRequest, ErrorResponse, GenerateRequest, GenerateResponse, Timings, Usage
from service.state import (
    ServerState,
    check_new_tokens,
    filter_metrics,
    finish,
    get_state,
    new_job,
    tokenize_prompt,
)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
router = APIRouter(
    prefix="/v1", tags=["faithlens"], responses=ERRORS, dependencies=[Depends(require("infer"))]
)


def _response(state: ServerState, job: Job, kind: str, options) -> GenerateResponse:
    completion = len(job.response_ids)
    annotations = filter_metrics(job.annotations, options) if job.annotations is not None else None
    if annotations is not None:
        annotations.model = state.model_name
    return GenerateResponse(
        id=job.id,
        object=kind,
        model=state.model_name,
        adapter=job.adapter_name,
        text=job.seq.text if job.seq is not None else state.lm.tokenizer.decode(job.completion_ids),
        finish_reason=job.seq.finish_reason if job.seq is not None else None,
        usage=Usage(
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=completion,
            total_tokens=len(job.prompt_ids) + completion,
        ),
        timings=Timings(**job.timings()),
        annotations=annotations,
    )


@router.post("/generate", response_model=GenerateResponse, response_model_by_alias=True)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """Generate a continuation, annotated per token when ``analysis`` is given."""
    state = get_state(request)
    prompt_ids = await tokenize_prompt(state, body.prompt, body.message_dicts(), body.chat)
    check_new_tokens(state, len(prompt_ids), body.max_new_tokens, "max_new_tokens")
    sampling = SamplingParams(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
    )
    job = new_job(state, prompt_ids, sampling, body.adapter, body.analysis)
    await finish(job, request)
    return _response(state, job, "faithlens.generation", body.analysis)


@router.post("/analyze", response_model=GenerateResponse, response_model_by_alias=True)
async def analyze(body: AnalyzeRequest, request: Request) -> GenerateResponse:
    """Annotate a completion the client already has (no generation)."""
    state = get_state(request)
    prompt_ids = await tokenize_prompt(state, body.prompt, body.message_dicts(), body.chat)
    completion_ids = await state.engine.call(lambda: state.lm.completion_ids(body.completion))
    if not completion_ids:
        raise APIError(400, "invalid_request", "the completion is empty after tokenisation", "completion")
    total = len(prompt_ids) + len(completion_ids)
    if total > state.max_model_len or len(completion_ids) > state.settings.max_prompt_tokens:
        raise APIError(400, "context_length_exceeded", f"prompt + completion is {total} tokens", "completion")
    job = new_job(state, prompt_ids, None, body.adapter, body.analysis, completion_ids)
    await finish(job, request)
    return _response(state, job, "faithlens.analysis", body.analysis)
