"""Celery tasks: a thin shell around workers.runner and workers.audits (which know nothing of Celery)."""

from __future__ import annotations

import logging

from jobs.audits import RUN_AUDIT_SHARD_TASK
from jobs.models import RUN_JOB_TASK, IllegalTransition
from jobs.settings import get_queue_settings
from workers.app import app
from workers.audits import ShardBusy, run_shard
from workers.runner import LeaseBusy
from workers.runner import run_job as run

log = logging.getLogger("faithlens.worker")


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    try:
        return run(job_id, worker_id=f"{self.request.hostname}:{self.request.id}")
    except LeaseBusy as busy:
        # another live worker holds the job: come back when its lease would have expired, never drop it
        raise self.retry(countdown=busy.retry_in) from None
    except IllegalTransition as exc:
        # the job reached a final status elsewhere meanwhile (cancelled while it was being picked up, or
        # finished by another attempt): that status stands, and this message is done
        log.info("job already final", extra={"job": job_id, "status": exc.current, "wanted": exc.requested})
        return exc.current


@app.task(name=RUN_AUDIT_SHARD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_audit_shard(self, audit_id: str, shard: int) -> str:
    """One shard of an audit (workers/audits.py). acks_late: a shard whose worker died is redelivered
    and redone alone; a finished one (its ``done`` marker) is skipped."""
    hostname = str(self.request.hostname)
    try:
        return run_shard(
            audit_id,
            int(shard),
            worker=hostname,
            lease_id=f"{hostname}:{self.request.id}",
            concurrency=get_queue_settings().worker_concurrency,
        )
    except ShardBusy as busy:
        raise self.retry(countdown=busy.retry_in) from None
