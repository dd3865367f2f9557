"""Models and adapters: listing (``infer``) and loading/unloading (``admin``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request

from service.adapters import AdapterRegistry, AdapterVersion
from service.auth import require
from service.errors import APIError
from service.openai_schemas import Model, ModelList
from service.routes.native import ERRORS
from service.schemas import AdapterInfo, AdapterList, ErrorResponse, LoadAdapterRequest, UnloadAdapterRequest
from service.state import get_state

router = APIRouter(prefix="/v1", tags=["models"], responses=ERRORS)
ADMIN = {403: {"model": ErrorResponse, "description": "The key lacks the `admin` scope."}}


def _info(registry: AdapterRegistry, version: AdapterVersion) -> AdapterInfo:
    """An adapter as the API shows it: its path relative to the store, never the server's own path."""
    return AdapterInfo(
        name=version.name,
        path=registry.relative(version.path),
        version=version.version,
        loaded_at=version.loaded_at,
    )


@router.get("/models", response_model=ModelList, dependencies=[Depends(require("infer"))])
async def list_models(request: Request) -> ModelList:
    """The base model and every loaded adapter, each adapter with ``parent`` and ``root`` as in vLLM."""
    state = get_state(request)
    base = Model(
        id=state.model_name,
        created=state.started_at,
        root=Path(state.model_root).name,  # the weights' file or directory name, not where it lies
        parent=None,
        max_model_len=state.engine.max_model_len,
    )
    adapters = [
        Model(
            id=v.name,
            created=v.loaded_at,
            root=state.adapters.relative(v.path),
            parent=state.model_name,
            version=v.version,
            max_model_len=state.engine.max_model_len,
        )
        for v in state.adapters.list()
    ]
    return ModelList(data=[base, *adapters])


@router.get("/adapters", response_model=AdapterList, dependencies=[Depends(require("infer"))])
async def list_adapters(request: Request) -> AdapterList:
    registry = get_state(request).adapters
    return AdapterList(data=[_info(registry, v) for v in registry.list()])


@router.post(
    "/adapters/load", response_model=AdapterInfo, responses=ADMIN, dependencies=[Depends(require("admin"))]
)
async def load_adapter(body: LoadAdapterRequest, request: Request) -> AdapterInfo:
    """Load (or replace) an adapter from the adapter store; a replaced version serves its in-flight
    requests to the end. The adapter is checked first (weights, config, rank, base model): a refusal is a
    400 with a code that says which check failed, and leaves the model untouched."""
    state = get_state(request)
    if body.name == state.model_name:
        raise APIError(
            400, "adapter_name_reserved", f"{body.name!r} is the base model's name; pick another", "name"
        )
    return _info(state.adapters, await state.adapters.load(body.name, body.path))


@router.post(
    "/adapters/unload", response_model=AdapterInfo, responses=ADMIN, dependencies=[Depends(require("admin"))]
)
async def unload_adapter(body: UnloadAdapterRequest, request: Request) -> AdapterInfo:
    state = get_state(request)
    return _info(state.adapters, await state.adapters.unload(body.name))
