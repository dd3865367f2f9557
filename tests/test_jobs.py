"""Fine-tuning jobs end to end: a real server, a real Celery worker process, the real Redis. No eager mode.

The server and the workers share a private queue, adapter store and hot-load channel, so parallel runs on
one Redis never take each other's jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from faithlens.tiny import save_tiny
from tests.servers import REPO, Server, start_server

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


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server and the environment its workers need (same model, store, channel, queue)."""
    work = tmp_path_factory.mktemp("jobs")
    tiny = save_tiny(work / "tiny-llama")
    queue = f"faithlens-jobs-test-{uuid.uuid4().hex[:8]}"
    server = start_server(
        work,
        tiny,
        FAITHLENS_JOB_QUEUE=queue,
        FAITHLENS_JOB_VISIBILITY_TIMEOUT_S="6",
        FAITHLENS_JOB_LEASE_TTL_S="4",
    )
    worker_env = {**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}
    worker = Worker(worker_env, work / "worker.log")
    yield server, worker_env, worker, work
    worker.stop()
    server.stop()


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
            "/v1/jobs",
            json={
                "method": {"type": "grpo", "learning_rat": 1},
                "adapter_name": "x",
                "training_data": "gsm8k-train",
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "method"
        r = c.post(
            "/v1/jobs", json={"method": {"type": "ppo"}, "adapter_name": "x", "training_data": "gsm8k-train"}
        )
        assert r.status_code == 400


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
