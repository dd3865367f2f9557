"""Liveness, readiness and Prometheus metrics (no auth, as is usual for probes and scrapers)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessChecks(BaseModel):
    model: bool = Field(description="The model is loaded.")
    engine: bool = Field(description="The engine runs.")
    redis: bool | Literal["disabled"] = Field(description="Redis answers; `disabled` without REDIS_URL.")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: ReadinessChecks


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
    """The model is loaded, the engine runs, and Redis answers (when configured)."""
    state = getattr(request.app.state, "faithlens", None)
    engine_ready = state is not None and state.engine.health().ready
    checks = {"model": state is not None, "engine": engine_ready, "redis": "disabled"}
    if state is not None and state.redis is not None:
        try:
            checks["redis"] = bool(await asyncio.wait_for(state.redis.ping(), timeout=1.0))
        except Exception:
            checks["redis"] = False
    ready = all(value is not False for value in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=ReadinessChecks(**checks))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "The Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "faithlens", None)
    body = state.telemetry.render() if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
