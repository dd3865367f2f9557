"""The reaper: no job is left ``running`` with nobody running it, ``queued`` with nothing to deliver it,
or gone because Redis lost its data. Each worker runs it every ``FAITHLENS_REAPER_INTERVAL_S``.

One pass:

1. **Redis lost its data?** The store keeps a *generation* key. If it is missing, this Redis is not the
   one the jobs were written to (a restart without persistence, a flush): a new generation starts, and
   the loss is logged.
2. **Rebuild.** Every job in the on-disk journal (:mod:`jobs.journal`) that Redis does not know is
   written back: its record, its uploaded rows, its checkpoints (read from the disk), an event that says
   what happened, and, unless it had finished, a fresh queue message. The adapter version counter is put
   past every version on disk, so a rebuilt job never overwrites another's adapter.
3. **Re-queue.** Among the jobs whose copy is in this deployment's adapter store (other deployments may
   share the Redis), a ``running`` job whose lease is gone (its worker died, or lost Redis and gave up) goes
   back to ``queued`` with a fresh message; it resumes from its latest checkpoint. A ``queued`` job with
   no message in the queue and none reserved by a worker gets a fresh message.

Re-sending is safe: a worker runs a job only under its lease, and a finished job's message is a no-op.
So a job is neither left behind nor run twice at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.journal import Journal, UnsafePath
from jobs.models import TERMINAL, IllegalTransition, Job
from jobs.store import JobStore

log = logging.getLogger("faithlens.reaper")

GENERATION_KEY = "faithlens:generation"
UNACKED_KEY = "unacked"  # kombu's Redis transport keeps reserved-but-unacknowledged messages here


@dataclass
class ReapReport:
    generation_changed: bool = False
    rebuilt: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


@dataclass
class Reaper:
    store: JobStore
    journal: Journal
    send: Callable[[str], None]  # puts a job id on the job queue
    queue: str
    grace_s: float = 10.0  # a job younger than this may still be between its record and its message

    def run_once(self) -> ReapReport:
        report = ReapReport(generation_changed=self._check_generation())
        known = set(self.store.all_ids())
        ours = self.journal.ids()  # the jobs of this deployment: their copies are in our adapter store
        for job_id in ours:
            if job_id not in known:
                self._rebuild(job_id, report)
        pending = self._pending_messages()
        now = time.time()
        for job_id in ours:
            job = self.store.get(job_id)
            if job is None or job.status in TERMINAL or now - job.created_at < self.grace_s:
                continue
            if self.store.lease_holder(job.id) is not None:
                continue
            try:
                if job.status == "running":
                    self._requeue(job, "its worker stopped holding it", report.requeued)
                elif not any(job.id in message for message in pending):
                    self._requeue(job, "its queue message was lost", report.resent)
            except IllegalTransition:
                continue  # it finished between the read and the update: nothing to do
        if report.rebuilt or report.requeued or report.resent or report.generation_changed:
            log.warning("reaped", extra={"report": vars(report)})
        return report

    # -- steps ------------------------------------------------------------------------------------------
    def _check_generation(self) -> bool:
        """True when this Redis has no generation yet: it lost (or never had) the jobs' state."""
        redis = self.store.redis
        if redis.get(GENERATION_KEY) is not None:
            return False
        created = redis.set(GENERATION_KEY, uuid.uuid4().hex, nx=True)
        lost = bool(created) and bool(self.journal.ids())
        if lost:
            log.error("Redis has no generation key but the store has jobs: Redis lost its data")
        return lost

    def _rebuild(self, job_id: str, report: ReapReport) -> None:
        job = self.journal.read(job_id)
        if job is None:
            return
        try:
            checkpoints = self.journal.checkpoints(job)
            versions = self.journal.versions(job.adapter_name)
        except UnsafePath as exc:
            log.error("journal entry refused", extra={"job": job_id, "reason": str(exc)})
            return
        finished = job.status in TERMINAL
        if not finished:
            job = job.model_copy(
                update={"status": "queued", "step": checkpoints[-1].step_number if checkpoints else 0}
            )
        self.store.restore(job, self.journal.rows(job_id), checkpoints, max(versions, default=0))
        self.store.event(
            job_id,
            "rebuilt from the adapter store after Redis lost its data"
            + ("" if finished else f"; resumes from step {job.step}"),
            level="warn",
        )
        report.rebuilt.append(job_id)
        if not finished:
            self.send(job_id)

    def _requeue(self, job: Job, why: str, into: list[str]) -> None:
        if job.status == "running":
            self.store.update(job.id, status="queued")
        self.store.event(job.id, f"re-queued: {why}", level="warn")
        self.send(job.id)
        into.append(job.id)

    def _pending_messages(self) -> list[str]:
        """Every message waiting in the job queue or reserved by a worker, as raw text."""
        redis = self.store.redis
        waiting = redis.lrange(self.queue, 0, -1)
        reserved = redis.hvals(UNACKED_KEY)
        return [m if isinstance(m, str) else m.decode(errors="replace") for m in [*waiting, *reserved]]
