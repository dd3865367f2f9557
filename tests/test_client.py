"""The client SDK and CLI against real server processes (and a real worker for jobs)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from faithlens_client import AsyncFaithlens, AuditReport, Faithlens, errors
from faithlens_client.types import JobEvent

from faithlens.tiny import save_tiny
from tests.servers import REDIS_URL, REPO, start_server

ROWS = [{"question": f"What is {i}+1?", "answer": f"#### {i + 1}"} for i in range(4)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-client") / "tiny-llama")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """No worker listens on this server's private job queue: its jobs stay queued until cancelled."""
    queue = f"faithlens-jobs-client-{uuid.uuid4().hex[:8]}"
    srv = start_server(
        tmp_path_factory.mktemp("srv-client"),
        tiny_dir,
        FAITHLENS_API_KEYS="k-admin:admin,k-infer:infer",
        FAITHLENS_JOB_QUEUE=queue,
    )
    yield srv
    srv.stop()
    redis.Redis.from_url(REDIS_URL).delete(queue)  # the undelivered tasks


@pytest.fixture
def client(server):
    with Faithlens(server.url, api_key="k-admin") as c:
        yield c


def test_generate_analyze_and_typed_annotations(client):
    result = client.generate("hello", max_new_tokens=12, analysis={}, chat=True)
    assert result.usage.completion_tokens == 12
    assert len(result.annotations.tokens) == 12 and result.annotations.heads.global_
    again = client.analyze("hello", completion=result.text, analysis={"metrics": ["fai"]}, chat=True)
    assert [t.fai for t in again.annotations.tokens] == pytest.approx(
        [t.fai for t in result.annotations.tokens]
    )


