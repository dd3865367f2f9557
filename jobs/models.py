"""Fine-tuning jobs as the API shows them: the job object (shaped like OpenAI's ``fine_tuning.job``), its
events and checkpoints. Shared by the service (which creates and reads jobs) and the workers (which run
them); :mod:`jobs.store` keeps them in Redis.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

RUN_JOB_TASK = "faithlens.run_job"  # the Celery task name; the API sends by name, workers define it
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = {"succeeded", "failed", "cancelled"}
# The legal status changes. queued→queued and running→running are re-claims (a redelivered job starts a
# new attempt); running→queued is a re-queue (its worker died). A terminal status is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "running", "cancelled", "failed"}),
    "running": frozenset({"running", "queued", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransition(Exception):
    """A status change :data:`TRANSITIONS` forbids, e.g. a finished job asked to start or finish again.
    Nothing was written; ``current`` is the status the job keeps."""

    def __init__(self, job_id: str, current: str, requested: str) -> None:
        super().__init__(f"job {job_id} is {current}; it cannot become {requested}")
        self.job_id, self.current, self.requested = job_id, current, requested


def check_transition(job_id: str, current: str, requested: str) -> None:
    if requested not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(job_id, current, requested)


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
    training_data: str = Field(
        description="A data set's name (`gsm8k-train`, `arith-add:1-50/train`), or `upload` for rows sent "
        "with the job"
    )
    validation_data: str | None = Field(
        default=None, description="The data set evaluated on every `eval_steps` steps, if any"
    )
    adapter_name: str
    result_adapter: str | None = Field(default=None, description="<adapter_name>/<version> when done")
    result_version: int | None = None
    seed: int = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    owner: str | None = Field(
        default=None,
        description="Who created the job: a non-reversible id of its API key (the first 16 hex digits of "
        "its SHA-256); null when the server runs without keys.",
    )
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


def owner_id(api_key: str) -> str:
    """The id a job stores for the key that created it: never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]
