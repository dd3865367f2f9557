"""Fine-tuning jobs on the ``trl`` backend (``method.backend: "trl"``), end to end, as tests/test_jobs.py runs
the native one: a real server, a real Celery worker process, a private Redis. The worker trains with
CreditGRPOTrainer and publishes the adapter exactly as the native backend does: the same events and
checkpoints, a cancel honoured within a step, a resume after its worker is killed, a hot-loaded adapter.
A server without TRL refuses such a job up front."""

from __future__ import annotations

import json
import textwrap
import time
import uuid

import pytest

from faithlens.tiny import save_tiny
from tests.servers import start_server
from tests.test_job_store import private_redis
from tests.test_jobs import ROWS, TINY_JOB, Worker, job_stack, wait

TRL_JOB = {**TINY_JOB, "backend": "trl", "credit": "coupled", "max_new_tokens": 16}
NATIVE_KEYS = {
    "step",
    "reward_mean",
    "reward_std",
    "accuracy",
    "loss",
    "kl",
    "clip_fraction",
    "gamma_mean",
    "flagged_share",
    "completion_length",
    "step_seconds",
    "credit_seconds",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("trl-jobs")
    with job_stack(work, "faithlens-jobs-trl", TRL_EXPERIMENTAL_SILENCE="1") as parts:
        yield parts


def create(c, method: dict, adapter_name: str = "tiny-trl") -> dict:
    body = {
        "method": {"type": "grpo", **method},
        "training_data": ROWS,
        "adapter_name": adapter_name,
        "seed": 3,
    }
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_trl_job_runs_publishes_and_is_served(stack):
    server, _, _, _ = stack
    with server.client() as c:
        job = create(c, TRL_JOB)
        assert job["method"]["backend"] == "trl" and job["hyperparameters"]["backend"] == "trl"
        done = wait(c, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert done["result_adapter"] == f"tiny-trl/{done['result_version']}"
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert all(set(m) == NATIVE_KEYS for m in metrics), metrics[0]
        assert all(m["credit_seconds"] > 0 for m in metrics)  # γ was read on every step
        # the native checkpoints (steps 1 and 2, not the last), each also TRL's own for its resume
        checkpoints = c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        assert [cp["step_number"] for cp in checkpoints] == [1, 2]
        for cp in checkpoints:
            files = {p.name for p in (server.store / cp["path"]).iterdir()}
            assert {"adapter", "trainer_state.pt", "metrics.json"} <= files
            assert {
                "trainer_state.json",
                "optimizer.pt",
                "rng_state.pth",
                "adapter_model.safetensors",
            } <= files
            assert cp["metrics"]["step"] == cp["step_number"]
        adapter_dir = server.store / "tiny-trl" / str(done["result_version"])
        manifest = json.loads((adapter_dir / "manifest.json").read_text())
        assert manifest["job_id"] == job["id"] and manifest["hyperparameters"]["backend"] == "trl"
        assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= {
            p.name for p in adapter_dir.iterdir()
        }
        deadline = time.monotonic() + 10
        while "tiny-trl" not in {m["id"] for m in c.get("/v1/models").json()["data"]}:
            assert time.monotonic() < deadline, "the adapter was not hot-loaded"
            time.sleep(0.1)
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-trl",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            },
        )
        assert r.status_code == 200 and r.json()["model"] == "tiny-trl"


def test_atmanrl_is_refused_on_the_trl_backend(stack):
    server, _, _, _ = stack
    with server.client() as c:
        r = c.post(
            "/v1/jobs",
            json={
                "method": {"type": "atmanrl", "backend": "trl"},
                "training_data": ROWS,
                "adapter_name": "x",
            },
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert (
            error["code"] == "invalid_request" and error["param"] == "method" and "native" in error["message"]
        )
        r = c.post(
            "/v1/jobs",
            json={
                "method": {"type": "grpo", "backend": "deepspeed"},
                "training_data": ROWS,
                "adapter_name": "x",
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "method.backend"


def test_a_trl_job_is_cancelled_within_a_step(stack):
    """One huge step (256 rollouts of up to 1,024 tokens, eight micro-batches): TRL generates it all at once,
    and the cancel lands in the middle of that generation."""
    server, _, _, _ = stack
    huge = {
        **TRL_JOB,
        "num_generations": 64,
        "prompts_per_step": 4,
        "max_new_tokens": 1024,
        "gradient_accumulation_steps": 8,
        "max_steps": 1000,
    }
    with server.client() as c:
        job = create(c, huge, adapter_name="tiny-trl-huge")
        wait(c, job["id"], {"running"})
        deadline = time.monotonic() + 60
        while not any(
            e["message"].startswith("attempt") for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(4)  # the model loads, TRL sets up, the rollouts are being generated
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        asked = time.monotonic()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        done = wait(c, job["id"], {"cancelled", "succeeded", "failed"}, timeout=120)
        took = time.monotonic() - asked
        assert done["status"] == "cancelled", done
        assert done["step"] == 0 and took < 10, (done["step"], took)
        # the worker is free again
        after = create(c, {**TRL_JOB, "max_steps": 1}, adapter_name="tiny-trl-after")
        assert wait(c, after["id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"


def test_a_trl_job_resumes_from_its_checkpoint_after_its_worker_is_killed(stack):
    """It kills the module's worker; its replacement stops with the test, and later tests start their own."""
    server, env, worker, work = stack
    with server.client() as c:
        job = create(c, {**TRL_JOB, "max_steps": 6, "checkpoint_every": 2}, adapter_name="tiny-trl-kill")
        deadline = time.monotonic() + 120
        while not c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker.kill()
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
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
        assert after == list(range(from_step + 1, 7))  # continued where the checkpoint left off
        versions = [p.name for p in (server.store / "tiny-trl-kill").iterdir() if p.name.isdigit()]
        assert versions == [str(done["result_version"])]


NO_TRL = """
    import sys


    class NoTrl:
        \"\"\"This server's Python behaves as if TRL were not installed.\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name == "trl" or name.startswith("trl."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None


    sys.meta_path.insert(0, NoTrl())
"""


def test_a_worker_without_trl_fails_a_trl_job_with_a_clear_error(stack, tmp_path):
    """The server has TRL and queues the job; the only worker lacks it and fails the job at once, before it
    loads the model, with the API's code. Stops the module's worker (if still running) so that this one
    takes the job."""
    server, env, worker, _ = stack
    worker.stop()
    blocker = tmp_path / "no-trl"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(NO_TRL))
    without = Worker({**env, "PYTHONPATH": str(blocker)}, tmp_path / "worker-no-trl.log")
    try:
        with server.client() as c:
            job = create(c, TRL_JOB, adapter_name="tiny-trl-nowhere")
            done = wait(c, job["id"], {"succeeded", "failed"}, timeout=120)
    finally:
        without.stop()
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "backend_unavailable" and "faithlens[trl]" in done["error"]["message"]
    assert done["step"] == 0


def test_without_trl_a_trl_job_is_refused_up_front(tmp_path):
    """TRL is an optional extra: a server without it still starts and takes native jobs, and refuses a
    ``trl`` job with a clear 400 before anything is stored or queued."""
    blocker = tmp_path / "no-trl"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(NO_TRL))
    with private_redis(tmp_path / "redis") as url:
        server = start_server(
            tmp_path,
            save_tiny(tmp_path / "tiny-llama"),
            REDIS_URL=url,
            FAITHLENS_JOB_QUEUE=f"faithlens-jobs-notrl-{uuid.uuid4().hex[:8]}",
            PYTHONPATH=str(blocker),
        )
        try:
            with server.client() as c:
                r = c.post(
                    "/v1/jobs",
                    json={
                        "method": {"type": "grpo", "backend": "trl"},
                        "training_data": ROWS,
                        "adapter_name": "x",
                    },
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "backend_unavailable" and error["param"] == "method.backend"
                assert "faithlens[trl]" in error["message"]
                assert c.get("/v1/jobs").json()["data"] == []  # nothing stored
                native = create(c, {"max_steps": 1}, adapter_name="x")
                assert native["hyperparameters"]["backend"] == "native"
        finally:
            server.stop()
