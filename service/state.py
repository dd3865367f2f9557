"""What the app holds while it runs, and the request-side steps every inference route shares.

Routes reach the model only through ``state.engine`` (a :class:`faithlens.engine.EngineClient`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from faithlens.engine import AnalysisSpec, EngineClient, EngineError, RequestOutput
from faithlens.schema import Analysis
from jobs.settings import QueueSettings
from jobs.store import JobStore
from service.adapters import AdapterRegistry
from service.errors import APIError, from_engine
from service.schemas import AnalysisOptions
from service.settings import ServiceSettings
from service.telemetry import Telemetry


@dataclass
class ServerState:
    settings: ServiceSettings
    queue: QueueSettings
    engine: EngineClient
    adapters: AdapterRegistry
    telemetry: Telemetry
    model_name: str
    model_root: str  # where the base model's weights were read from (/v1/models' root)
    redis: object | None = None  # redis.asyncio.Redis when REDIS_URL is set
    jobs: JobStore | None = None  # the job store, when REDIS_URL is set
    celery: object | None = None  # a Celery client that only sends jobs by task name
    started_at: int = field(default_factory=lambda: int(time.time()))


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "faithlens", None)
    if state is None:
        raise APIError(503, "not_ready", "the model is still loading")
    return state


def analysis_spec(options: AnalysisOptions | None) -> AnalysisSpec | None:
    return AnalysisSpec(options.to_params(), options.saliency_params()) if options is not None else None


def present(analysis: Analysis, options: AnalysisOptions, model: str, adapter: str | None) -> Analysis:
    """The annotations as the client asked for them (:meth:`faithlens.schema.Analysis.presented`)."""
    return analysis.presented(options.metrics, model, adapter)


def resolve_model(state: ServerState, name: str | None) -> str | None:
    """The OpenAI ``model`` field: the base name (or unset) means no adapter; otherwise an adapter name."""
    if name is None or name == state.model_name:
        return None
    return name


@contextlib.asynccontextmanager
async def leased_adapter(state: ServerState, name: str | None, param: str) -> AsyncIterator[str | None]:
    """The engine's name for the current version of adapter ``name``, held until the block ends (a swap
    never changes weights under a running request)."""
    if name is None:
        yield None
        return
    internal, release = state.adapters.acquire(name, param)
    try:
        yield internal
    finally:
        release()


async def until_disconnected(
    outputs: AsyncIterator[RequestOutput], request: Request, field_names: dict[str, str] | None = None
) -> RequestOutput:
    """The last output of ``outputs``; if the client disconnects first, the iterator is closed, which
    aborts the request in the engine. Engine errors come out as :class:`APIError`."""
    last: list[RequestOutput] = []

    async def drain() -> None:
        async for output in outputs:
            last.append(output)

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # closes the iterator inside drain(), which aborts the request
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "cancelled", "the client went away")
        task.result()
        return last[-1]
    except EngineError as exc:
        raise from_engine(exc, field_names) from exc
    finally:
        if not task.done():
            task.cancel()
