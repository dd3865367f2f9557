"""Liveness, readiness and Prometheus metrics (no auth, as is usual for probes and scrapers)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
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
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "faithlens", None)
    body = state.telemetry.render() if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
