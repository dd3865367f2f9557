"""Fine-tuning jobs end to end: a real server, a real Celery worker process, a real Redis. No eager mode.

The server and the workers share a private redis-server, queue, adapter store and hot-load channel, so
nothing else (another test's queued jobs, a reaper scanning a shared Redis) reaches this module's worker,
and parallel runs never take each other's jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from faithlens.tiny import save_tiny
from tests.servers import REPO, Server, start_server
from tests.test_job_store import private_redis

TINY_JOB = {
    "num_generations": 2,
    "prompts_per_step": 1,
    "max_new_tokens": 4,
    "max_steps": 3,
    "learning_rate": 1e-3,
    "checkpoint_every": 1,
    "lora_r": 2,
}
ROWS = [
    {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 9)
]


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--hostname", f"w{uuid.uuid4().hex[:6]}@%h"],
            cwd=REPO,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): nothing gets to clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def job_stack(
    work: Path, queue_prefix: str, **worker_env: str
) -> Iterator[tuple[Server, dict, Worker, Path]]:
    """A server on the tiny model with its own Redis and job queue, and one worker with the environment it
    needs (same model, store, channel, queue; plus ``worker_env``). Yields (server, that environment, the
    worker, ``work``); a test that kills the worker starts its own from the environment."""
    tiny = save_tiny(work / "tiny-llama")
    with private_redis(work / "redis") as url:
        server = start_server(
            work,
            tiny,
            REDIS_URL=url,
            FAITHLENS_JOB_QUEUE=f"{queue_prefix}-{uuid.uuid4().hex[:8]}",
            FAITHLENS_JOB_VISIBILITY_TIMEOUT_S="6",
            FAITHLENS_JOB_LEASE_TTL_S="4",
        )
        env = {**server.env, "FAITHLENS_LOG_LEVEL": "INFO", **worker_env}
        worker = Worker(env, work / "worker.log")
        try:
            yield server, env, worker, work
        finally:
            worker.stop()
            server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server and the environment its workers need (same model, store, channel, queue)."""
    with job_stack(tmp_path_factory.mktemp("jobs"), "faithlens-jobs-test") as parts:
        yield parts


