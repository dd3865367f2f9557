"""What the app holds while it runs, and the request-side steps every inference route shares."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from faithlens.generation import SamplingParams
from faithlens.model import LoadedModel
from faithlens.schema import Analysis
from faithlens.settings import Settings
from service.adapters import AdapterRegistry
from service.engine import AnalysisRequest, Engine, Job
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.schemas import AnalysisOptions
from training.jobs import JobStore


@dataclass
class ServerState:
    settings: Settings
    lm: LoadedModel
    engine: Engine
    adapters: AdapterRegistry
    metrics: ServiceMetrics
    model_name: str
    redis: object | None = None  # redis.asyncio.Redis when REDIS_URL is set
    jobs: JobStore | None = None  # the job store, when REDIS_URL is set
    celery: object | None = None  # a Celery client that only sends jobs by task name
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.lm.model.config, "max_position_embeddings", 0) or 1 << 30)


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "faithlens", None)
    if state is None:
        raise APIError(503, "not_ready", "the model is still loading")
    return state


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def filter_metrics(analysis: Analysis, options: AnalysisOptions) -> Analysis:
    """Null the signals the client did not ask for (they come from the same pass, so they are free, but
    a response should hold what was requested)."""
    wanted = set(options.metrics)
    for token in analysis.tokens:
        if "fai" not in wanted:
            token.fai = None
        if "waad" not in wanted:
            token.waad = None
        if "flags" not in wanted:
            token.preplan = token.anchor = token.dominated_anchor = token.intro = False
    if "fai" not in wanted:
        analysis.prompt_fai = [None] * len(analysis.prompt_fai)
    return analysis


async def tokenize_prompt(
    state: ServerState, prompt: str | None, messages: list[dict[str, str]] | None, chat: bool
) -> list[int]:
    """Tokenise on the engine thread (the tokenizer is not shared across threads) and check limits."""
    ids = await state.engine.call(lambda: state.lm.prompt_ids(prompt, messages, chat))
    param = "messages" if messages is not None else "prompt"
    if not ids:
        raise APIError(400, "invalid_request", "the prompt is empty after tokenisation", param)
    limit = state.settings.max_prompt_tokens
    if len(ids) > limit:
        raise APIError(
            400, "context_length_exceeded", f"the prompt has {len(ids)} tokens; the limit is {limit}", param
        )
    return ids


def check_new_tokens(state: ServerState, prompt_len: int, max_new_tokens: int, param: str) -> None:
    if max_new_tokens > state.settings.max_new_tokens:
        raise APIError(
            400,
            "context_length_exceeded",
            f"{param} is {max_new_tokens}; the limit is {state.settings.max_new_tokens}",
            param,
        )
    if prompt_len + max_new_tokens > state.max_model_len:
        raise APIError(
            400,
            "context_length_exceeded",
            f"prompt ({prompt_len}) + {param} ({max_new_tokens}) exceeds the model's context of "
            f"{state.max_model_len} tokens",
            param,
        )


def resolve_model(state: ServerState, name: str | None) -> str | None:
    """The OpenAI ``model`` field: the base name (or unset) means no adapter; otherwise an adapter name."""
    if name is None or name == state.model_name:
        return None
    return name


def new_job(
    state: ServerState,
    prompt_ids: list[int],
    sampling: SamplingParams | None,
    adapter: str | None,
    analysis: AnalysisOptions | None,
    completion_ids: list[int] | None = None,
    adapter_param: str = "adapter",
) -> Job:
    """Lease the adapter and queue the job; the lease is released when the engine closes the job."""
    rl = analysis.saliency if analysis is not None and analysis.saliency is not None else None
    if rl is not None and rl.method == "atman_rl" and rl.rl_steps > state.settings.max_rl_steps:
        raise APIError(
            400,
            "invalid_request",
            f"rl_steps is limited to {state.settings.max_rl_steps}",
            "analysis.saliency.rl_steps",
        )
    internal, release = (None, None)
    if adapter is not None:
        internal, release = state.adapters.acquire(adapter, adapter_param)
    job = Job(
        id=new_id("gen"),
        prompt_ids=prompt_ids,
        sampling=sampling,
        completion_ids=completion_ids or [],
        adapter_name=adapter,
        adapter_internal=internal,
        analysis=AnalysisRequest(analysis.to_params(), analysis.saliency_params()) if analysis else None,
        on_release=release,
    )
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    try:
        return state.engine.submit(job)
    except APIError:
        if release is not None:
            release()
        raise


async def finish(job: Job, request: Request, poll_s: float = 0.25) -> Job:
    """Await the job; if the client disconnects first, cancel it so the engine drops its work."""
    task = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                return await task
    finally:
        if not task.done():
            job.cancel()
            task.cancel()
