"""Fine-tuning jobs as the API shows them: the job object (shaped like OpenAI's ``fine_tuning.job``), its
events and checkpoints. Shared by the service (which creates and reads jobs) and the workers (which run
them); :mod:`jobs.store` keeps them in Redis.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

RUN_JOB_TASK = "faithlens.run_job"  # the Celery task name; the API sends by name, workers define it
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = {"succeeded", "failed", "cancelled"}


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: Status = "queued"
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    error: JobError | None = None
    model: str
    method: dict[str, Any] = Field(description="{type: grpo | atmanrl}, as submitted")
    hyperparameters: dict[str, Any] = Field(description="The full training configuration used")
    training_data: str = Field(description="`gsm8k-train`, or `upload` for rows sent with the job")
    adapter_name: str
    result_adapter: str | None = Field(default=None, description="<adapter_name>/<version> when done")
    result_version: int | None = None
    seed: int = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    attempts: int = 0
    step: int = 0


class JobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: float
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class Checkpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    step_number: int
    path: str
    metrics: dict[str, Any]
    created_at: int


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"
