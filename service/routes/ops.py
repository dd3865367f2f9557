"""Liveness, readiness and Prometheus metrics (no auth, as is usual for probes and scrapers)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from faithlens.data import datasets_available
from faithlens.settings import get_core_settings

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessChecks(BaseModel):
    model: bool = Field(description="The model is loaded.")
    engine: bool = Field(description="The engine runs.")


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"] = Field(
        description="`ready` and `degraded` (Redis down: jobs and hot-load wait, inference goes on) answer "
        "200; `not_ready` answers 503."
    )
    checks: ReadinessChecks = Field(description="What inference needs; all true means 200.")
    redis: Literal["ok", "down", "disabled"] = Field(
        description="Redis (jobs, hot-load), which readiness does not depend on: `disabled` without REDIS_URL."
    )
    datasets: dict[str, bool] = Field(
        description="Whether each named data set (`gsm8k-dev`, `gsm8k-train`) is in FAITHLENS_DATA_DIR, which "
        "readiness does not depend on: jobs and audits that name a missing one are refused (400 "
        "`dataset_unavailable`), everything else works."
    )


@router.get("/healthz")
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: a check failed (`checks` says which)."}},
)
async def readyz(request: Request) -> JSONResponse:
    """The server can serve inference: the model is loaded and the engine runs. Redis and the data sets are
    reported beside (a Redis blip must not take the server out of a load balancer; jobs routes answer 503
    meanwhile; a missing data set refuses only the jobs and audits that name it)."""
    state = getattr(request.app.state, "faithlens", None)
    checks = ReadinessChecks(
        model=state is not None, engine=state is not None and state.engine.health().ready
    )
    redis = await _redis(request)
    ready = checks.model and checks.engine
    status = "not_ready" if not ready else "ready" if redis != "down" else "degraded"
    datasets = await asyncio.to_thread(datasets_available, get_core_settings().data_dir)
    body = Readiness(status=status, checks=checks, redis=redis, datasets=datasets)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def _redis(request: Request) -> Literal["ok", "down", "disabled"]:
    if not request.app.state.redis_configured:
        return "disabled"
    state = getattr(request.app.state, "faithlens", None)
    if state is None or state.redis is None:
        return "down"  # not connected yet: the model is still loading
    try:
        return "ok" if await asyncio.wait_for(state.redis.ping(), timeout=1.0) else "down"
    except Exception:
        return "down"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "The Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "faithlens", None)
    body = state.telemetry.render() if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
