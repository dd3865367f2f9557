"""An audit on the embedded SmolLM2, end to end: a real server, a real Celery worker, a private redis-server.

Four GSM8K dev rows: three with their reference solutions given as completions, one generated (16 new
tokens). The audit completes and a row's annotations equal ``/v1/analyze`` on the same row."""

from __future__ import annotations

import uuid

import pytest

from faithlens.data import load_gsm8k
from tests.servers import start_server
from tests.test_audits import create, results, start_workers, wait, without_timings
from tests.test_job_store import private_redis

pytestmark = pytest.mark.smollm

ANALYSIS = {"metrics": ["fai", "waad", "flags"]}
SAMPLING = {"max_new_tokens": 16}


def test_smollm_audit_completes_and_a_row_equals_analyze(tmp_path):
    problems = load_gsm8k("dev", limit=4)
    rows = [
        {"id": f"g{i}", "prompt": p.question, "reference": p.answer}
        | ({"completion": p.answer} if i < 3 else {})
        for i, p in enumerate(problems)
    ]
    suffix = uuid.uuid4().hex[:8]
    with private_redis(tmp_path / "redis") as url:
        server = start_server(
            tmp_path,
            None,  # the embedded SmolLM2
            REDIS_URL=url,
            FAITHLENS_JOB_QUEUE=f"faithlens-jobs-test-{suffix}",
            FAITHLENS_AUDIT_QUEUE=f"faithlens-audits-test-{suffix}",
            FAITHLENS_AUDIT_SHARD_SIZE="2",
            FAITHLENS_TORCH_THREADS="1",  # the server and the worker compute alike
        )
        try:
            (worker,) = start_workers({**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}, tmp_path, 1)
            try:
                with server.client(timeout=120) as c:
                    audit = create(c, input=rows, analysis=ANALYSIS, sampling=SAMPLING)
                    assert audit["request_counts"]["total"] == 4 and audit["shards"] == 2
                    done = wait(c, audit["id"], {"completed", "failed", "cancelled"}, timeout=240)
                    assert done["status"] == "completed", done
                    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
                    lines = results(c, audit["id"])
                    assert [line["id"] for line in lines] == [r["id"] for r in rows]
                    assert all(line["error"] is None for line in lines), lines
                    # the reference solutions state the right answer
                    assert [line["correct"] for line in lines[:3]] == [True, True, True]
                    assert isinstance(lines[3]["correct"], bool) and lines[3]["text"]
                    r = c.post(
                        "/v1/analyze",
                        json={
                            "prompt": rows[0]["prompt"],
                            "completion": rows[0]["completion"],
                            "analysis": ANALYSIS,
                        },
                    )
                    assert r.status_code == 200, r.text
                    assert lines[0]["text"] == r.json()["text"]
                    assert without_timings(lines[0]["annotations"]) == without_timings(
                        r.json()["annotations"]
                    )
                    report = c.get(f"/v1/audits/{audit['id']}/report")
                    assert report.status_code == 200 and report.json()["summary"] is not None
            finally:
                worker.stop()
        finally:
            server.stop()
