"""Fine-tuning jobs, shaped like OpenAI's fine-tuning API: create, list, get, events (with an SSE follow
mode), cancel, checkpoints. Jobs are stored in Redis and run by Celery workers.

A job belongs to the key that created it (``owner``: a SHA-256 prefix of the key). An ``infer`` key lists,
reads, follows and cancels only its own jobs; another's job is a 404, as if it did not exist, so job ids
do not leak. ``admin`` keys (and everyone, with auth off) see every job. An ``infer`` key trains only into
an adapter name that is new or already its own, so it cannot replace an adapter others are served."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faithlens.data import DATASET_NAME_MAX, UnknownDataset, check_dataset, dataset_unavailable
from faithlens.params import NonEmpty
from faithlens.settings import get_core_settings
from jobs.models import (
    RUN_JOB_TASK,
    TERMINAL,
    Checkpoint,
    IllegalTransition,
    Job,
    JobEvent,
    Status,
    new_job_id,
)
from jobs.store import JobStore
from service.auth import Principal, require
from service.errors import APIError
from service.openai_schemas import event_stream
from service.routes.native import ERRORS
from service.schemas import AdapterName, ErrorResponse
from service.state import ServerState, get_state
from training.config import TrainConfig, TrainHyperparameters, backend_unavailable

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


class TrainingRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: NonEmpty
    answer: NonEmpty


class UploadedData(BaseModel):
    """A JSONL file's content, one ``{"question", "answer"}`` object per line."""

    model_config = ConfigDict(extra="forbid")
    jsonl: NonEmpty

    def rows(self) -> list[TrainingRow]:
        rows = []
        for number, line in enumerate(self.jsonl.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(TrainingRow.model_validate_json(line))
            except ValueError as exc:
                raise APIError(
                    400,
                    "invalid_training_data",
                    f"line {number}: {str(exc).splitlines()[0]}",
                    "training_data",
                ) from exc
        return rows


DatasetName = Annotated[str, Field(min_length=1, max_length=DATASET_NAME_MAX)]


class JobMethod(TrainHyperparameters):
    """``{"type": "grpo" | "atmanrl", ...hyperparameters}``: the hyperparameters, their types, defaults and
    bounds are ``training.config.TrainHyperparameters``' (the trainer's own configuration); an unknown
    name or a value out of bounds is a 400 naming the field (``method.<name>``)."""

    type: Literal["grpo", "atmanrl"]


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    method: JobMethod
    training_data: DatasetName | UploadedData | Annotated[list[TrainingRow], Field(min_length=1)] = Field(
        description="A data set's name (`gsm8k-train`, or a task's split such as `arith-add:1-50/train`), "
        "an uploaded JSONL file, or the rows themselves."
    )
    validation_data: DatasetName | None = Field(
        default=None,
        description="A data set the job evaluates on (greedy accuracy, spec §9) every `eval_steps` steps, "
        "such as `arith-add:1-50/heldout` (OpenAI's `validation_file`).",
    )
    adapter_name: AdapterName
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] = Field(
        default_factory=dict
    )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]


