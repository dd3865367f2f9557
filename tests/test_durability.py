"""Jobs survive Redis and their workers: real redis-server processes on private ports (restarted with and
without persistence), a real server and real Celery worker processes on the tiny model.

Each test has its own Redis, queue and adapter store. What must hold: the job ends ``succeeded`` with
exactly one adapter version (or ``failed`` saying why), its steps continue from where they were or from a
checkpoint (never from step 1 again), and it is never silently gone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from faithlens.tiny import save_tiny
from service.launcher import redis_server_binary
from tests.servers import Server, free_port, start_server
from tests.test_jobs import ROWS, TINY_JOB, Worker

LONG_JOB = {**TINY_JOB, "max_steps": 24, "checkpoint_every": 2}


class RedisProcess:
    """A private redis-server that a test can stop and start again on the same port and directory."""

    def __init__(self, workdir: Path, aof: bool) -> None:
        self.dir, self.aof, self.port = workdir, aof, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.dir),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # a crash: nothing is flushed beyond what AOF already has
            self.proc.wait()

    def restart(self, down_s: float = 3.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def stack(tmp_path):
    """Per test: a fresh Redis (the test picks its persistence), a server and the workers' environment."""

    def make(aof: bool) -> tuple[RedisProcess, Server, dict[str, str], Path]:
        redis_proc = RedisProcess(tmp_path / "redis", aof)
        made.append(redis_proc)
        server = start_server(
            tmp_path,
            save_tiny(tmp_path / "tiny-llama"),
            REDIS_URL=redis_proc.url,
            FAITHLENS_JOB_QUEUE=f"faithlens-jobs-durable-{uuid.uuid4().hex[:8]}",
            FAITHLENS_JOB_VISIBILITY_TIMEOUT_S="6",
            FAITHLENS_JOB_LEASE_TTL_S="4",
            FAITHLENS_REAPER_INTERVAL_S="1",
            FAITHLENS_REAPER_GRACE_S="2",
            FAITHLENS_TORCH_THREADS="1",
        )
        made.append(server)
        return redis_proc, server, {**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}, tmp_path

    made: list = []
    yield make
    for thing in reversed(made):
        thing.stop()


def _get(c: httpx.Client, path: str) -> dict | None:
    """A GET that tolerates the moments when Redis is down (503) or restarting."""
    try:
        r = c.get(path)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _wait(c: httpx.Client, job_id: str, until, timeout: float = 300) -> dict:
    deadline, job = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        job = _get(c, f"/v1/jobs/{job_id}") or job
        if job is not None and until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job did not get there: {job}")


def _create(c: httpx.Client, name: str) -> dict:
    body = {"method": {"type": "grpo", **LONG_JOB}, "training_data": ROWS, "adapter_name": name, "seed": 1}
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _steps(c: httpx.Client, job_id: str) -> list[int]:
    events = (_get(c, f"/v1/jobs/{job_id}/events") or {"data": []})["data"]
    return [e["data"]["step"] for e in events if e["type"] == "metrics"]


def _versions(server: Server, name: str) -> list[str]:
    return sorted(p.name for p in (server.store / name).iterdir() if p.name.isdigit())


def _assert_one_adapter(server: Server, done: dict, name: str) -> None:
    assert done["status"] == "succeeded", done
    assert _versions(server, name) == [str(done["result_version"])]
    manifest = json.loads((server.store / name / str(done["result_version"]) / "manifest.json").read_text())
    assert manifest["job_id"] == done["id"]


def test_aof_restart_mid_job_finishes_once(stack):
    redis_proc, server, env, work = stack(aof=True)
    worker = Worker(env, work / "worker.log")
    try:
        with server.client() as c:
            job = _create(c, "durable-aof")
            _wait(c, job["id"], lambda j: j["step"] >= 3)
            redis_proc.restart(down_s=3)
            done = _wait(c, job["id"], lambda j: j["status"] in {"succeeded", "failed", "cancelled"})
            _assert_one_adapter(server, done, "durable-aof")
            steps = _steps(c, job["id"])
            assert steps[-1] == LONG_JOB["max_steps"]
            assert steps.count(1) == 1, f"started over: {steps}"  # continued, or resumed from a checkpoint
    finally:
        worker.stop()


def test_no_persistence_restart_rebuilds_the_job(stack):
    redis_proc, server, env, work = stack(aof=False)
    worker = Worker(env, work / "worker.log")
    try:
        with server.client() as c:
            job = _create(c, "durable-none")
            _wait(c, job["id"], lambda j: j["step"] >= 3)
            redis_proc.restart(down_s=1)  # every key is gone: the job record, its queue message, the lease
            done = _wait(c, job["id"], lambda j: j["status"] in {"succeeded", "failed", "cancelled"})
            if done["status"] == "failed":
                assert done["error"]["message"], done  # allowed only with a reason
            else:
                _assert_one_adapter(server, done, "durable-none")
            events = (_get(c, f"/v1/jobs/{job['id']}/events") or {"data": []})["data"]
            assert any("Redis lost its data" in e["message"] for e in events), events
            assert 1 not in _steps(c, job["id"])  # the rebuilt history resumes, it does not start over
    finally:
        worker.stop()


