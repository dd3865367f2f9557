"""Audits end to end: a real server, real Celery worker processes, a private redis-server. No eager mode.

An audit's rows run on the workers in shards; each shard's execution is counted (``audit:<id>:runs``, one
entry per run with the worker's hostname) and its completion is one event with the worker's hostname, so
the tests count what ran where instead of inferring it."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from faithlens.report import RowOutcome, summarize
from faithlens.schema import Analysis
from faithlens.tiny import save_tiny
from jobs.audits import AuditStore
from tests.servers import Server, make_adapter, start_server
from tests.test_job_store import private_redis
from tests.test_jobs import KEYS, Worker

SAMPLING = {"max_new_tokens": 6}
ANALYSIS = {"metrics": ["fai", "waad", "flags"]}


def rows_40() -> list[dict]:
    """40 rows: completions given or generated, prompts or messages, GSM8K references or bare numbers."""
    rows = []
    for i in range(40):
        row: dict = {"id": f"r{i}"}
        if i % 4 == 0:
            row["messages"] = [{"role": "user", "content": f"What is {i} + {i}?"}]
        else:
            row["prompt"] = f"Question {i}: add {i} and {i}. Answer:"
        if i % 2 == 0:
            row["completion"] = f" {i} + {i} = {2 * i}. The answer is {2 * i}."
        if i % 3 == 0:
            row["reference"] = f"{i} + {i} = {2 * i}\n#### {2 * i}"
        elif i % 3 == 1:
            row["reference"] = 2 * i
        rows.append(row)
    return rows


@contextlib.contextmanager
def audit_server(work: Path, name: str, **env: str) -> Iterator[tuple[Server, str]]:
    """A server on the tiny model with its own Redis and its own job and audit queues (so workers of
    other modules never take its shards); ``env`` adds settings. Yields the server and the Redis URL."""
    tiny = save_tiny(work / "tiny-llama")
    suffix = uuid.uuid4().hex[:8]
    with private_redis(work / "redis") as url:
        server = start_server(
            work,
            tiny,
            REDIS_URL=url,
            FAITHLENS_JOB_QUEUE=f"faithlens-jobs-{name}-{suffix}",
            FAITHLENS_AUDIT_QUEUE=f"faithlens-audits-{name}-{suffix}",
            FAITHLENS_TORCH_THREADS="1",  # the server and the workers compute alike
            **env,
        )
        try:
            yield server, url
        finally:
            server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("audits")
    with audit_server(
        work,
        "test",
        FAITHLENS_AUDIT_SHARD_SIZE="4",
        FAITHLENS_MAX_AUDIT_ROWS="50",
        FAITHLENS_MAX_AUDIT_ROW_COST="20000",
        FAITHLENS_JOB_VISIBILITY_TIMEOUT_S="6",
        FAITHLENS_JOB_LEASE_TTL_S="4",
        FAITHLENS_REAPER_INTERVAL_S="2",
    ) as (server, url):
        yield server, {**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}, work, url


def start_workers(env: dict, work, n: int) -> list[Worker]:
    workers = [Worker(env, work / f"worker-{uuid.uuid4().hex[:6]}.log") for _ in range(n)]
    deadline = time.monotonic() + 120
    for worker in workers:
        while "ready" not in worker.log.read_text(errors="replace"):
            assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.3)
    return workers


def hostname(worker: Worker) -> str:
    return worker.proc.args[worker.proc.args.index("--hostname") + 1].split("@")[0]


def create(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/audits", json={"analysis": ANALYSIS, "sampling": SAMPLING, **body})
    assert r.status_code == 200, r.text
    return r.json()


def wait(c: httpx.Client, audit_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        audit = c.get(f"/v1/audits/{audit_id}").json()
        if audit["status"] in statuses:
            return audit
        time.sleep(0.3)
    raise AssertionError(f"audit stuck in {audit['status']}: {audit}")


def results(c: httpx.Client, audit_id: str) -> list[dict]:
    r = c.get(f"/v1/audits/{audit_id}/results")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines() if line]


def finished_events(c: httpx.Client, audit_id: str) -> list[dict]:
    events = c.get(f"/v1/audits/{audit_id}/events").json()["data"]
    return [e["data"] for e in events if e["message"].startswith("shard ") and " finished " in e["message"]]


def without_timings(annotations: dict) -> dict:
    return {k: v for k, v in annotations.items() if k != "timings"}


def test_audit_completes_equals_analyze_and_two_workers_share_it(stack):
    server, env, work, url = stack
    workers = start_workers(env, work, 2)
    try:
        rows = rows_40()
        with server.client(timeout=120) as c:
            audit = create(c, input=rows, metadata={"purpose": "test"})
            assert audit["object"] == "audit" and audit["id"].startswith("audit_")
            assert audit["request_counts"]["total"] == 40 and audit["shards"] == 10
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"})
            assert done["status"] == "completed", done
            assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
            for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
                assert done[stamp] is not None
            lines = results(c, audit["id"])
            assert [line["index"] for line in lines] == list(range(40))
            assert [line["id"] for line in lines] == [r["id"] for r in rows]
            for row, line in zip(rows, lines, strict=True):
                assert line["error"] is None, line
                prompt = {k: row[k] for k in ("prompt", "messages") if k in row}
                if "completion" in row:
                    r = c.post(
                        "/v1/analyze", json={**prompt, "completion": row["completion"], "analysis": ANALYSIS}
                    )
                else:
                    r = c.post("/v1/generate", json={**prompt, **SAMPLING, "analysis": ANALYSIS})
                assert r.status_code == 200, r.text
                expected = r.json()
                assert line["text"] == expected["text"]
                assert without_timings(line["annotations"]) == without_timings(expected["annotations"])
                if "reference" not in row:
                    assert line["correct"] is None
                else:
                    assert isinstance(line["correct"], bool)
                    if "completion" in row:  # the completions state the right answer
                        assert line["correct"] is True
            # both workers took shards; every shard finished once and ran once
            finished = finished_events(c, audit["id"])
            assert sorted(e["shard"] for e in finished) == list(range(10))
            assert {e["worker"].split("@")[0] for e in finished} == {hostname(w) for w in workers}
            runs = AuditStore(url).runs(audit["id"])
            assert Counter(r["shard"] for r in runs) == Counter(range(10))
            report = c.get(f"/v1/audits/{audit['id']}/report")
            assert report.status_code == 200, report.text
            # the report's numbers are a recomputation from the results the client can read
            recomputed = summarize(
                [RowOutcome(Analysis.model_validate(line["annotations"]), line["correct"]) for line in lines]
            )
            assert report.json()["summary"] == json.loads(json.dumps(recomputed.model_dump(mode="json")))
            assert report.json()["summary"]["references"] is not None  # some rows have references
            page = c.get(f"/v1/audits/{audit['id']}/report", params={"format": "html"})
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            listed = c.get("/v1/audits").json()["data"]
            assert listed[0]["id"] == audit["id"]
            again = c.post(f"/v1/audits/{audit['id']}/cancel")
            assert again.status_code == 409 and again.json()["error"]["code"] == "audit_finished"
            followed = c.get(f"/v1/audits/{audit['id']}/events", params={"follow": "true"})
            assert followed.text.endswith('"status": "completed"}\n\ndata: [DONE]\n\n')
    finally:
        for worker in workers:
            worker.stop()


def test_sigkill_mid_audit_loses_no_row_and_redoes_no_finished_shard(stack):
    server, env, work, url = stack
    first, second = start_workers(env, work, 2)
    victim = hostname(first)
    try:
        rows = [{"id": f"k{i}", "prompt": f"Count to {i}:"} for i in range(40)]  # every row generated
        with server.client(timeout=120) as c:
            audit = create(c, input=rows, sampling={"max_new_tokens": 48})
            store = AuditStore(url)
            deadline = time.monotonic() + 120
            while True:  # the victim is in the middle of a shard, and some shard has finished
                runs = store.runs(audit["id"])
                finished = {e["shard"] for e in finished_events(c, audit["id"])}
                busy = [
                    r["shard"] for r in runs if r["worker"].startswith(victim) and r["shard"] not in finished
                ]
                if busy and finished:
                    break
                assert time.monotonic() < deadline, "the victim never took a shard"
                time.sleep(0.05)
            first.kill()
            finished_before = {e["shard"] for e in finished_events(c, audit["id"])}
            runs_before = Counter(r["shard"] for r in store.runs(audit["id"]))
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"})
            assert done["status"] == "completed", done
            lines = results(c, audit["id"])
            assert [line["index"] for line in lines] == list(range(40))  # every row, exactly once
            assert all(line["error"] is None for line in lines)
            finished = finished_events(c, audit["id"])
            assert Counter(e["shard"] for e in finished) == Counter(range(10))  # each written once
            runs = Counter(r["shard"] for r in store.runs(audit["id"]))
            for shard in finished_before:  # a finished shard never ran again
                assert runs[shard] == runs_before[shard] == 1, (shard, runs)
            interrupted = set(busy) - finished_before
            assert interrupted, "the victim finished its shard before the kill"
            for shard in interrupted:  # the killed worker's shard was redone, by the other worker
                assert runs[shard] == 2
                assert next(e for e in finished if e["shard"] == shard)["worker"].startswith(hostname(second))
    finally:
        first.stop()
        second.stop()


def test_bad_rows_are_reported_per_row_and_the_audit_completes(stack):
    server, env, work, _ = stack
    (worker,) = start_workers(env, work, 1)
    try:
        rows = [
            {"prompt": "Two plus two?", "completion": " 4", "reference": "4"},
            {"prompt": "x" * 4200, "completion": " far too long for the model"},  # past the context
            {"prompt": "y" * 4095},  # its generation cannot fit the context
            {"prompt": "Two plus three?", "completion": " 6", "reference": "#### 5"},
        ]
        with server.client(timeout=120) as c:
            audit = create(c, input=rows)
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"})
            assert done["status"] == "completed", done
            assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
            lines = results(c, audit["id"])
            assert [line["id"] for line in lines] == ["row-0", "row-1", "row-2", "row-3"]
            assert lines[0]["error"] is None and lines[0]["correct"] is True
            assert lines[1]["error"]["code"] == "context_length_exceeded" and lines[1]["annotations"] is None
            assert lines[2]["error"]["code"] == "context_length_exceeded"
            assert lines[3]["error"] is None and lines[3]["correct"] is False
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": {"jsonl": '{"prompt": "a"}\n{not json'}}, "invalid_audit_input"),
        ({"input": {"jsonl": '{"prompt": "a", "oops": 1}'}}, "invalid_audit_input"),
        ({"input": [{"completion": "no prompt"}]}, "invalid_audit_input"),
        ({"input": [{"prompt": f"p{i}"} for i in range(51)]}, "invalid_audit_input"),
        (
            {"input": {"jsonl": "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(51))}},
            "invalid_audit_input",
        ),
        ({"input": "gsm8k-test"}, "unknown_dataset"),
        ({"input": [{"prompt": "a"}], "reports": ["summary", "rhythm-x"]}, "unknown_report"),
        (
            {
                "input": [{"prompt": "a", "completion": "b" * 3000}],
                "analysis": {"saliency": {"method": "atman", "target": "response"}},
            },
            "analysis_too_costly",
        ),
        ({"input": [{"prompt": "a"}], "sampling": {"max_new_tokens": 4000}}, "context_length_exceeded"),
        ({"input": [{"prompt": "a"}], "reports": []}, "unknown_report"),
    ],
)
def test_bad_input_is_refused_up_front(stack, body, code):
    server, _, _, url = stack
    before = redis.Redis.from_url(url).zcard("faithlens:audits")
    with server.client() as c:
        r = c.post("/v1/audits", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert redis.Redis.from_url(url).zcard("faithlens:audits") == before  # nothing was stored


def test_datasets_owners_and_cancel(stack, tmp_path):
    server, _, _, _ = stack
    with server.client() as c:
        audit = create(c, input="gsm8k-dev", limit=5)  # no worker runs: it stays queued
        assert audit["input"] == "gsm8k-dev" and audit["request_counts"]["total"] == 5
        cancelled = c.post(f"/v1/audits/{audit['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"  # no worker held a shard
        lines = results(c, audit["id"])
        assert [line["error"]["code"] for line in lines] == ["not_processed"] * 5
        assert lines[0]["id"] == "gsm8k-dev-0"
        r = c.get(f"/v1/audits/{audit['id']}/report")
        assert r.status_code == 409 and r.json()["error"]["code"] == "audit_not_completed"
        assert c.get("/v1/audits/audit_nope").status_code == 404


def test_audits_belong_to_their_key(stack, tmp_path):
    _, env, _, url = stack
    server = start_server(
        tmp_path,
        Path(env["FAITHLENS_MODEL"]),
        REDIS_URL=url,
        FAITHLENS_AUDIT_QUEUE=env["FAITHLENS_AUDIT_QUEUE"],
        FAITHLENS_API_KEYS=f"{KEYS['alice']}:infer,{KEYS['bob']}:infer,{KEYS['root']}:admin",
    )
    try:
        with server.client() as c:
            alice, bob, root = ({"Authorization": f"Bearer {KEYS[k]}"} for k in ("alice", "bob", "root"))
            assert c.get("/v1/audits").status_code == 401
            r = c.post("/v1/audits", json={"input": [{"prompt": "a", "completion": "b"}]}, headers=alice)
            assert r.status_code == 200, r.text
            audit = r.json()
            assert audit["owner"] is not None and KEYS["alice"] not in json.dumps(audit)
            assert c.get(f"/v1/audits/{audit['id']}", headers=bob).status_code == 404
            assert c.get(f"/v1/audits/{audit['id']}/results", headers=bob).status_code == 404
            assert c.post(f"/v1/audits/{audit['id']}/cancel", headers=bob).status_code == 404
            assert audit["id"] not in [a["id"] for a in c.get("/v1/audits", headers=bob).json()["data"]]
            assert [a["id"] for a in c.get("/v1/audits", headers=alice).json()["data"]] == [audit["id"]]
            assert c.get(f"/v1/audits/{audit['id']}", headers=root).status_code == 200
            assert c.post(f"/v1/audits/{audit['id']}/cancel", headers=alice).json()["status"] == "cancelled"
    finally:
        server.stop()


def test_a_lost_shard_message_is_resent_by_the_reaper(stack):
    """Every message of an audit vanishes from the queue before any worker sees it: the reaper (in each
    worker's main process) re-sends the unfinished shards and the audit completes."""
    server, env, work, url = stack
    with server.client() as c:
        audit = create(c, input=[{"prompt": f"p{i}", "completion": " 1"} for i in range(8)])
        assert audit["shards"] == 2
        redis.Redis.from_url(url).delete(env["FAITHLENS_AUDIT_QUEUE"])  # the messages are lost
        (worker,) = start_workers({**env, "FAITHLENS_REAPER_GRACE_S": "0"}, work, 1)
        try:
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"}, timeout=120)
            assert done["status"] == "completed", done
            events = c.get(f"/v1/audits/{audit['id']}/events").json()["data"]
            resent = {e["message"].split()[1] for e in events if "re-sent" in e["message"]}
            assert resent == {"0", "1"}
            assert [line["index"] for line in results(c, audit["id"])] == list(range(8))
        finally:
            worker.stop()


def test_cancel_stops_the_workers_at_the_next_row(stack):
    server, env, work, url = stack
    (worker,) = start_workers(env, work, 1)
    try:
        rows = [{"prompt": f"Count to {i}:"} for i in range(40)]
        with server.client() as c:
            audit = create(c, input=rows, sampling={"max_new_tokens": 48})
            deadline = time.monotonic() + 120
            while not finished_events(c, audit["id"]):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = c.post(f"/v1/audits/{audit['id']}/cancel")
            assert r.status_code == 200 and r.json()["status"] in {"cancelling", "cancelled"}
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"}, timeout=60)
            assert done["status"] == "cancelled" and done["cancelled_at"] is not None
            lines = results(c, audit["id"])
            assert [line["index"] for line in lines] == list(range(40))
            ran = [line for line in lines if line["error"] is None]
            assert 4 <= len(ran) < 40 and len(ran) % 4 == 0  # whole shards only
            assert {line["error"]["code"] for line in lines if line["error"]} == {"not_processed"}
            assert AuditStore(url).leases_held(audit["id"], done["shards"]) == 0
    finally:
        worker.stop()


def test_an_audit_with_an_adapter_equals_the_served_adapter(stack):
    """``adapter`` names a loaded adapter; the workers load its files from the store, and every row
    equals what the server answers with that adapter."""
    server, env, work, _ = stack
    make_adapter(Path(env["FAITHLENS_MODEL"]), server.store / "style" / "1", seed=3)
    (worker,) = start_workers(env, work, 1)
    try:
        rows = [
            {"prompt": "Two plus two?", "completion": " 4, so the answer is 4."},
            {"messages": [{"role": "user", "content": "Three plus four?"}]},
        ]
        with server.client(timeout=120) as c:
            r = c.post("/v1/adapters/load", json={"name": "style", "path": "style/1"})
            assert r.status_code == 200, r.text
            audit = create(c, input=rows, adapter="style")
            assert audit["adapter"] == "style"
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"})
            assert done["status"] == "completed", done
            lines = results(c, audit["id"])
            served = [
                c.post("/v1/analyze", json={**rows[0], "adapter": "style", "analysis": ANALYSIS}).json(),
                c.post(
                    "/v1/generate", json={**rows[1], **SAMPLING, "adapter": "style", "analysis": ANALYSIS}
                ).json(),
            ]
            base = c.post("/v1/analyze", json={**rows[0], "analysis": ANALYSIS}).json()
            for line, expected in zip(lines, served, strict=True):
                assert line["error"] is None, line
                assert line["text"] == expected["text"]
                assert without_timings(line["annotations"]) == without_timings(expected["annotations"])
            assert line["annotations"]["adapter"] == "style"
            assert without_timings(lines[0]["annotations"]) != without_timings(base["annotations"])
            unknown = c.post("/v1/audits", json={"input": rows, "adapter": "nope"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    finally:
        worker.stop()


def test_hostile_shard_messages_are_refused_and_lose_nothing(stack):
    """Shard messages are data from Redis: an unknown audit, shard numbers out of range or not numbers,
    a non-string id and a missing argument are each refused by the real worker, which stays up; the
    audit's own message, queued after them, still completes every row."""
    from celery import Celery

    from jobs.audits import RUN_AUDIT_SHARD_TASK

    server, env, work, url = stack
    queue = env["FAITHLENS_AUDIT_QUEUE"]
    with server.client() as c:
        audit = create(c, input=[{"prompt": f"p{i}", "completion": " 1"} for i in range(4)])
        assert audit["shards"] == 1
        redis.Redis.from_url(url).delete(queue)  # only the messages below reach the worker
        sender = Celery(broker=url)
        hostile = [
            ["audit_nope", 0],
            [audit["id"], -1],
            [audit["id"], 99],
            [audit["id"], "zero"],
            [{"$ne": None}, 0],
            [audit["id"]],
            [audit["id"], 0],  # the real one, last
        ]
        for args in hostile:
            sender.send_task(RUN_AUDIT_SHARD_TASK, args=args, queue=queue)
        (worker,) = start_workers(env, work, 1)
        try:
            done = wait(c, audit["id"], {"completed", "failed", "cancelled"}, timeout=120)
            assert done["status"] == "completed", done
            assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
            assert [line["index"] for line in results(c, audit["id"])] == [0, 1, 2, 3]
            assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
            log = worker.log.read_text(errors="replace")
            assert "refused a shard number" in log and "unknown audit" in log
        finally:
            worker.stop()