class JobStreamEnd(BaseModel):
    """The last JSON event of ``events?follow=true``: the job's final status."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: Status | None = Field(description="null if the job was deleted meanwhile.")


def _store(state: ServerState) -> JobStore:
    if state.jobs is None:
        raise APIError(503, "jobs_unavailable", "jobs need Redis: set REDIS_URL")
    return state.jobs


async def _job(state: ServerState, job_id: str, caller: Principal) -> Job:
    """The job, if it exists and ``caller`` may see it; else 404 (the same 404 either way)."""
    job = await asyncio.to_thread(_store(state).get, job_id)
    if job is None or not caller.may_see(job.owner):
        raise APIError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job


def _config(body: CreateJobRequest, max_new_tokens: int, max_lora_rank: int) -> TrainConfig:
    """The run's configuration, also held to this server's limits: the tokens it decodes and the rank of
    the adapter it must then load."""
    hyper = body.method.model_dump(exclude={"type"})
    if "max_new_tokens" not in body.method.model_fields_set:  # the default, capped by the server's limit
        hyper["max_new_tokens"] = min(hyper["max_new_tokens"], max_new_tokens)
    elif hyper["max_new_tokens"] > max_new_tokens:
        raise APIError(
            400,
            "context_length_exceeded",
            f"max_new_tokens is {hyper['max_new_tokens']}; the limit is {max_new_tokens}",
            "method.max_new_tokens",
        )
    if hyper["lora_r"] > max_lora_rank:
        raise APIError(
            400,
            "invalid_request",
            f"lora_r is {hyper['lora_r']}; this server loads adapters of rank {max_lora_rank} at most "
            "(FAITHLENS_MAX_LORA_RANK)",
            "method.lora_r",
        )
    why = backend_unavailable(hyper["backend"])
    if why is not None:  # refused now, not failed later on a worker
        raise APIError(400, "backend_unavailable", why, "method.backend")
    try:
        return TrainConfig(method=body.method.type, seed=body.seed, **hyper)
    except ValidationError as exc:  # the fields passed JobMethod: only a cross-field rule can fail here
        error = exc.errors()[0]
        param = ".".join(["method", *(str(part) for part in error["loc"])])
        raise APIError(400, "invalid_request", error["msg"], param) from exc


async def _check_dataset(name: str, param: str) -> None:
    """A data set this server's workers can read: it must exist, and its file must be here."""
    try:
        check_dataset(name)
    except UnknownDataset as exc:
        raise APIError(400, "unknown_dataset", str(exc), param) from None
    missing = await asyncio.to_thread(dataset_unavailable, name, get_core_settings().data_dir)
    if missing is not None:
        raise APIError(400, "dataset_unavailable", missing, param)


def _claim_adapter_name(state: ServerState, store: JobStore, name: str, caller: Principal) -> None:
    """An ``infer`` key may train only into a new adapter name or one its own jobs claimed first; an
    ``admin`` key into any. The first job into a name claims it for its owner."""
    if caller.owner is None:  # auth off: no owners to keep apart
        return
    holder = store.adapter_owner(name)
    if holder is None:
        # an adapter an admin loaded, or one trained before owners were recorded, belongs to no infer key
        served = name in {v.name for v in state.adapters.list()} or (state.adapters.store / name).exists()
        holder = None if served else store.claim_adapter(name, caller.owner)
    if holder != caller.owner and not caller.admin:
        raise APIError(
            409, "adapter_name_taken", f"the adapter name {name!r} belongs to another key", "adapter_name"
        )


