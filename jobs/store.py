"""The job store in Redis. The API writes jobs here and enqueues their ids; workers update them.

Keys (prefix ``faithlens:``): ``job:<id>`` (JSON), ``jobs`` (sorted set by creation), ``job:<id>:events``
and ``job:<id>:checkpoints`` (lists of JSON), ``job:<id>:data`` (uploaded rows, JSONL),
``job:<id>:cancel`` (flag), ``job:<id>:lease`` (the worker running it, with a TTL heartbeat),
``adapter:<name>:version`` (a counter: each job takes its output version once).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from jobs.models import Checkpoint, Job, JobEvent

PREFIX = "faithlens:"


class JobStore:
    """Synchronous Redis access (workers use it directly; the API calls it from a thread)."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")

    # -- jobs ------------------------------------------------------------------------------------------
    def create(self, job: Job, rows: list[dict] | None = None) -> Job:
        pipe = self.redis.pipeline()
        pipe.set(self._key(job.id), job.model_dump_json())
        pipe.zadd(f"{PREFIX}jobs", {job.id: job.created_at + time.time() % 1})
        if rows is not None:
            pipe.set(self._key(job.id, "data"), "\n".join(json.dumps(r) for r in rows))
        pipe.execute()
        self.event(job.id, f"job created ({job.method.get('type')})")
        return job

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.get(self._key(job_id))
        return Job.model_validate_json(raw) if raw else None

    def save(self, job: Job) -> None:
        self.redis.set(self._key(job.id), job.model_dump_json())

    def update(self, job_id: str, **fields: Any) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        job = job.model_copy(update=fields)
        self.save(job)
        return job

    def list(self, limit: int = 20, after: str | None = None) -> list[Job]:
        ids = self.redis.zrevrange(f"{PREFIX}jobs", 0, -1)
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        jobs = [self.get(i) for i in ids[:limit]]
        return [j for j in jobs if j is not None]

    def rows(self, job_id: str) -> list[dict] | None:
        raw = self.redis.get(self._key(job_id, "data"))
        return None if raw is None else [json.loads(line) for line in raw.splitlines() if line]

    # -- events and checkpoints ---------------------------------------------------------------------------
    def event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        event = JobEvent(created_at=time.time(), level=level, message=message, type=type, data=data)
        self.redis.rpush(self._key(job_id, "events"), event.model_dump_json())

    def events(self, job_id: str, start: int = 0) -> list[JobEvent]:
        return [
            JobEvent.model_validate_json(e) for e in self.redis.lrange(self._key(job_id, "events"), start, -1)
        ]

    def add_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> None:
        self.redis.rpush(self._key(job_id, "checkpoints"), checkpoint.model_dump_json())

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return [
            Checkpoint.model_validate_json(c)
            for c in self.redis.lrange(self._key(job_id, "checkpoints"), 0, -1)
        ]

    # -- control ------------------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self._key(job_id, "cancel"), "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._key(job_id, "cancel")))

    def take_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """Only one worker runs a job at a time; a dead worker's lease expires after ``ttl_s``."""
        return bool(self.redis.set(self._key(job_id, "lease"), owner, nx=True, ex=ttl_s))

    def renew_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        key = self._key(job_id, "lease")
        if self.redis.get(key) != owner:
            return False
        return bool(self.redis.expire(key, ttl_s))

    def release_lease(self, job_id: str, owner: str) -> None:
        key = self._key(job_id, "lease")
        if self.redis.get(key) == owner:
            self.redis.delete(key)

    def next_adapter_version(self, name: str) -> int:
        return int(self.redis.incr(f"{PREFIX}adapter:{name}:version"))
