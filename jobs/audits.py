"""Audits at dataset scale: the audit object (shaped like OpenAI's Batch API ``batch``), its rows, shards,
results, report and events, and their Redis store. Shared by the service (which creates and reads audits)
and the workers (which run their shards).

Keys (prefix ``faithlens:``): ``audit:<id>`` (the record, JSON), ``audits`` and ``audits:owner:<owner>``
(sorted sets by creation), ``audit:<id>:spec`` (what each row runs: analysis, sampling, adapter path),
``audit:<id>:rows`` (the input rows, a list of JSON in input order), ``audit:<id>:results`` (a hash: row
index → result JSON), ``audit:<id>:shard:<k>:done`` (the marker of a finished shard: who ran it),
``audit:<id>:shard:<k>:lease`` (the worker running it, with a TTL), ``audit:<id>:runs`` (one entry per
shard execution: a counter of how often each shard really ran), ``audit:<id>:report`` (the reports asked for, JSON),
``audit:<id>:events`` and ``audit:<id>:cancel`` (flag).

A shard's results, its ``done`` marker, the record's ``request_counts`` and its event are written in one
MULTI/EXEC that fails if the marker appeared meanwhile, so a finished shard is never written (or counted)
twice, and a redelivered shard whose marker exists is skipped. Every change to the record is atomic
(WATCH/MULTI, retried on a conflict) and moves its status only along :data:`TRANSITIONS`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from jobs.models import IllegalTransition
from jobs.store import PREFIX, newest_first, redis_client, update_record, watched

RUN_AUDIT_SHARD_TASK = "faithlens.run_audit_shard"
AuditStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"
]
TERMINAL = {"completed", "failed", "cancelled"}
REPORTS = ("summary", "rhythm")  # the report names an audit may ask for (docs/api.md)
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating": frozenset({"in_progress", "failed", "cancelling", "cancelled"}),
    "in_progress": frozenset({"finalizing", "failed", "cancelling"}),
    "finalizing": frozenset({"completed", "failed"}),
    "cancelling": frozenset({"cancelled", "failed"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class AuditRowError(BaseModel):
    code: str
    message: str
    line: int | None = Field(default=None, description="The input row (1-based), when one is to blame.")


class AuditErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditRowError]


class RequestCounts(BaseModel):
    total: int
    completed: int = Field(default=0, description="Rows analysed.")
    failed: int = Field(default=0, description="Rows that could not be analysed (each result says why).")


class Audit(BaseModel):
    id: str
    object: Literal["audit"] = "audit"
    status: AuditStatus = "validating"
    model: str
    adapter: str | None = None
    input: str = Field(
        description="`inline`, `upload`, or a data set's name (`gsm8k-dev`, `arith-add:1-50/heldout`)."
    )
    analysis: dict[str, Any] = Field(description="The analysis options (as for /v1/analyze), in full.")
    sampling: dict[str, Any] = Field(description="How rows without a completion are generated.")
    reports: list[str]
    metadata: dict[str, str] = Field(default_factory=dict)
    owner: str | None = Field(
        default=None,
        description="Who created the audit: a non-reversible id of its API key (as for jobs); null when "
        "the server runs without keys.",
    )
    request_counts: RequestCounts
    shards: int = Field(description="How many shards the rows were split into.")
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: AuditErrors | None = None


class AuditEvent(BaseModel):
    object: Literal["audit.event"] = "audit.event"
    created_at: float
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: dict[str, Any] | None = None


def new_audit_id() -> str:
    return f"audit_{uuid.uuid4().hex[:24]}"


def shard_bounds(total: int, size: int, shard: int) -> tuple[int, int]:
    return shard * size, min((shard + 1) * size, total)


def shard_count(total: int, size: int) -> int:
    return max(1, -(-total // size))


def check_transition(audit_id: str, current: str, requested: str) -> None:
    if requested not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(audit_id, current, requested)


class ShardAlreadyDone(Exception):
    """The shard's ``done`` marker exists: its results are written; nothing was written now."""


Change = Callable[[Audit], dict[str, Any]]