def test_a_job_queued_while_redis_loses_everything_is_not_lost(stack):
    """Nobody has started it yet: only the server's copy in the adapter store remembers it."""
    redis_proc, server, env, work = stack(aof=False)
    with server.client() as c:
        job = _create(c, "durable-queued")
        redis_proc.restart(down_s=0.5)
        worker = Worker(env, work / "worker.log")  # starts after the loss, reaps, rebuilds, runs it
        try:
            done = _wait(c, job["id"], lambda j: j["status"] in {"succeeded", "failed", "cancelled"})
        finally:
            worker.stop()
        _assert_one_adapter(server, done, "durable-queued")


@pytest.mark.parametrize("order", ["kill_then_restart", "restart_then_kill"])
def test_killed_worker_and_redis_restart_give_one_adapter(stack, order):
    redis_proc, server, env, work = stack(aof=True)
    worker = Worker(env, work / "worker-1.log")
    with server.client() as c:
        job = _create(c, f"durable-{order}")
        _wait(c, job["id"], lambda j: j["step"] >= 3)
        if order == "kill_then_restart":
            worker.kill()
            redis_proc.restart(down_s=2)
        else:
            redis_proc.restart(down_s=2)
            worker.kill()
        second = Worker(env, work / "worker-2.log")
        try:
            done = _wait(c, job["id"], lambda j: j["status"] in {"succeeded", "failed", "cancelled"})
        finally:
            second.stop()
        _assert_one_adapter(server, done, f"durable-{order}")
        steps = _steps(c, job["id"])
        assert steps.count(1) == 1 and steps[-1] == LONG_JOB["max_steps"], steps


def test_worker_refuses_names_and_paths_crafted_in_redis(tmp_path):
    """A record rewritten in Redis must not make the worker write outside the adapter store."""
    from faithlens.settings import CoreSettings
    from jobs.journal import Journal
    from jobs.models import Job, new_job_id
    from jobs.settings import QueueSettings
    from jobs.store import JobStore
    from workers.runner import WorkerSettings, run_job

    redis_proc = RedisProcess(tmp_path / "redis", aof=False)
    try:
        store_dir = tmp_path / "store"
        store = JobStore(redis_proc.url, journal=Journal(store_dir))
        settings = WorkerSettings(
            CoreSettings(adapter_store=store_dir, model=str(tmp_path / "no-model")),
            QueueSettings(redis_url=redis_proc.url),
        )
        for name in ("../escape", "/tmp/escape", "a/../../escape", "x\x00y"):
            job = Job(
                id=new_job_id(),
                created_at=int(time.time()),
                model="tiny",
                method={"type": "grpo"},
                hyperparameters={},
                training_data="gsm8k-train",
                adapter_name="fine",
            )
            store.create(job)
            raw = json.loads(store.redis.get(f"faithlens:job:{job.id}"))
            store.redis.set(f"faithlens:job:{job.id}", json.dumps({**raw, "adapter_name": name}))
            assert run_job(job.id, "worker-test", settings) == "refused"
        assert run_job("../../etc/passwd", "worker-test", settings) == "refused"
        assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()
        assert sorted(p.name for p in store_dir.iterdir()) == [".jobs"]  # nothing but the journal
    finally:
        redis_proc.stop()


def test_worker_fails_data_set_names_crafted_in_redis(tmp_path):
    """A record whose data set names were rewritten in Redis (a path, an unknown task, a task too large to
    enumerate) fails with unknown_dataset before any file is read or the model loads; nothing else."""
    from faithlens.settings import CoreSettings
    from jobs.journal import Journal
    from jobs.models import Job, new_job_id
    from jobs.settings import QueueSettings
    from jobs.store import JobStore
    from workers.runner import WorkerSettings, run_job

    redis_proc = RedisProcess(tmp_path / "redis", aof=False)
    try:
        store_dir = tmp_path / "store"
        store = JobStore(redis_proc.url, journal=Journal(store_dir))
        settings = WorkerSettings(
            CoreSettings(adapter_store=store_dir, model=str(tmp_path / "no-model"), data_dir=tmp_path),
            QueueSettings(redis_url=redis_proc.url),
        )
        crafted = [
            ("training_data", "../../etc/passwd"),
            ("training_data", "arith-add:1-99999/train"),
            ("validation_data", "/etc/passwd"),
            ("validation_data", "arith-nope:1-9/heldout"),
        ]
        for field, value in crafted:
            job = Job(
                id=new_job_id(),
                created_at=int(time.time()),
                model="tiny",
                method={"type": "grpo"},
                hyperparameters={"eval_steps": 1},
                training_data="arith-add:1-15/train",
                validation_data="arith-add:1-15/heldout",
                adapter_name="fine",
            )
            store.create(job)
            raw = json.loads(store.redis.get(f"faithlens:job:{job.id}"))
            store.redis.set(f"faithlens:job:{job.id}", json.dumps({**raw, field: value}))
            assert run_job(job.id, "worker-test", settings) == "failed"
            failed = store.get(job.id)
            assert failed.error is not None and failed.error.code == "unknown_dataset", failed.error
            assert failed.error.message.startswith(field)
        assert not (store_dir / "fine").exists()
    finally:
        redis_proc.stop()
