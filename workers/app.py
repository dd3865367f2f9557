"""The Celery app: Redis broker and result backend from REDIS_URL, configured so that no job is lost.

acks_late + reject_on_worker_lost: a job's message is acknowledged only when it finishes, so a worker
that dies mid-job leaves it to be redelivered (after ``visibility_timeout``, which must exceed the
longest job). prefetch 1: a busy worker holds no other job hostage. Models load in the pool's child
process, after the fork.
"""

from __future__ import annotations

from celery import Celery

from jobs.settings import get_queue_settings


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
