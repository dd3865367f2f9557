"""Celery tasks: a thin shell around workers.runner (which knows nothing of Celery)."""

from __future__ import annotations

from jobs.models import RUN_JOB_TASK
from workers.app import app
from workers.runner import LeaseBusy
from workers.runner import run_job as run


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    try:
        return run(job_id, worker_id=f"{self.request.hostname}:{self.request.id}")
    except LeaseBusy as busy:
        # another live worker holds the job: come back when its lease would have expired, never drop it
        raise self.retry(countdown=busy.retry_in) from None
