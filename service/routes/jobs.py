"""Fine-tuning jobs, shaped like OpenAI's fine-tuning API: create, list, get, events (with an SSE follow
mode), cancel, checkpoints. Mutations need ``admin``. Jobs are stored in Redis and run by Celery workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from faithlens.params import NonEmpty
from jobs.models import RUN_JOB_TASK, TERMINAL, Checkpoint, Job, JobEvent, Status, new_job_id
from jobs.store import JobStore
from service.auth import require
from service.errors import APIError
from service.openai_schemas import event_stream
from service.routes.native import ERRORS
from service.schemas import AdapterName, ErrorResponse
from service.state import ServerState, get_state
from training.config import TrainConfig

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)
ADMIN = {403: {"model": ErrorResponse, "description": "The key lacks the `admin` scope."}}


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


class JobMethod(BaseModel):
    """``{"type": "grpo" | "atmanrl", ...hyperparameters}``; the names are training.config.TrainConfig's."""

    model_config = ConfigDict(extra="allow")
    type: Literal["grpo", "atmanrl"]


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    method: JobMethod
    training_data: Literal["gsm8k-train"] | UploadedData | Annotated[list[TrainingRow], Field(min_length=1)]
    adapter_name: AdapterName
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _no_method_in_hyperparameters(self) -> CreateJobRequest:
        if "method" in (self.method.model_extra or {}):
            raise ValueError("give the method as method.type")
        return self


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


async def _job(state: ServerState, job_id: str) -> Job:
    job = await asyncio.to_thread(_store(state).get, job_id)
    if job is None:
        raise APIError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job


def _config(body: CreateJobRequest) -> TrainConfig:
    hyper = dict(body.method.model_extra or {})
    try:
        return TrainConfig(method=body.method.type, seed=body.seed, **hyper)
    except TypeError as exc:
        raise APIError(400, "invalid_request", f"unknown hyperparameter: {exc}", "method") from exc
    except ValueError as exc:
        raise APIError(400, "invalid_request", str(exc), "method") from exc


@router.post("", responses=ADMIN, dependencies=[Depends(require("admin"))])
async def create_job(body: CreateJobRequest, request: Request) -> Job:
    state = get_state(request)
    store = _store(state)
    if body.model not in (None, state.model_name):
        raise APIError(
            404, "model_not_found", f"jobs fine-tune the served base model {state.model_name!r}", "model"
        )
    config = _config(body)
    rows = None
    if isinstance(body.training_data, UploadedData):
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
    job = Job(
        id=new_job_id(),
        created_at=int(time.time()),
        model=state.model_name,
        method={"type": body.method.type, **(body.method.model_extra or {})},
        hyperparameters=config.as_dict(),
        training_data="gsm8k-train" if rows is None else "upload",
        adapter_name=body.adapter_name,
        seed=body.seed,
        metadata=body.metadata,
    )
    await asyncio.to_thread(store.create, job, [r.model_dump() for r in rows] if rows is not None else None)
    await asyncio.to_thread(state.celery.send_task, RUN_JOB_TASK, args=[job.id], queue=state.queue.job_queue)
    return job


@router.get("", dependencies=[Depends(require("infer"))])
async def list_jobs(
    request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> JobList:
    jobs = await asyncio.to_thread(_store(get_state(request)).list, limit + 1, after)
    return JobList(data=jobs[:limit], has_more=len(jobs) > limit)


@router.get("/{job_id}", dependencies=[Depends(require("infer"))])
async def get_job(job_id: str, request: Request) -> Job:
    return await _job(get_state(request), job_id)


@router.post(
    "/{job_id}/cancel",
    responses={**ADMIN, 409: {"model": ErrorResponse, "description": "The job has already finished."}},
    dependencies=[Depends(require("admin"))],
)
async def cancel_job(job_id: str, request: Request) -> Job:
    """A queued job is cancelled at once; a running one stops at its next step boundary."""
    state = get_state(request)
    store = _store(state)
    job = await _job(state, job_id)
    if job.status in TERMINAL:
        raise APIError(409, "job_finished", f"the job is already {job.status}", "job_id")
    await asyncio.to_thread(store.request_cancel, job_id)
    if job.status == "queued":
        job = await asyncio.to_thread(store.update, job_id, status="cancelled", finished_at=int(time.time()))
        await asyncio.to_thread(store.event, job_id, "cancelled while queued")
    return job


@router.get("/{job_id}/checkpoints", dependencies=[Depends(require("infer"))])
async def list_checkpoints(job_id: str, request: Request) -> CheckpointList:
    state = get_state(request)
    await _job(state, job_id)
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
    dependencies=[Depends(require("infer"))],
)
async def list_events(
    job_id: str, request: Request, follow: bool = False, after: Annotated[int, Query(ge=0, le=10**9)] = 0
) -> JobEventList | StreamingResponse:
    """All events from index ``after``; with ``follow=true`` an SSE stream that ends, with ``[DONE]``,
    when the job finishes."""
    state = get_state(request)
    store = _store(state)
    await _job(state, job_id)
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
