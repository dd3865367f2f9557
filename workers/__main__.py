"""``python -m workers``: a Celery worker for fine-tuning jobs and audit shards (equivalently:
``celery -A workers.app worker -Q faithlens-jobs,faithlens-audits --pool prefork --concurrency 1``; the
queues are FAITHLENS_JOB_QUEUE and FAITHLENS_AUDIT_QUEUE)."""

from __future__ import annotations

import sys

from faithlens.logs import configure_logging
from faithlens.settings import get_core_settings
from jobs.settings import get_queue_settings
from workers.app import app


def main(argv: list[str] | None = None) -> None:
    core, settings = get_core_settings(), get_queue_settings()
    configure_logging(core.log_level, core.log_json)
    args = [
        "worker",
        "-Q",
        f"{settings.job_queue},{settings.audit_queue}",
        "--pool",
        "prefork",
        "--concurrency",
        str(settings.worker_concurrency),
        "--loglevel",
        core.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    app.worker_main(args)


if __name__ == "__main__":
    main()
