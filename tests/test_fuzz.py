"""A bounded schemathesis run against the server's own OpenAPI schema: no input may cause a 5xx, and every
response (JSON, event stream, Prometheus text) matches what the schema documents for its status."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.transport import Response

from faithlens.tiny import save_tiny
from tests.servers import REDIS_URL, start_server

CHECKS = [response_schema_conformance, status_code_conformance, content_type_conformance]
MAX_EXAMPLES = 50  # per operation


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    suffix = uuid.uuid4().hex[:8]
    queue = f"faithlens-jobs-fuzz-{suffix}"
    audit_queue = f"faithlens-audits-fuzz-{suffix}"
    tiny = save_tiny(tmp_path_factory.mktemp("tiny-fuzz") / "tiny-llama")
    srv = start_server(
        tmp_path_factory.mktemp("srv-fuzz"),
        tiny,
        FAITHLENS_MAX_NEW_TOKENS="4",
        FAITHLENS_MAX_PROMPT_TOKENS="96",
        FAITHLENS_MAX_RL_STEPS="3",
        FAITHLENS_MAX_QUEUE="256",
        # Fuzzed jobs and audits that happen to be valid go to queues of their own, which no worker
        # reads (and which are dropped at the end).
        FAITHLENS_JOB_QUEUE=queue,
        FAITHLENS_AUDIT_QUEUE=audit_queue,
    )
    yield srv
    srv.stop()
    redis.Redis.from_url(REDIS_URL).delete(queue, audit_queue)


def test_schemathesis_finds_no_server_errors_and_responses_match_the_schema(small_server, tmp_path):
    """Every operation, MAX_EXAMPLES generated cases each (plus the coverage phase's). The job events
    route is fuzzed without ``follow`` (so with follow=false): followed, a fuzzed job that happens to be
    valid would stream until it ends, and no worker runs here; test_streams_match_their_documented_events
    checks the followed stream."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a dev dependency"
    document = httpx.get(f"{small_server.url}/openapi.json").json()
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]
    events["parameters"] = [p for p in events["parameters"] if p["name"] != "follow"]
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(document))
    started = time.monotonic()
    run = subprocess.run(
        [
            exe,
            "run",
            str(schema),
            "--url",
            small_server.url,
            "--checks",
            ",".join(check.__name__ for check in [*CHECKS, schemathesis.checks.not_a_server_error]),
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "1",
            "--request-timeout",
            "60",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    print(f"schemathesis: {time.monotonic() - started:.0f}s\n{run.stdout[-3000:]}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + small_server.log_text()[-3000:]
    assert '"level": "error"' not in small_server.log_text()
    operations = sum(len(item) for item in document["paths"].values())
    tested = re.search(r"Tested:\s+(\d+)", run.stdout)
    assert tested is not None and int(tested[1]) == operations, run.stdout[-3000:]


def _checked(schema, url: str, method: str, path: str, body: dict | None = None, **params) -> Response:
    """Call ``method path`` with ``body`` (and ``params``: path parameters, then the query) and check the
    response against what ``schema`` documents."""
    in_path = {name: value for name, value in params.items() if "{" + name + "}" in path}
    query = {name: value for name, value in params.items() if name not in in_path}
    kwargs = {"body": body, "media_type": "application/json"} if body is not None else {}
    case = schema[path][method].Case(path_parameters=in_path, query=query, **kwargs)
    response = case.call(base_url=url, timeout=60)
    case.validate_response(response, checks=CHECKS)
    return response


def test_streams_match_their_documented_events(small_server):
    """The fuzzer reaches the event streams only by chance (and never the jobs' one), so each is called
    here with the options that shape its events (logprobs, annotations, usage), and checked the same
    way, event by event, against the schema served by the server."""
    url = small_server.url
    document = httpx.get(f"{url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    messages = [{"role": "user", "content": "hi"}]
    annotated = {
        "faithlens": {"metrics": ["fai", "waad", "flags"]},
        "stream_options": {"include_usage": True},
    }
    chat = {"messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    completion = {"prompt": "hi", "max_tokens": 3, "logprobs": 2}
    for path, body in [("/v1/chat/completions", chat), ("/v1/completions", completion)]:
        plain = _checked(schema, url, "POST", path, body)
        assert plain.headers["content-type"][0].startswith("application/json")
        streamed = _checked(schema, url, "POST", path, {**body, **annotated, "stream": True})
        assert streamed.headers["content-type"][0].startswith("text/event-stream")
        events = [e for e in streamed.text.split("\n\n") if e]
        assert '"faithlens"' in events[-3] and '"usage"' in events[-2] and events[-1] == "data: [DONE]"

    with small_server.client() as c:
        job = c.post(
            "/v1/jobs",
            json={
                "method": {"type": "grpo"},
                "training_data": [{"question": "1+1?", "answer": "2"}],
                "adapter_name": "fuzz-stream",
            },
        ).json()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    again = _checked(schema, url, "POST", "/v1/jobs/{job_id}/cancel", job_id=job["id"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    _checked(schema, url, "GET", "/v1/jobs/{job_id}/events", job_id=job["id"])
    followed = _checked(schema, url, "GET", "/v1/jobs/{job_id}/events", job_id=job["id"], follow="true")
    assert followed.text.endswith('"status": "cancelled"}\n\ndata: [DONE]\n\n')
    _checked(schema, url, "GET", "/metrics")

    # The check has teeth: a chunk schema that requires a field no chunk has fails on the first event.
    broken = copy.deepcopy(document)
    stream = broken["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    payload = stream["text/event-stream"]["itemSchema"]["properties"]["data"]["anyOf"][1]["contentSchema"]
    payload["anyOf"][0]["required"].append("no_such_field")
    with pytest.raises(FailureGroup, match="SSE event violates schema"):
        _checked(
            schemathesis.openapi.from_dict(broken),
            url,
            "POST",
            "/v1/chat/completions",
            {**chat, "stream": True},
        )
