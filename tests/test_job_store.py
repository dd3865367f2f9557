"""The job store on a real Redis (a private redis-server on a free port, so no other test's workers or
reapers see these jobs): atomic updates, the legal status transitions, a cancel racing step updates, and
owners' listings."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs.models import TERMINAL, IllegalTransition, Job, new_job_id
from jobs.store import JobStore
from service.launcher import redis_server_binary
from tests.servers import free_port

STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"]
# The spec of the issue, written out (not read from jobs.models.TRANSITIONS): queued→running|cancelled|
# failed, running→queued (re-queue)|succeeded|failed|cancelled, the re-claims queued→queued and
# running→running, and nothing out of a terminal status.
LEGAL = {
    ("queued", "queued"),
    ("queued", "running"),
    ("queued", "cancelled"),
    ("queued", "failed"),
    ("running", "running"),
    ("running", "queued"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
}


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (no persistence); yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def store(redis_url) -> JobStore:
    return JobStore(redis_url)


def new_job(store: JobStore, status: str = "queued", owner: str | None = None, created_at: int = 0) -> Job:
    job = Job(
        id=new_job_id(),
        status=status,  # type: ignore[arg-type]
        created_at=created_at or int(time.time()),
        model="tiny",
        method={"type": "grpo"},
        hyperparameters={},
        training_data="gsm8k-train",
        adapter_name="a",
        owner=owner,
    )
    return store.create(job)


@pytest.mark.parametrize("current", STATUSES)
def test_only_legal_transitions_are_written(store, current):
    for requested in STATUSES:
        job = new_job(store, current)
        if (current, requested) in LEGAL:
            assert store.update(job.id, status=requested, step=7).status == requested
            assert store.get(job.id).step == 7
        else:
            with pytest.raises(IllegalTransition) as caught:
                store.update(job.id, status=requested, step=7)
            assert caught.value.current == current and caught.value.requested == requested
            assert current in str(caught.value) and requested in str(caught.value)
            unchanged = store.get(job.id)
            assert unchanged.status == current and unchanged.step == 0  # nothing was written


def test_update_refuses_unknown_jobs_and_fields(store):
    with pytest.raises(KeyError):
        store.update("ftjob-" + "0" * 24, step=1)
    job = new_job(store)
    with pytest.raises(TypeError):
        store.update(job.id, stauts="running")
    # a field-only update of a finished job is fine (a late step count), its status is not
    store.update(job.id, status="running")
    store.update(job.id, status="succeeded")
    assert store.update(job.id, step=3).status == "succeeded"


def test_cancel_queued_running_and_finished(store):
    queued = new_job(store)
    cancelled = store.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert store.cancel_requested(queued.id)

    running = new_job(store, "running")
    assert store.cancel(running.id).status == "running"  # its worker stops it, seeing the flag
    assert store.cancel_requested(running.id)

    for status in TERMINAL:
        job = new_job(store, status)
        with pytest.raises(IllegalTransition):
            store.cancel(job.id)
        assert store.get(job.id).status == status and not store.cancel_requested(job.id)


def _hammer(url: str, job_id: str, stop: threading.Event, counts: list[int]) -> None:
    """A worker's step updates, as fast as it can, on a connection of its own."""
    mine = JobStore(url)
    i = 0
    while not stop.is_set():
        i += 1
        mine.update(job_id, step=i)
        counts.append(i)


def test_a_cancel_racing_step_updates_is_never_lost(redis_url, store):
    """The attack: while three writers update a job's step as fast as they can, the API cancels it. With
    a read-modify-write update, a writer that read the job before the cancel writes it back as queued
    (or running) after it: the cancel is lost. 150 rounds, each with a random delay before the cancel."""
    for round_ in range(150):
        job = new_job(store, "queued" if round_ % 2 == 0 else "running")
        stop = threading.Event()
        counts: list[list[int]] = [[] for _ in range(3)]
        writers = [
            threading.Thread(target=_hammer, args=(redis_url, job.id, stop, c), daemon=True) for c in counts
        ]
        for w in writers:
            w.start()
        time.sleep(random.uniform(0, 0.004))
        if job.status == "queued":
            store.cancel(job.id)  # the API's cancel
        else:
            store.update(job.id, status="cancelled", finished_at=int(time.time()))  # the worker's
        seen = [len(c) for c in counts]
        while any(len(c) < s + 3 for c, s in zip(counts, seen, strict=True)):
            time.sleep(0.0005)  # every writer gets in a few more updates after the cancel
        stop.set()
        for w in writers:
            w.join(timeout=10)
        final = store.get(job.id)
        assert final.status == "cancelled", f"round {round_}: the cancel was lost ({final.status})"
        assert final.finished_at is not None
        assert final.step > 0  # and the step updates were not refused: a field-only update is fine


def test_a_finished_jobs_status_never_changes(redis_url, store):
    """Two finishers race (a worker's success against a cancel); exactly one wins, and afterwards every
    status change (a redelivered worker starting it, a reaper re-queueing it) is refused while step
    updates keep landing."""
    for _ in range(50):
        job = new_job(store, "running")
        results: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def finish(status: str, results=results, job=job, barrier=barrier) -> None:
            mine = JobStore(redis_url)
            barrier.wait()
            try:
                mine.update(job.id, status=status, finished_at=int(time.time()))
                results[status] = "won"
            except IllegalTransition:
                results[status] = "lost"

        racers = [threading.Thread(target=finish, args=(s,)) for s in ("succeeded", "cancelled")]
        for r in racers:
            r.start()
        for r in racers:
            r.join(timeout=10)
        assert sorted(results.values()) == ["lost", "won"], results
        winner = next(s for s, outcome in results.items() if outcome == "won")
        stop = threading.Event()
        counts: list[int] = []
        writer = threading.Thread(target=_hammer, args=(redis_url, job.id, stop, counts), daemon=True)
        writer.start()
        for status in STATUSES:
            with pytest.raises(IllegalTransition):
                store.update(job.id, status=status)
        with pytest.raises(IllegalTransition):
            store.cancel(job.id)
        stop.set()
        writer.join(timeout=10)
        assert store.get(job.id).status == winner


def test_listing_by_owner_pages_newest_first(store):
    owner_a, owner_b = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    base = int(time.time()) + 1000
    mine = [new_job(store, owner=owner_a, created_at=base + i) for i in range(5)]
    theirs = [new_job(store, owner=owner_b, created_at=base + 10 + i) for i in range(2)]
    listed = [j.id for j in store.list(limit=10, owner=owner_a)]
    assert listed == [j.id for j in reversed(mine)]
    page = [j.id for j in store.list(limit=2, after=listed[1], owner=owner_a)]
    assert page == listed[2:4]
    # another owner's id as ``after`` is unknown in this listing: it starts at the newest, nothing leaks
    assert [j.id for j in store.list(limit=2, after=theirs[0].id, owner=owner_a)] == listed[:2]
    everyone = [j.id for j in store.list(limit=1000)]
    assert {j.id for j in mine + theirs} <= set(everyone)


def test_a_lease_is_released_or_renewed_only_by_its_holder(store):
    job = new_job(store)
    assert store.take_lease(job.id, "w1", 30)
    assert not store.take_lease(job.id, "w2", 30)
    assert not store.renew_lease(job.id, "w2", 30)
    store.release_lease(job.id, "w2")
    assert store.lease_holder(job.id) == "w1"
    assert store.renew_lease(job.id, "w1", 30)
    store.release_lease(job.id, "w1")
    assert store.lease_holder(job.id) is None
