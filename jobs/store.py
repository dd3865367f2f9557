"""The job store in Redis. The API writes jobs here and enqueues their ids; workers update them.

Keys (prefix ``faithlens:``): ``job:<id>`` (JSON), ``jobs`` (sorted set by creation), ``jobs:owner:<owner>``
(the same, per owner), ``job:<id>:events`` and ``job:<id>:checkpoints`` (lists of JSON), ``job:<id>:data``
(uploaded rows, JSONL), ``job:<id>:cancel`` (flag), ``job:<id>:lease`` (the worker running it, with a TTL
heartbeat), ``adapter:<name>:version`` (a counter: each job takes its output version once),
``adapter:<name>:owner`` (who first trained into that adapter name).

Every change to a job record is atomic (optimistic: WATCH the record, re-read it, write it in MULTI/EXEC,
retry on a conflict) and its status may only move along :data:`jobs.models.TRANSITIONS`, so a cancel and
a step update never overwrite each other and a finished job stays finished.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from pydantic import BaseModel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.models import TERMINAL, Checkpoint, IllegalTransition, Job, JobEvent, check_transition

if TYPE_CHECKING:
    from jobs.journal import Journal

PREFIX = "faithlens:"
MAX_ATTEMPTS = 1000  # optimistic retries of one update before giving up (only under pathological contention)

# Lease release and renewal compare the holder and act in one step (a GET then a DEL could drop a lease
# that expired and was taken by another worker in between).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_AT_LEAST = (
    "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 0"
)


class StoreContention(RuntimeError):
    """An update lost its optimistic race :data:`MAX_ATTEMPTS` times in a row."""


Change = Callable[[Job], dict[str, Any]]


T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def redis_client(url: str, patient: bool = False) -> redis.Redis:
    """A client that decodes responses; ``patient``: it retries calls through a Redis that is briefly
    away (about 30 s), as a worker in the middle of its work should (the API answers 503 at once)."""
    retry: dict[str, Any] = {}
    if patient:
        retry = {
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=40),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        }
    return redis.Redis.from_url(url, decode_responses=True, **retry)


def newest_first(
    client: redis.Redis,
    index: str,
    record_key: Callable[[str], str],
    model: type[M],
    limit: int,
    after: str | None,
) -> list[M]:
    """A page of the records listed in the sorted set ``index``, newest first, from the one after
    ``after`` (an unknown ``after`` starts at the newest); ids whose record is gone are skipped."""
    start = 0
    if after is not None:
        rank = client.zrevrank(index, after)
        if rank is not None:
            start = rank + 1
    ids = client.zrevrange(index, start, start + limit - 1)
    raws = client.mget([record_key(i) for i in ids]) if ids else []
    return [model.model_validate_json(raw) for raw in raws if raw]


def watched(client: redis.Redis, keys: list[str], body: Callable[[redis.client.Pipeline], T], what: str) -> T:
    """Optimistic concurrency: run ``body`` with ``keys`` WATCHed. It reads through the pipeline, calls
    ``pipe.multi()`` and queues its writes; if anyone wrote a watched key in between, nothing is written and
    ``body`` runs again from a fresh read."""
    with client.pipeline() as pipe:
        for _ in range(MAX_ATTEMPTS):
            try:
                pipe.watch(*keys)
                result = body(pipe)
                pipe.execute()
                return result
            except redis.WatchError:
                time.sleep(random.uniform(0, 0.002))
            finally:
                pipe.reset()
    raise StoreContention(f"{what}: {MAX_ATTEMPTS} conflicting writes in a row")


def update_record(
    client: redis.Redis,
    key: str,
    model: type[M],
    ident: str,
    change: Callable[[M], dict[str, Any]],
    also: Callable[[redis.client.Pipeline], object] | None = None,
) -> tuple[M, bool]:
    """Read the JSON record at ``key``, let ``change`` compute its new fields (or raise), and write them
    (plus whatever ``also`` queues) atomically; KeyError(``ident``) when there is no record. Returns the
    record as written and whether any field changed."""

    def body(pipe: redis.client.Pipeline) -> tuple[M, bool]:
        raw = pipe.get(key)
        if raw is None:
            raise KeyError(ident)
        record = model.model_validate_json(raw)
        fields = change(record)
        updated = model.model_validate({**record.model_dump(), **fields}) if fields else record
        pipe.multi()
        if fields:
            pipe.set(key, updated.model_dump_json())
        if also is not None:
            also(pipe)
        return updated, bool(fields)

    return watched(client, [key], body, f"{model.__name__.lower()} {ident}")


class JobStore:
    """Synchronous Redis access (workers use it directly; the API calls it from a thread). With a
    ``journal``, every job record written is also written to disk (:mod:`jobs.journal`)."""

    def __init__(self, url: str, journal: Journal | None = None, patient: bool = False) -> None:
        """``patient``: see :func:`redis_client`."""
        self.redis = redis_client(url, patient)
        self.journal = journal

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")

    @staticmethod
    def _owner_key(owner: str) -> str:
        return f"{PREFIX}jobs:owner:{owner}"

    # -- jobs ------------------------------------------------------------------------------------------
    def create(self, job: Job, rows: list[dict] | None = None) -> Job:
        pipe = self.redis.pipeline()
        pipe.set(self._key(job.id), job.model_dump_json())
        score = job.created_at + time.time() % 1
        pipe.zadd(f"{PREFIX}jobs", {job.id: score})
        if job.owner is not None:
            pipe.zadd(self._owner_key(job.owner), {job.id: score})
        if rows is not None:
            pipe.set(self._key(job.id, "data"), "\n".join(json.dumps(r) for r in rows))
        pipe.execute()
        if self.journal is not None:
            self.journal.write(job, rows)
        self.event(job.id, f"job created ({job.method.get('type')})")
        return job

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.get(self._key(job_id))
        return Job.model_validate_json(raw) if raw else None

    def update(self, job_id: str, **fields: Any) -> Job:
        """Set ``fields`` atomically. A ``status`` must be a legal transition from the job's current one
        (else :class:`IllegalTransition`, and nothing is written); KeyError for an unknown job."""
        unknown = set(fields) - set(Job.model_fields)
        if unknown:
            raise TypeError(f"unknown job fields: {sorted(unknown)}")

        def change(job: Job) -> dict[str, Any]:
            if "status" in fields:
                check_transition(job.id, job.status, fields["status"])
            return fields

        return self._transact(job_id, change)

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop, atomically: a queued job becomes ``cancelled`` at once; a running one gets
        the cancel flag, which its worker honours within a bounded time. A finished job raises
        :class:`IllegalTransition` (and is left alone)."""
        flag = self._key(job_id, "cancel")

        def change(job: Job) -> dict[str, Any]:
            if job.status in TERMINAL:
                raise IllegalTransition(job.id, job.status, "cancelled")
            if job.status == "queued":
                return {"status": "cancelled", "finished_at": int(time.time())}
            return {}

        return self._transact(job_id, change, also=lambda pipe: pipe.set(flag, "1"))

    def _transact(
        self, job_id: str, change: Change, also: Callable[[redis.client.Pipeline], object] | None = None
    ) -> Job:
        """Read the job, let ``change`` compute its new fields from it (or raise), and write them (plus
        whatever ``also`` queues) in one MULTI/EXEC that fails if anyone wrote the job in between; then
        try again from the fresh record. A record Redis lost is first restored from the journal."""
        key = self._key(job_id)
        if self.journal is not None and not self.redis.exists(key):
            self._restore_from_journal(job_id)
        updated, changed = update_record(self.redis, key, Job, job_id, change, also)
        if changed and self.journal is not None:
            self.journal.write(updated)
        return updated

    def list(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> list[Job]:
        """Newest first, from the one after ``after`` (an unknown ``after`` starts at the newest).
        ``owner`` given: only that owner's jobs."""
        key = f"{PREFIX}jobs" if owner is None else self._owner_key(owner)
        return newest_first(self.redis, key, self._key, Job, limit, after)

    def all_ids(self) -> list[str]:
        return self.redis.zrange(f"{PREFIX}jobs", 0, -1)

    def rows(self, job_id: str) -> list[dict] | None:
        raw = self.redis.get(self._key(job_id, "data"))
        return None if raw is None else [json.loads(line) for line in raw.splitlines() if line]

    def restore(
        self, job: Job, rows: list[dict] | None, checkpoints: list[Checkpoint], min_version: int = 0
    ) -> None:
        """Write a job back as it was (the reaper, after Redis lost its data): its record, rows and
        checkpoints; the adapter's version counter is put at ``min_version`` at least."""
        pipe = self.redis.pipeline()
        pipe.set(self._key(job.id), job.model_dump_json())
        pipe.zadd(f"{PREFIX}jobs", {job.id: job.created_at})
        if job.owner is not None:
            pipe.zadd(self._owner_key(job.owner), {job.id: job.created_at})
        if rows is not None:
            pipe.set(self._key(job.id, "data"), "\n".join(json.dumps(r) for r in rows))
        pipe.delete(self._key(job.id, "checkpoints"))
        for checkpoint in checkpoints:
            pipe.rpush(self._key(job.id, "checkpoints"), checkpoint.model_dump_json())
        pipe.eval(_AT_LEAST, 1, f"{PREFIX}adapter:{job.adapter_name}:version", min_version)
        pipe.execute()
        if self.journal is not None:
            self.journal.write(job)

    def _restore_from_journal(self, job_id: str) -> None:
        """Redis no longer has this job (it lost its data) but its copy on disk does: write it back, as
        the reaper would, before changing it. The reaper does the same for jobs nobody is touching."""
        assert self.journal is not None
        saved = self.journal.read(job_id)
        if saved is None:
            return
        versions = self.journal.versions(saved.adapter_name)
        self.restore(
            saved, self.journal.rows(job_id), self.journal.checkpoints(saved), max(versions, default=0)
        )
        self.event(job_id, "restored from the adapter store after Redis lost its data", level="warn")

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
        """Only the flag; :meth:`cancel` is what the API calls."""
        self.redis.set(self._key(job_id, "cancel"), "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._key(job_id, "cancel")))

    def take_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """Only one worker runs a job at a time; a dead worker's lease expires after ``ttl_s``."""
        return bool(self.redis.set(self._key(job_id, "lease"), owner, nx=True, ex=ttl_s))

    def renew_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        return bool(self.redis.eval(_RENEW, 1, self._key(job_id, "lease"), owner, ttl_s))

    def release_lease(self, job_id: str, owner: str) -> None:
        self.redis.eval(_RELEASE, 1, self._key(job_id, "lease"), owner)

    def lease_holder(self, job_id: str) -> str | None:
        return self.redis.get(self._key(job_id, "lease"))

    def next_adapter_version(self, name: str) -> int:
        return int(self.redis.incr(f"{PREFIX}adapter:{name}:version"))

    def adapter_owner(self, name: str) -> str | None:
        return self.redis.get(f"{PREFIX}adapter:{name}:owner")

    def claim_adapter(self, name: str, claimant: str) -> str:
        """Record ``claimant`` as the owner of adapter ``name`` unless someone already is; returns the
        owner (``claimant`` if this call made the claim)."""
        key = f"{PREFIX}adapter:{name}:owner"
        if self.redis.set(key, claimant, nx=True):
            return claimant
        return self.redis.get(key) or claimant