class AuditStore:
    """Synchronous Redis access (workers use it directly; the API calls it from a thread)."""

    def __init__(self, url: str, patient: bool = False) -> None:
        self.redis = redis_client(url, patient)

    @classmethod
    def from_client(cls, client: redis.Redis) -> AuditStore:
        """A store on an existing client (``decode_responses=True``): the API shares the job store's."""
        store = cls.__new__(cls)
        store.redis = client
        return store

    def _key(self, audit_id: str, part: str = "") -> str:
        return f"{PREFIX}audit:{audit_id}" + (f":{part}" if part else "")

    @staticmethod
    def _owner_key(owner: str) -> str:
        return f"{PREFIX}audits:owner:{owner}"

    # -- audits ----------------------------------------------------------------------------------------
    def create(self, audit: Audit, rows: list[dict], spec: dict[str, Any]) -> Audit:
        pipe = self.redis.pipeline()
        pipe.set(self._key(audit.id, "spec"), json.dumps(spec))
        for start in range(0, len(rows), 1000):
            pipe.rpush(self._key(audit.id, "rows"), *(json.dumps(r) for r in rows[start : start + 1000]))
        pipe.set(self._key(audit.id), audit.model_dump_json())
        score = audit.created_at + time.time() % 1
        pipe.zadd(f"{PREFIX}audits", {audit.id: score})
        if audit.owner is not None:
            pipe.zadd(self._owner_key(audit.owner), {audit.id: score})
        pipe.execute()
        self.event(audit.id, f"audit created: {len(rows)} rows in {audit.shards} shards")
        return audit

    def get(self, audit_id: str) -> Audit | None:
        raw = self.redis.get(self._key(audit_id))
        return Audit.model_validate_json(raw) if raw else None

    def list(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> list[Audit]:
        key = f"{PREFIX}audits" if owner is None else self._owner_key(owner)
        return newest_first(self.redis, key, self._key, Audit, limit, after)

    def set_status(self, audit_id: str, status: str, **fields: Any) -> Audit:
        """Move to ``status`` (a legal transition, else :class:`IllegalTransition` and nothing written),
        stamping its ``<status>_at``."""

        def change(audit: Audit) -> dict[str, Any]:
            check_transition(audit.id, audit.status, status)
            return {"status": status, _TIMESTAMP[status]: int(time.time()), **fields}

        return self._transact(audit_id, change)

    def cancel(self, audit_id: str) -> Audit:
        """Ask an audit to stop: it becomes ``cancelling`` and its workers stop at their next row. A
        finished one raises :class:`IllegalTransition` (and is left alone)."""
        flag = self._key(audit_id, "cancel")

        def change(audit: Audit) -> dict[str, Any]:
            if audit.status in TERMINAL:
                raise IllegalTransition(audit.id, audit.status, "cancelled")
            if audit.status == "cancelling":
                return {}
            if audit.status == "finalizing":  # every row is done: it completes
                raise IllegalTransition(audit.id, audit.status, "cancelled")
            return {"status": "cancelling", "cancelling_at": int(time.time())}

        return self._transact(audit_id, change, also=lambda pipe: pipe.set(flag, "1"))

    def _transact(
        self, audit_id: str, change: Change, also: Callable[[redis.client.Pipeline], object] | None = None
    ) -> Audit:
        return update_record(self.redis, self._key(audit_id), Audit, audit_id, change, also)[0]

    # -- rows, shards, results -------------------------------------------------------------------------
    def spec(self, audit_id: str) -> dict[str, Any]:
        raw = self.redis.get(self._key(audit_id, "spec"))
        return json.loads(raw) if raw else {}

    def rows(self, audit_id: str, start: int = 0, end: int = -1) -> list[dict]:
        """Rows ``[start, end)`` (all with ``end=-1``), in input order."""
        stop = -1 if end < 0 else end - 1
        return [json.loads(r) for r in self.redis.lrange(self._key(audit_id, "rows"), start, stop)]

    def shard_done(self, audit_id: str, shard: int) -> dict | None:
        raw = self.redis.get(self._key(audit_id, f"shard:{shard}:done"))
        return json.loads(raw) if raw else None

    def done_shards(self, audit_id: str, shards: int) -> int:
        keys = [self._key(audit_id, f"shard:{k}:done") for k in range(shards)]
        return sum(1 for v in self.redis.mget(keys) if v) if keys else 0

    def record_run(self, audit_id: str, shard: int, worker: str) -> int:
        """Count one execution of ``shard`` by ``worker`` (before its first row); returns how many runs
        that shard has had."""
        self.redis.rpush(
            self._key(audit_id, "runs"), json.dumps({"shard": shard, "worker": worker, "at": time.time()})
        )
        return int(self.redis.hincrby(self._key(audit_id, "runcount"), str(shard), 1))

    def runs(self, audit_id: str) -> list[dict]:
        return [json.loads(r) for r in self.redis.lrange(self._key(audit_id, "runs"), 0, -1)]

    def finish_shard(self, audit_id: str, shard: int, worker: str, results: dict[int, dict]) -> Audit:
        """Write a finished shard's ``results`` (row index → result), its ``done`` marker, the counts and
        an event in one MULTI/EXEC; :class:`ShardAlreadyDone` if the marker exists (nothing written)."""
        key, done = self._key(audit_id), self._key(audit_id, f"shard:{shard}:done")
        failed = sum(1 for r in results.values() if r.get("error") is not None)
        event = AuditEvent(
            created_at=time.time(),
            message=f"shard {shard} finished ({len(results)} rows, {failed} failed)",
            data={"shard": shard, "worker": worker, "rows": len(results), "failed": failed},
        )

        def body(pipe: redis.client.Pipeline) -> Audit:
            if pipe.exists(done):
                raise ShardAlreadyDone(f"audit {audit_id} shard {shard}")
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(audit_id)
            audit = Audit.model_validate_json(raw)
            counts = audit.request_counts
            updated = audit.model_copy(
                update={
                    "request_counts": RequestCounts(
                        total=counts.total,
                        completed=counts.completed + len(results) - failed,
                        failed=counts.failed + failed,
                    )
                }
            )
            pipe.multi()
            if results:
                pipe.hset(
                    self._key(audit_id, "results"),
                    mapping={str(i): json.dumps(r) for i, r in results.items()},
                )
            marker = {"worker": worker, "finished_at": time.time(), "rows": len(results)}
            pipe.set(done, json.dumps(marker))
            pipe.set(key, updated.model_dump_json())
            pipe.rpush(self._key(audit_id, "events"), event.model_dump_json())
            return updated

        return watched(self.redis, [key, done], body, f"audit {audit_id}")

    def results(self, audit_id: str, indices: list[int]) -> list[dict | None]:
        if not indices:
            return []
        raws = self.redis.hmget(self._key(audit_id, "results"), [str(i) for i in indices])
        return [json.loads(r) if r else None for r in raws]

    def row_count(self, audit_id: str) -> int:
        return int(self.redis.llen(self._key(audit_id, "rows")))

    def set_report(self, audit_id: str, report: dict[str, Any]) -> None:
        self.redis.set(self._key(audit_id, "report"), json.dumps(report))

    def report(self, audit_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._key(audit_id, "report"))
        return json.loads(raw) if raw else None

    # -- events and control ----------------------------------------------------------------------------
    def event(self, audit_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        event = AuditEvent(created_at=time.time(), level=level, message=message, data=data)
        self.redis.rpush(self._key(audit_id, "events"), event.model_dump_json())

    def events(self, audit_id: str, start: int = 0) -> list[AuditEvent]:
        return [
            AuditEvent.model_validate_json(e)
            for e in self.redis.lrange(self._key(audit_id, "events"), start, -1)
        ]

    def cancel_requested(self, audit_id: str) -> bool:
        return bool(self.redis.exists(self._key(audit_id, "cancel")))

    def take_lease(self, audit_id: str, shard: int, owner: str, ttl_s: int) -> bool:
        return bool(self.redis.set(self._key(audit_id, f"shard:{shard}:lease"), owner, nx=True, ex=ttl_s))

    def renew_lease(self, audit_id: str, shard: int, owner: str, ttl_s: int) -> bool:
        from jobs.store import _RENEW

        return bool(self.redis.eval(_RENEW, 1, self._key(audit_id, f"shard:{shard}:lease"), owner, ttl_s))

    def release_lease(self, audit_id: str, shard: int, owner: str) -> None:
        from jobs.store import _RELEASE

        self.redis.eval(_RELEASE, 1, self._key(audit_id, f"shard:{shard}:lease"), owner)

    def lease_holder(self, audit_id: str, shard: int) -> str | None:
        return self.redis.get(self._key(audit_id, f"shard:{shard}:lease"))

    def leases_held(self, audit_id: str, shards: int) -> int:
        keys = [self._key(audit_id, f"shard:{k}:lease") for k in range(shards)]
        return sum(1 for v in self.redis.mget(keys) if v) if keys else 0
