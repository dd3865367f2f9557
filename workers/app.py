"""The Celery app: Redis broker and result backend from REDIS_URL, configured so that no job is lost.

acks_late + reject_on_worker_lost: a job's message is acknowledged only when it finishes, so a worker
that dies mid-job leaves it to be redelivered (after ``visibility_timeout``, which must exceed the
longest job). prefetch 1: a busy worker holds no other job hostage. Models load in the pool's child
process, after the fork. The main process also runs the reaper (jobs/reaper.py), which re-queues jobs a
dead worker or a Redis restart left behind, and rebuilds jobs Redis lost from the adapter store.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.signals import worker_ready

from faithlens.settings import get_core_settings
from jobs.audits import RUN_AUDIT_SHARD_TASK, AuditStore
from jobs.journal import Journal
from jobs.models import RUN_JOB_TASK
from jobs.reaper import Reaper
from jobs.settings import get_queue_settings
from jobs.store import JobStore

log = logging.getLogger("faithlens.worker")


def make_app() -> Celery:
    settings = get_queue_settings()
    url = settings.redis
    app = Celery("faithlens", broker=url, backend=url, include=["workers.tasks"])
    transport = {"visibility_timeout": settings.job_visibility_timeout_s}
    if settings.job_visibility_timeout_s < 60:  # tests: restore redelivered messages promptly
        transport["unacked_restore_interval"] = 1
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_default_queue=settings.job_queue,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
    )
    return app


app = make_app()


@worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    """The reaper runs in each worker's main process (jobs/reaper.py): several workers reaping at once is
    safe, since re-sending a job is idempotent."""
    threading.Thread(target=_reap_forever, name="faithlens-reaper", daemon=True).start()


def _reap_forever() -> None:
    queue, core = get_queue_settings(), get_core_settings()
    journal = Journal(core.adapters)
    store = JobStore(queue.redis, journal=journal, patient=True)

    def send(job_id: str) -> None:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue.job_queue)

    reaper = Reaper(store, journal, send, queue.job_queue, grace_s=queue.reaper_grace_s)
    audits = AuditStore(queue.redis, patient=True)

    def send_shard(audit_id: str, shard: int) -> None:
        app.send_task(RUN_AUDIT_SHARD_TASK, args=[audit_id, shard], queue=queue.audit_queue)

    while True:
        try:
            reaper.run_once()
        except Exception:  # Redis down, a bad record: try again next round, never stop reaping
            log.exception("reaper pass failed")
        try:  # audits: lost shard messages re-sent (workers/audits.py)
            from workers.audits import reap_audits  # torch and the model code: in the reaper thread only

            reap_audits(audits, send_shard, queue.audit_queue, grace_s=queue.reaper_grace_s)
        except Exception:
            log.exception("audit reaper pass failed")
        time.sleep(queue.reaper_interval_s)