@router.post(
    "",
    responses={409: {"model": ErrorResponse, "description": "The adapter name belongs to another key."}},
)
async def create_job(
    body: CreateJobRequest, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Job:
    """Queue a job; it belongs to the calling key."""
    state = get_state(request)
    store = _store(state)
    if body.model not in (None, state.model_name):
        raise APIError(
            404, "model_not_found", f"jobs fine-tune the served base model {state.model_name!r}", "model"
        )
    config = _config(body, state.settings.max_new_tokens, get_core_settings().max_lora_rank)
    rows = None
    if isinstance(body.training_data, str):
        await _check_dataset(body.training_data, "training_data")
    elif isinstance(body.training_data, UploadedData):
        rows = body.training_data.rows()
    elif isinstance(body.training_data, list):
        rows = body.training_data
    if rows is not None and len(rows) > state.queue.max_upload_rows:
        raise APIError(
            400,
            "invalid_training_data",
            f"{len(rows)} rows; the limit is {state.queue.max_upload_rows}",
            "training_data",
        )
    if rows is not None and not rows:
        raise APIError(400, "invalid_training_data", "the training data has no rows", "training_data")
    if body.validation_data is not None:
        await _check_dataset(body.validation_data, "validation_data")
    if (body.validation_data is None) != (config.eval_steps is None):
        raise APIError(
            400,
            "invalid_request",
            "validation_data and method.eval_steps come together: the data to evaluate on, and when",
            "validation_data" if body.validation_data is None else "method.eval_steps",
        )
    job = Job(
        id=new_job_id(),
        created_at=int(time.time()),
        model=state.model_name,
        method=body.method.model_dump(include={"type"} | body.method.model_fields_set),
        hyperparameters=config.as_dict(),
        training_data=body.training_data if rows is None else "upload",
        validation_data=body.validation_data,
        adapter_name=body.adapter_name,
        seed=body.seed,
        metadata=body.metadata,
        owner=caller.owner,
    )
    await asyncio.to_thread(_claim_adapter_name, state, store, body.adapter_name, caller)
    await asyncio.to_thread(store.create, job, [r.model_dump() for r in rows] if rows is not None else None)
    await asyncio.to_thread(state.celery.send_task, RUN_JOB_TASK, args=[job.id], queue=state.queue.job_queue)
    return job


@router.get("")
async def list_jobs(
    request: Request,
    caller: Annotated[Principal, Depends(require("infer"))],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobList:
    """Newest first: the caller's own jobs (every job for an ``admin`` key)."""
    store = _store(get_state(request))
    jobs = await asyncio.to_thread(store.list, limit + 1, after, caller.visible_owner)
    return JobList(data=jobs[:limit], has_more=len(jobs) > limit)


@router.get("/{job_id}")
async def get_job(
    job_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Job:
    return await _job(get_state(request), job_id, caller)


@router.post(
    "/{job_id}/cancel",
    responses={409: {"model": ErrorResponse, "description": "The job has already finished."}},
)
async def cancel_job(
    job_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Job:
    """A queued job is cancelled at once; a running one stops within a bounded time (its worker checks
    between decode steps, scoring passes and optimiser iterations) and then reads ``cancelled``."""
    state = get_state(request)
    store = _store(state)
    await _job(state, job_id, caller)
    try:
        job = await asyncio.to_thread(store.cancel, job_id)
    except IllegalTransition as exc:
        raise APIError(409, "job_finished", f"the job is already {exc.current}", "job_id") from exc
    if job.status == "cancelled":  # it was queued: cancelled here, by this call
        await asyncio.to_thread(store.event, job_id, "cancelled while queued")
    return job


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(
    job_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> CheckpointList:
    state = get_state(request)
    await _job(state, job_id, caller)
    return CheckpointList(data=await asyncio.to_thread(_store(state).checkpoints, job_id))


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses={
        200: event_stream(
            JobEvent,
            JobStreamEnd,
            documented=(JobEventList,),
            description="The events; with `follow=true`, an event stream of `JobEvent` objects, then one "
            "`JobStreamEnd` when the job has finished, then `data: [DONE]`.",
        )
    },
)
async def list_events(
    job_id: str,
    request: Request,
    caller: Annotated[Principal, Depends(require("infer"))],
    follow: bool = False,
    after: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobEventList | StreamingResponse:
    """All events from index ``after``; with ``follow=true`` an SSE stream that ends, with ``[DONE]``,
    when the job finishes."""
    state = get_state(request)
    store = _store(state)
    await _job(state, job_id, caller)
    if not follow:
        events = await asyncio.to_thread(store.events, job_id, after)
        return JobEventList(data=events)

    async def stream() -> AsyncIterator[str]:
        seen = after
        while True:
            events = await asyncio.to_thread(store.events, job_id, seen)
            for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
            seen += len(events)
            job = await asyncio.to_thread(store.get, job_id)
            finished = job is None or job.status in TERMINAL
            if finished and not await asyncio.to_thread(store.events, job_id, seen):
                end = JobStreamEnd(status=job.status if job else None)
                yield f"data: {json.dumps(end.model_dump())}\n\n"
                yield "data: [DONE]\n\n"
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