def test_chat_and_streaming(client):
    messages = [{"role": "user", "content": "hi"}]
    full = client.chat(messages, max_tokens=8, temperature=0)
    chunks = list(client.chat(messages, max_tokens=8, temperature=0, stream=True, analysis={}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert "faithlens" in chunks[-1]

    typed = list(client.chat_stream(messages, max_tokens=8, temperature=0, analysis={}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in typed if c["choices"]) == text
    assert typed[-1]["faithlens"]["tokens"] == chunks[-1]["faithlens"]["tokens"]

    async def run() -> tuple[dict, list[dict], list[dict]]:
        async with AsyncFaithlens(client.base_url, api_key="k-admin") as ac:
            assert (await ac.generate("x", max_new_tokens=3)).usage.completion_tokens == 3
            whole = await ac.chat(messages, max_tokens=8, temperature=0)
            streamed = [c async for c in ac.chat_stream(messages, max_tokens=8, temperature=0)]
            awaited = [c async for c in await ac.chat(messages, max_tokens=8, temperature=0, stream=True)]
            return whole, streamed, awaited

    async_full, async_chunks, awaited_chunks = asyncio.run(run())
    assert async_full["choices"][0]["message"]["content"] == text
    for stream in (async_chunks, awaited_chunks):
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"]) == text


def test_models_adapters_and_typed_errors(client, server, tiny_dir):
    from tests.servers import make_adapter

    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    make_adapter(tiny_dir, server.store / "sdk" / "1")
    loaded = client.adapters.load("sdk", "sdk/1")
    assert loaded.name == "sdk" and [a.name for a in client.adapters.list()] == ["sdk"]
    assert client.generate("x", adapter="sdk", max_new_tokens=2).adapter == "sdk"
    client.adapters.unload("sdk")
    with pytest.raises(errors.NotFoundError) as missing:
        client.generate("x", adapter="sdk")
    assert missing.value.code == "model_not_found" and missing.value.param == "adapter"
    with pytest.raises(errors.BadRequestError) as bad:
        client.adapters.load("evil", "../../etc")
    assert bad.value.code == "adapter_path_invalid"
    with Faithlens(server.url, api_key="k-infer") as infer, pytest.raises(errors.PermissionDeniedError):
        infer.adapters.unload("anything")
    with Faithlens(server.url, api_key="wrong") as nobody, pytest.raises(errors.AuthenticationError):
        nobody.models.list()
    with Faithlens("http://127.0.0.1:9", max_retries=1) as offline, pytest.raises(errors.APIConnectionError):
        offline.models.list()


def test_audit_report(client, tmp_path):
    report = client.audit("What is 2+3?", saliency="atman_grad", max_new_tokens=24)
    assert isinstance(report, AuditReport)
    assert report.summary.num_response_tokens == len(report.tokens) == 24
    anchors = report.anchors(3)
    assert anchors and all(t.anchor for t in anchors)
    assert [t.fai for t in anchors] == sorted((t.fai for t in anchors), reverse=True)
    assert all(t.preplan for t in report.preplan(5))
    records = report.to_records()
    assert len(records) == 24 and {"fai", "waad", "saliency", "anchor"} <= set(records[0])
    page = report.to_html(tmp_path / "audit.html")
    assert (tmp_path / "audit.html").read_text() == page
    assert "FaithlensAudit.render" in page and not re.search(r"(src|href)=\"https?://", page)
    given = client.audit("What is 2+3?", completion=" 5. #### 5", saliency="atman")
    assert given.text == " 5. #### 5" and given.summary.saliency_method == "atman"
    # a given completion is audited in the context it was generated in (the prompt as a chat message)
    again = client.audit("What is 2+3?", completion=report.text, saliency=None)
    assert again.analysis.prompt_token_ids == report.analysis.prompt_token_ids


def test_async_client(server):
    """The async twins of the calls above, against the same server."""

    async def run() -> None:
        async with AsyncFaithlens(server.url, api_key="k-admin") as ac:
            report = await ac.audit("What is 2+3?", saliency="atman_grad", max_new_tokens=8)
            assert isinstance(report, AuditReport) and len(report.tokens) == 8
            assert report.summary.saliency_method == "atman_grad"
            analyzed = await ac.analyze("What is 2+3?", report.text, chat=True, analysis={})
            assert analyzed.annotations.prompt_token_ids == report.analysis.prompt_token_ids
            assert [m.id for m in await ac.models.list()] == ["tiny-llama"]
            assert isinstance(await ac.adapters.list(), list)
            with pytest.raises(errors.NotFoundError):
                await ac.adapters.unload("ghost")
            job = await ac.jobs.create(method={"type": "grpo"}, training_data=ROWS, adapter_name="async")
            assert job.id in [j.id for j in await ac.jobs.list(limit=100)]
            assert (await ac.jobs.get(job.id)).status == "queued"
            assert (await ac.jobs.cancel(job.id)).status == "cancelled"
            assert await ac.jobs.checkpoints(job.id) == []
            assert [e.message for e in await ac.jobs.events(job.id, after=1)] == ["cancelled while queued"]
            assert (await ac.wait(job.id, poll_interval=0.1, timeout=10)).status == "cancelled"

    asyncio.run(run())


def test_capabilities(client):
    """Needs the server's GET /v1/capabilities."""
    caps = client.capabilities()
    assert caps.object == "capabilities"
    assert {"atman", "atman_grad"} <= set(caps.saliency_method_names)
    assert all(m.description for m in caps.saliency_methods)
    assert "none" in [c.name for c in caps.credit_strategies]
    assert {"token", "word", "sentence"} <= set(caps.granularities)
    assert {"fai", "waad"} <= set(caps.metrics)
    # every method the server lists is one it runs
    for name in caps.saliency_method_names:
        if name != "atman_rl":  # the learned mask trains per request: slow, and covered by its own tests
            result = client.analyze("Q: 2+2?", " 4", saliency=name)
            assert result.annotations.summary.saliency_method == name
    with Faithlens(client.base_url, api_key="k-infer") as infer:
        assert infer.capabilities() == caps

    async def run() -> object:
        async with AsyncFaithlens(client.base_url, api_key="k-infer") as ac:
            return await ac.capabilities()

    assert asyncio.run(run()) == caps


def test_follow_job_streams_until_the_job_ends(client, server):
    """No worker runs this server's jobs, so a job stays queued until it is cancelled: the follow gets the
    job's first event, the cancel happens while it listens, and the stream then ends by itself."""
    job = client.jobs.create(method={"type": "grpo"}, training_data=ROWS, adapter_name="follow")
    followed: list[JobEvent] = []
    for event in client.follow_job(job.id):
        followed.append(event)
        if len(followed) == 1:
            assert client.jobs.cancel(job.id).status == "cancelled"
    assert [e.message for e in followed] == ["job created (grpo)", "cancelled while queued"]
    assert followed == client.jobs.events(job.id)
    assert list(client.follow_job(job.id)) == followed  # a finished job: its events, then the end

    async def run() -> tuple[str, list[JobEvent]]:
        async with AsyncFaithlens(server.url, api_key="k-admin") as ac:
            job = await ac.jobs.create(method={"type": "grpo"}, training_data=ROWS, adapter_name="follow")
            events: list[JobEvent] = []
            async for event in ac.follow_job(job.id):
                events.append(event)
                if len(events) == 1:
                    assert (await ac.jobs.cancel(job.id)).status == "cancelled"
            return job.id, events

    job_id, events = asyncio.run(run())
    assert [e.message for e in events] == ["job created (grpo)", "cancelled while queued"]
    assert events == client.jobs.events(job_id)
    with pytest.raises(errors.NotFoundError):
        list(client.follow_job("ftjob-missing"))


def test_retries_honour_retry_after_on_503(tiny_dir, tmp_path):
    srv = start_server(
        tmp_path,
        tiny_dir,
        FAITHLENS_MAX_BATCH_SIZE="1",
        FAITHLENS_MAX_QUEUE="0",
        FAITHLENS_RETRY_AFTER_S="1",
        FAITHLENS_MAX_NEW_TOKENS="2000",
    )
    try:

        def rejected() -> float:
            text = httpx.get(f"{srv.url}/metrics").text
            return sum(float(v) for v in re.findall(r"^faithlens_rejected_total (\S+)$", text, re.M))

        blocker = threading.Thread(
            target=lambda: httpx.post(
                f"{srv.url}/v1/generate", timeout=120, json={"prompt": "a", "max_new_tokens": 700}
            )
        )
        blocker.start()
        time.sleep(0.5)
        with Faithlens(srv.url, max_retries=60) as patient:
            started = time.monotonic()
            result = patient.generate("b", max_new_tokens=2)
        assert result.usage.completion_tokens == 2
        assert rejected() >= 1 and time.monotonic() - started >= 1.0  # it waited Retry-After at least once
        blocker.join()
        with Faithlens(srv.url, max_retries=0) as impatient:
            blocker = threading.Thread(
                target=lambda: httpx.post(
                    f"{srv.url}/v1/generate", timeout=120, json={"prompt": "a", "max_new_tokens": 700}
                )
            )
            blocker.start()
            time.sleep(0.5)
            with pytest.raises(errors.OverloadedError) as busy:
                impatient.generate("c", max_new_tokens=2)
            assert busy.value.code == "overloaded"
            blocker.join()
    finally:
        srv.stop()


def test_jobs_from_the_sdk_with_progress(tiny_dir, tmp_path):
    queue = f"faithlens-jobs-sdk-{uuid.uuid4().hex[:8]}"
    srv = start_server(tmp_path, tiny_dir, FAITHLENS_JOB_QUEUE=queue)
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=REPO,
        env=srv.env,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with Faithlens(srv.url) as c:
            job = c.jobs.create(
                method={
                    "type": "grpo",
                    "num_generations": 2,
                    "prompts_per_step": 1,
                    "max_new_tokens": 4,
                    "max_steps": 3,
                    "checkpoint_every": 2,
                },
                training_data=ROWS,
                adapter_name="sdk-job",
            )
            followed: list[JobEvent] = []

            async def follow() -> None:  # the async client follows while the sync one polls
                async with AsyncFaithlens(srv.url) as ac:
                    followed.extend([event async for event in ac.follow_job(job.id)])

            follower = threading.Thread(target=asyncio.run, args=(follow(),))
            follower.start()
            calls: list[tuple[str, int]] = []
            done = c.wait(
                job.id,
                on_progress=lambda j, events: calls.append((j.status, len(events))),
                poll_interval=0.3,
                timeout=300,
            )
            follower.join(timeout=60)
            assert not follower.is_alive()
            assert followed == c.jobs.events(job.id)
            assert [e.data["step"] for e in followed if e.type == "metrics"] == [1, 2, 3]
            assert list(c.follow_job(job.id)) == followed
            assert done.status == "succeeded" and done.result_adapter.startswith("sdk-job/")
            assert calls and calls[-1][0] == "succeeded"
            assert sum(n for _, n in calls) == len(c.jobs.events(job.id))
            assert [cp.step_number for cp in c.jobs.checkpoints(job.id)] == [2]
            watched = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "faithlens_client.cli",
                    "--base-url",
                    srv.url,
                    "jobs",
                    "watch",
                    job.id,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert watched.returncode == 0 and "succeeded" in watched.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        srv.stop()


def test_sdk_installs_and_runs_without_torch(server, tmp_path):
    """`pip install ./clients/python` in a fresh venv: no torch, and the SDK and CLI work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(REPO / "clients" / "python")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    script = (
        "from faithlens_client import Faithlens\n"
        f"c = Faithlens({server.url!r}, api_key='k-infer')\n"
        "r = c.generate('hi', max_new_tokens=3, analysis={})\n"
        "print(r.usage.completion_tokens, len(r.annotations.tokens))\n"
    )
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["3", "3"], run.stderr
    cli = subprocess.run(
        [str(venv / "bin" / "faithlens"), "--base-url", server.url, "--api-key", "k-infer", "models"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "tiny-llama" in cli.stdout
    assert Path(venv / "bin" / "faithlens").exists()
