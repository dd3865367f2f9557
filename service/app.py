"""The FastAPI application: routers, error handlers, guards and limits, metrics, and the start-up that loads
the model in the background (``/healthz`` answers at once; ``/readyz`` turns 200 when the model is in).

Without API keys the app itself answers loopback callers only (peer address and ``Host:`` name), however
it is served: ``python -m service`` also refuses to bind elsewhere (:func:`bind_host`), but ``uvicorn
--factory service.app:create_app --host 0.0.0.0`` goes through the same guard."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from faithlens.engine import EngineConfig, LocalEngine
from faithlens.model import LoadedModel, load_model
from faithlens.registry import load_plugins
from faithlens.settings import CoreSettings, get_core_settings
from jobs.journal import Journal
from jobs.settings import QueueSettings, get_queue_settings
from jobs.store import JobStore
from service import hotload
from service.adapters import AdapterRegistry
from service.errors import install_error_handlers
from service.limits import BodySizeLimit, CallerGuard, FiniteJSON, is_loopback
from service.routes import admin, audits, capabilities, jobs, native, openai, ops, ui
from service.settings import ServiceSettings, get_service_settings
from service.state import ServerState
from service.telemetry import Telemetry
from service.view import find_view_dir

log = logging.getLogger("faithlens.service")


class RequestMetrics:
    """Counts requests and observes latency per route template (not per raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Telemetry) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class Layers:
    """The three layers' settings the server reads: the core's, its own and the queue's."""

    core: CoreSettings
    service: ServiceSettings
    queue: QueueSettings


async def _start(app: FastAPI, layers: Layers, metrics: Telemetry, lm: LoadedModel | None) -> None:
    """Load the model off the event loop, start the engine, then follow the adapter channel."""
    core, settings, queue = layers.core, layers.service, layers.queue
    if core.torch_threads is not None:
        torch.set_num_threads(core.torch_threads)
    if lm is None:
        lm = await asyncio.to_thread(load_model, core.model, core.device, core.dtype, core.cache_dir)
    engine = LocalEngine(lm, engine_config(settings), metrics)
    core.adapters.mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(
        engine, core.adapters, metrics, served_name=settings.served_model_name, max_rank=core.max_lora_rank
    )
    await engine.start()
    await registry.load_store()  # every adapter in the store, before the server says it is ready
    redis, job_store, celery = None, None, None
    if queue.redis_url:
        import redis.asyncio as aioredis
        from celery import Celery

        redis = aioredis.from_url(queue.redis_url)
        job_store = JobStore(queue.redis_url, journal=Journal(core.adapters))  # + a copy on disk
        celery = Celery("faithlens-api", broker=queue.redis_url)
    state = ServerState(
        settings=settings,
        queue=queue,
        engine=engine,
        adapters=registry,
        telemetry=metrics,
        model_name=settings.served_model_name or lm.name,
        model_root=str(lm.source.directory / (lm.source.gguf_file or "")),
        redis=redis,
        jobs=job_store,
        celery=celery,
    )
    app.state.faithlens = state
    log.info(
        "ready", extra={"model": state.model_name, "device": str(lm.device), "auth": bool(app.state.api_keys)}
    )
    if redis is not None:
        subscribed = asyncio.Event()
        app.state.tasks.append(
            asyncio.create_task(hotload.follow(redis, queue.adapter_channel, registry, subscribed))
        )
        await subscribed.wait()


def engine_config(settings: ServiceSettings) -> EngineConfig:
    """The engine's part of the service settings: every EngineConfig field is a setting of the same name."""
    return EngineConfig(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(EngineConfig)})


def create_app(
    settings: ServiceSettings | None = None,
    lm: LoadedModel | None = None,
    core: CoreSettings | None = None,
    queue: QueueSettings | None = None,
) -> FastAPI:
    settings = settings or get_service_settings()
    layers = Layers(core or get_core_settings(), settings, queue or get_queue_settings())
    metrics = Telemetry()
    load_plugins()  # a broken plugin fails here, at start-up, not at its first request

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.tasks = []
        starting = asyncio.create_task(_start(app, layers, metrics, lm))
        starting.add_done_callback(_log_start_failure)
        app.state.tasks.append(starting)
        yield
        for task in app.state.tasks:
            task.cancel()
        state = getattr(app.state, "faithlens", None)
        if state is not None:
            await state.engine.stop()
            if state.redis is not None:
                await state.redis.aclose()

    app = FastAPI(
        title="faithlens",
        version="0.1.0",
        summary="Generation annotated with which reasoning tokens matter (FAI, WAAD, anchors, AtMan).",
        lifespan=lifespan,
    )
    app.state.api_keys = settings.parsed_api_keys()
    app.state.ui_dir = settings.ui_dir
    if settings.ui_dir is None and find_view_dir() is None:
        log.warning(
            "the audit view's files are not installed: /ui and HTML reports answer 501 ui_unavailable"
        )
    app.state.redis_configured = bool(layers.queue.redis_url)
    app.state.faithlens = None
    install_error_handlers(app)
    for module in (native, capabilities, openai, admin, jobs, audits, ops, ui):
        app.include_router(module.router)
    # The last added runs first: metrics see every answer; the caller guard answers before any body is
    # read; then the size limit; the JSON check reads the (limited) body.
    app.add_middleware(FiniteJSON)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(
        CallerGuard, loopback_only=not app.state.api_keys, allowed_hosts=settings.parsed_allowed_hosts()
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def bind_host(requested: str, settings: ServiceSettings) -> str:
    """Where ``python -m service`` binds: ``requested``, or 127.0.0.1 when there are no API keys and
    ``requested`` is not loopback (the app would refuse every remote caller anyway)."""
    if settings.parsed_api_keys():
        return requested
    if not is_loopback(requested):
        log.warning(
            "no FAITHLENS_API_KEYS set: refusing to bind %s, binding 127.0.0.1 instead",
            requested,
            extra={"requested_host": requested},
        )
        return "127.0.0.1"
    log.warning("no FAITHLENS_API_KEYS set: authentication is off, serving on loopback only")
    return requested


def _log_start_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("start-up failed; the server stays not ready", exc_info=task.exception())