def create(server: Server, c: httpx.Client, **overrides) -> dict:
    body = {
        "method": {"type": "grpo", **TINY_JOB},
        "training_data": ROWS,
        "adapter_name": "tiny-grpo",
        "seed": 3,
        **overrides,
    }
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait(c: httpx.Client, job_id: str, statuses: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job stuck in {job['status']}: {job}")


def test_job_runs_publishes_and_is_served(stack):
    server, _, _, _ = stack
    with server.client() as c:
        job = create(server, c)
        assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
        done = wait(c, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert done["result_adapter"] == f"tiny-grpo/{done['result_version']}"
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for key in (
            "reward_mean",
            "reward_std",
            "accuracy",
            "loss",
            "kl",
            "gamma_mean",
            "flagged_share",
            "completion_length",
            "step_seconds",
        ):
            assert key in metrics[0]
        checkpoints = c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        assert [cp["step_number"] for cp in checkpoints] == [1, 2]
        adapter_dir = server.store / "tiny-grpo" / str(done["result_version"])
        manifest = json.loads((adapter_dir / "manifest.json").read_text())
        assert manifest["job_id"] == job["id"] and manifest["method"] == "grpo"
        assert (adapter_dir / "adapter_model.safetensors").exists()
        # hot-loaded by the running server, and used by a request
        deadline = time.monotonic() + 10
        while "tiny-grpo" not in {m["id"] for m in c.get("/v1/models").json()["data"]}:
            assert time.monotonic() < deadline, "the adapter was not hot-loaded"
            time.sleep(0.1)
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-grpo",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            },
        )
        assert r.status_code == 200 and r.json()["model"] == "tiny-grpo"
        listed = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert job["id"] in [j["id"] for j in listed]


def test_an_atmanrl_job_logs_r_faith_and_its_group_spread_per_step(stack):
    """AtManRL's reward only trains if it differs within a GRPO group: each step reports its mean and the
    spread the advantages see (issue 34)."""
    server, _, _, _ = stack
    with server.client() as c:
        job = create(
            server,
            c,
            method={"type": "atmanrl", **TINY_JOB, "max_steps": 2, "mask_steps": 3},
            adapter_name="tiny-atmanrl",
        )
        done = wait(c, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        assert [m["step"] for m in metrics] == [1, 2]
        for m in metrics:
            assert 0.0 <= m["r_faith_mean"] <= 1.0
            assert 0.0 <= m["r_faith_group_spread"] <= 1.0


def test_follow_events_streams_until_done(stack):
    server, _, _, _ = stack
    with server.client(timeout=300) as c:
        job = create(server, c, method={"type": "grpo", **TINY_JOB, "max_steps": 2})
        lines = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", params={"follow": "true"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["status"] == "succeeded"
        assert any(json.loads(x).get("type") == "metrics" for x in lines[:-2])


def test_cancel_a_running_job(stack):
    server, _, _, _ = stack
    with server.client() as c:
        job = create(server, c, method={"type": "grpo", **TINY_JOB, "max_steps": 500})
        wait(c, job["id"], {"running"})
        while c.get(f"/v1/jobs/{job['id']}").json()["step"] < 1:
            time.sleep(0.1)
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        done = wait(c, job["id"], {"cancelled", "succeeded", "failed"})
        assert done["status"] == "cancelled"
        assert done["step"] < 500
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["error"]["code"] == "job_finished"


def test_bad_data_fails_with_a_clear_error(stack):
    server, _, _, _ = stack
    with server.client() as c:
        rows = [{"question": "What is 1+1?", "answer": "two"}]
        job = create(server, c, training_data=rows)
        done = wait(c, job["id"], {"failed", "succeeded"})
        assert done["status"] == "failed"
        assert done["error"]["code"] == "invalid_training_data"
        assert "row 1" in done["error"]["message"] and "####" in done["error"]["message"]
        # structurally bad uploads never reach a worker
        r = c.post(
            "/v1/jobs",
            json={
                "method": {"type": "grpo"},
                "adapter_name": "x",
                "training_data": {"jsonl": '{"question": "q"}\nnot json'},
            },
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_data"
        r = c.post(
            "/v1/jobs", json={"method": {"type": "ppo"}, "adapter_name": "x", "training_data": "gsm8k-train"}
        )
        assert r.status_code == 400


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"learning_rate": "abc"}, "method.learning_rate"),
        ({"lora_r": 1e8}, "method.lora_r"),
        ({"num_generations": 100000}, "method.num_generations"),
        ({"rewards": ["nope"]}, "method.rewards.0"),
        ({"rewards": []}, "method.rewards"),
        ({"learning_rat": 1}, "method.learning_rat"),  # a typo is not silently unused
        ({"method": "grpo"}, "method.method"),  # the method is method.type
        ({"seed": 1}, "method.seed"),  # the seed is the request's
        ({"credit": "everything"}, "method.credit"),
        ({"temperature": 0}, "method.temperature"),
        ({"epsilon_high": -0.1}, "method.epsilon_high"),
        ({"max_steps": 10**6}, "method.max_steps"),
        ({"num_iterations": 0}, "method.num_iterations"),
        ({"target_modules": ["q_proj; rm -rf"]}, "method.target_modules.0"),
        ({"reward_weights": [1.0, 2.0]}, "method"),  # one weight per reward: a rule across fields
        ({"prompts_per_step": 64, "num_generations": 64}, "method"),  # 4096 sequences in one batch
    ],
)
def test_bad_hyperparameters_are_400_naming_the_field(stack, hyperparameters, param):
    server, _, _, _ = stack
    with server.client() as c:
        r = c.post(
            "/v1/jobs",
            json={
                "method": {"type": "grpo", **hyperparameters},
                "adapter_name": "bad",
                "training_data": "gsm8k-train",
            },
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == param, error


def test_max_new_tokens_and_lora_r_are_held_to_the_servers_limits(stack):
    server, _, _, _ = stack
    with server.client() as c:
        body = {"adapter_name": "bad", "training_data": "gsm8k-train"}
        r = c.post("/v1/jobs", json={**body, "method": {"type": "grpo", "max_new_tokens": 1025}})
        assert r.status_code == 400
        assert r.json()["error"] == {
            "code": "context_length_exceeded",
            "message": "max_new_tokens is 1025; the limit is 1024",
            "param": "method.max_new_tokens",
        }
        r = c.post("/v1/jobs", json={**body, "method": {"type": "grpo", "lora_r": 65}})
        assert (
            r.status_code == 400 and r.json()["error"]["param"] == "method.lora_r"
        )  # > FAITHLENS_MAX_LORA_RANK
        # the stored job carries the full, typed configuration the worker trains with
        job = create(server, c, method={"type": "grpo", **TINY_JOB, "max_steps": 1, "learning_rate": "0.002"})
        assert job["hyperparameters"]["learning_rate"] == 0.002
        assert job["hyperparameters"]["rewards"] == ["gsm8k"] and job["hyperparameters"]["seed"] == 3
        assert job["method"] == {"type": "grpo", **TINY_JOB, "max_steps": 1, "learning_rate": 0.002}
        assert wait(c, job["id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_cancel_is_honoured_within_a_step(stack):
    """The attack: a job whose one step is huge (256 rollouts of up to 1,024 tokens, eight micro-batches
    per step) used to ignore a cancel until the step ended, minutes later, holding the worker. The
    trainer now checks between decode steps: the job ends cancelled within seconds, mid-step (no step
    finished), and the worker then runs the next job."""
    server, _, _, _ = stack
    huge = {
        **TINY_JOB,
        "num_generations": 64,
        "prompts_per_step": 4,
        "max_new_tokens": 1024,
        "gradient_accumulation_steps": 8,
        "max_steps": 1000,
    }
    with server.client() as c:
        job = create(server, c, adapter_name="tiny-huge", method={"type": "grpo", **huge})
        wait(c, job["id"], {"running"})
        deadline = time.monotonic() + 60
        while not any(
            e["message"].startswith("attempt") for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)  # the model loads, the rollouts are being decoded
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        asked = time.monotonic()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        done = wait(c, job["id"], {"cancelled", "succeeded", "failed"}, timeout=120)
        took = time.monotonic() - asked
        assert done["status"] == "cancelled", done
        assert done["step"] == 0  # cancelled inside the first step
        assert took < 10, f"the cancel took {took:.1f}s"
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        assert not [e for e in events if e["type"] == "metrics"]
        # the worker is free again
        after = create(server, c, method={"type": "grpo", **TINY_JOB, "max_steps": 1})
        assert wait(c, after["id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"


def test_killed_worker_job_resumes_from_checkpoint(stack):
    server, env, worker, work = stack
    with server.client() as c:
        job = create(
            server,
            c,
            adapter_name="tiny-kill",
            method={"type": "grpo", **TINY_JOB, "max_steps": 40, "checkpoint_every": 2},
        )
        deadline = time.monotonic() + 120
        while not c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker.kill()
        killed_at = c.get(f"/v1/jobs/{job['id']}").json()
        assert killed_at["status"] == "running"
        restarted = Worker(env, work / "worker-2.log")
        try:
            done = wait(c, job["id"], {"succeeded", "failed"}, timeout=300)
        finally:
            restarted.stop()
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        resumed = [i for i, e in enumerate(events) if e["message"].startswith("resumed from the checkpoint")]
        assert len(resumed) == 1
        from_step = int(events[resumed[0]]["message"].rsplit(" ", 1)[1])
        assert from_step >= 2
        after = [e["data"]["step"] for e in events[resumed[0] :] if e["type"] == "metrics"]
        assert after == list(range(from_step + 1, 41))  # continued, not restarted from step 0
        versions = [p.name for p in (server.store / "tiny-kill").iterdir() if p.name.isdigit()]
        assert versions == [str(done["result_version"])]


KEYS = {"alice": "key-alice-7f3a9c", "bob": "key-bob-51e0d2", "root": "key-root-c4b8e6"}


@pytest.fixture(scope="module")
def owned(tmp_path_factory):
    """A server with two infer keys and an admin key, on a private Redis, and no worker: its jobs stay
    queued until cancelled."""
    work = tmp_path_factory.mktemp("owners")
    with private_redis(work / "redis") as url:
        server = start_server(
            work,
            save_tiny(work / "tiny-llama"),
            REDIS_URL=url,
            FAITHLENS_API_KEYS=f"{KEYS['alice']}:infer,{KEYS['bob']}:infer,{KEYS['root']}:admin",
        )
        yield server, url
        server.stop()


def test_infer_keys_see_only_their_own_jobs(owned):
    server, url = owned

    def as_(who: str) -> httpx.Client:
        return server.client(headers={"Authorization": f"Bearer {KEYS[who]}"})

    with as_("alice") as alice, as_("bob") as bob, as_("root") as root, server.client() as nobody:
        assert nobody.get("/v1/jobs").status_code == 401
        mine = create(server, alice, adapter_name="alice-adapter")
        theirs = create(server, bob, adapter_name="bob-adapter")
        admins = create(server, root, adapter_name="root-adapter")
        assert mine["owner"] and mine["owner"] != theirs["owner"] and admins["owner"]
        # the record holds a one-way id of the key, never the key
        stored = redis.Redis.from_url(url).get(f"faithlens:job:{mine['id']}").decode()
        assert KEYS["alice"] not in stored and json.loads(stored)["owner"] == mine["owner"]

        assert [j["id"] for j in alice.get("/v1/jobs").json()["data"]] == [mine["id"]]
        assert [j["id"] for j in bob.get("/v1/jobs").json()["data"]] == [theirs["id"]]
        assert [j["id"] for j in root.get("/v1/jobs").json()["data"]] == [
            admins["id"],
            theirs["id"],
            mine["id"],
        ]
        # another's job is not found, whatever is asked of it (404, not 403: ids do not leak)
        for method, path in [
            ("GET", f"/v1/jobs/{theirs['id']}"),
            ("GET", f"/v1/jobs/{theirs['id']}/events"),
            ("GET", f"/v1/jobs/{theirs['id']}/events?follow=true"),
            ("GET", f"/v1/jobs/{theirs['id']}/checkpoints"),
            ("POST", f"/v1/jobs/{theirs['id']}/cancel"),
            ("GET", f"/v1/jobs/{admins['id']}"),
        ]:
            r = alice.request(method, path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
            unknown = alice.request(method, path.replace(theirs["id"], "ftjob-" + "0" * 24))
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        assert bob.get(f"/v1/jobs/{theirs['id']}").json()["status"] == "queued"  # untouched
        # an infer key cannot train into another key's adapter name (it would replace what others are
        # served); its own, again, is fine; an admin may use any
        r = bob.post(
            "/v1/jobs",
            json={"method": {"type": "grpo"}, "training_data": ROWS, "adapter_name": "alice-adapter"},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_name_taken"
        (server.store / "preloaded").mkdir(parents=True)  # an adapter an admin put in the store
        r = alice.post(
            "/v1/jobs", json={"method": {"type": "grpo"}, "training_data": ROWS, "adapter_name": "preloaded"}
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_name_taken"
        again = create(server, alice, adapter_name="alice-adapter")
        by_admin = create(server, root, adapter_name="alice-adapter")

        # the owner follows and cancels its own job; the admin cancels anyone's
        with alice.stream("GET", f"/v1/jobs/{mine['id']}/events", params={"follow": "true"}) as stream:
            assert alice.post(f"/v1/jobs/{mine['id']}/cancel").json()["status"] == "cancelled"
            lines = [x.removeprefix("data: ") for x in stream.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["status"] == "cancelled"
        assert alice.post(f"/v1/jobs/{mine['id']}/cancel").json()["error"]["code"] == "job_finished"
        for job in (theirs, again, by_admin, admins):
            assert root.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert bob.get(f"/v1/jobs/{theirs['id']}").json()["status"] == "cancelled"
