"""The HTTP API against a real server process (tiny model): generation, analysis, OpenAI compatibility,
batching, cancellation, errors and auth."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from openai import NotFoundError, OpenAI

from faithlens.analysis import analyze
from faithlens.generation import generate
from faithlens.model import load_model
from faithlens.params import AnalysisParams, SamplingParams
from faithlens.tiny import save_tiny
from tests.servers import start_server


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv"), tiny_dir, FAITHLENS_MAX_NEW_TOKENS="2000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same tiny model in this process: the reference the server must agree with."""
    return load_model(tiny_dir, device="cpu", dtype="float32")


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus sample's values over its label sets."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_probes_and_metrics(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["checks"] == {"model": True, "engine": True}
        assert ready["redis"] == "ok"
        c.post("/v1/generate", json={"prompt": "metrics", "max_new_tokens": 3})
        body = c.get("/metrics").text
    for name in (
        "faithlens_requests_total",
        "faithlens_request_latency_seconds_bucket",
        "faithlens_generated_tokens_total",
        "faithlens_queue_depth",
        "faithlens_batch_size_bucket",
        "faithlens_analysis_seconds_bucket",
    ):
        assert name in body, name
    assert metric(body, "faithlens_generated_tokens_total") >= 3


def test_generate_matches_in_process_generation(server, local):
    body = {"prompt": "The answer is", "max_new_tokens": 12}
    with server.client() as c:
        out = c.post("/v1/generate", json=body).json()
    ref = generate(local, local.prompt_ids("The answer is"), SamplingParams(max_new_tokens=12))
    assert out["text"] == ref.text
    assert out["finish_reason"] == "length"
    assert out["usage"] == {
        "prompt_tokens": len(ref.prompt_ids),
        "completion_tokens": 12,
        "total_tokens": len(ref.prompt_ids) + 12,
    }
    assert out["annotations"] is None and out["adapter"] is None
    assert set(out["timings"]) == {"queue_s", "generate_s", "analysis_s", "total_s"}


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "seed", "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    with server.client() as c:
        a, b = (c.post("/v1/generate", json=body).json()["text"] for _ in range(2))
        other = c.post("/v1/generate", json={**body, "seed": 8}).json()["text"]
    assert a == b
    assert a != other


def test_generate_with_analysis_equals_analyze_in_process(server, local):
    with server.client() as c:
        out = c.post(
            "/v1/generate", json={"prompt": "abc", "max_new_tokens": 20, "analysis": {"W": 4}}
        ).json()
    annotations = out["annotations"]
    assert len(annotations["tokens"]) == out["usage"]["completion_tokens"] == 20
    ids = [t["id"] for t in annotations["tokens"]]
    ref = analyze(local, local.prompt_ids("abc"), ids, AnalysisParams(W=4))
    for got, want in zip(annotations["tokens"], ref.tokens, strict=True):
        assert got["waad"] == pytest.approx(want.waad, abs=1e-5)
        assert (got["fai"] is None) == (want.fai is None)
        if want.fai is not None:
            assert got["fai"] == pytest.approx(want.fai, abs=1e-5)
        assert got["anchor"] == want.anchor and got["preplan"] == want.preplan


def test_metrics_selection_nulls_what_was_not_asked(server):
    with server.client() as c:
        out = c.post(
            "/v1/generate", json={"prompt": "x", "max_new_tokens": 8, "analysis": {"metrics": ["waad"]}}
        ).json()
    tokens = out["annotations"]["tokens"]
    assert all(t["fai"] is None for t in tokens)
    assert all(t["waad"] is not None for t in tokens)


def test_analyze_endpoint_with_saliency(server, local):
    body = {
        "prompt": "Q: 2+2?",
        "completion": " It is 4. #### 4",
        "analysis": {"saliency": {"method": "atman"}},
    }
    with server.client() as c:
        out = c.post("/v1/analyze", json=body).json()
    assert out["object"] == "faithlens.analysis" and out["finish_reason"] is None
    tokens = out["annotations"]["tokens"]
    assert [t["id"] for t in tokens] == local.completion_ids(" It is 4. #### 4")
    assert out["annotations"]["summary"]["saliency_method"] == "atman"
    assert out["annotations"]["answer_span"]["text"].strip() == "4"
    assert any(t["saliency"] is not None for t in tokens)  # reasoning tokens before the answer
    assert all(s is not None for s in out["annotations"]["prompt_saliency"])


def test_eight_concurrent_requests_share_batches(server, local):
    prompts = [f"request number {i} says" for i in range(8)]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            calls = [
                c.post("/v1/generate", json={"prompt": p, "max_new_tokens": 24 + 4 * i})
                for i, p in enumerate(prompts)
            ]
            return [r.json() for r in await asyncio.wait_for(asyncio.gather(*calls), timeout=120)]

    with server.client() as c:
        before = c.get("/metrics").text
    results = asyncio.run(run())
    with server.client() as c:
        after = c.get("/metrics").text
    for i, (prompt, out) in enumerate(zip(prompts, results, strict=True)):
        ref = generate(local, local.prompt_ids(prompt), SamplingParams(max_new_tokens=24 + 4 * i))
        assert out["text"] == ref.text, i  # batched decoding gives the unbatched tokens
    steps = metric(after, "faithlens_batch_size_count") - metric(before, "faithlens_batch_size_count")
    rows = metric(after, "faithlens_batch_size_sum") - metric(before, "faithlens_batch_size_sum")
    assert rows / steps > 2, "concurrent requests should share decode steps"


def test_client_disconnect_cancels_the_work(server):
    with server.client() as c:
        before = metric(c.get("/metrics").text, "faithlens_cancelled_total")
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "go on forever"}],
                "max_tokens": 2000,
                "stream": True,
            },
        ) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if metric(c.get("/metrics").text, "faithlens_cancelled_total") > before:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the stream's job was not cancelled")


# -- OpenAI compatibility --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_models_and_chat(oai, local):
    assert [m.id for m in oai.models.list()] == ["tiny-llama"]
    messages = [{"role": "user", "content": "hello"}]
    r = oai.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, logprobs=True, temperature=0, top_logprobs=3
    )
    ref = generate(local, local.prompt_ids(messages=messages), SamplingParams(max_new_tokens=10))
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert r.usage.completion_tokens == 10


def test_openai_chat_stream_with_annotations_last(server, oai):
    messages = [{"role": "user", "content": "stream"}]
    full = oai.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            max_tokens=12,
            stream=True,
            temperature=0,
            stream_options={"include_usage": True},
            extra_body={"faithlens": {"metrics": ["fai", "flags"]}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    annotated = [c for c in chunks if not c.choices and (c.model_extra or {}).get("faithlens")]
    assert len(annotated) == 1 and len(annotated[0].model_extra["faithlens"]["tokens"]) == 12
    assert chunks[-1].usage.completion_tokens == 12
    # raw framing: the annotation chunk comes after the finish chunk and right before usage and [DONE]
    with server.client() as c:
        raw = c.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4, "stream": True, "faithlens": {}},
        ).text
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "faithlens" in json.loads(events[-2]) and json.loads(events[-3])["choices"][0]["finish_reason"]


def test_openai_completions_logprobs_and_stop(oai, local):
    r = oai.completions.create(model="tiny-llama", prompt="hello", max_tokens=6, logprobs=2, temperature=0)
    ref = generate(local, local.prompt_ids("hello"), SamplingParams(max_new_tokens=6))
    assert r.choices[0].text == ref.text
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert len(lp.top_logprobs) == 6 and lp.text_offset[0] == 0
    stop = ref.text[2:4]
    stopped = oai.completions.create(
        model="tiny-llama", prompt="hello", max_tokens=6, stop=[stop], temperature=0
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == ref.text[: ref.text.find(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(
            model="tiny-llama", prompt="hello", max_tokens=6, stop=[stop], stream=True, temperature=0
        )
    )
    assert streamed == stopped.choices[0].text


def test_openai_unknown_model(oai):
    with pytest.raises(NotFoundError):
        oai.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])


# -- bad input ---------------------------------------------------------------------------------------------

BAD = [
    ("/v1/generate", {"prompt": "x", "max_new_tokens": "many"}, 400, "invalid_request", "max_new_tokens"),
    ("/v1/generate", {"prompt": ""}, 400, "invalid_request", "prompt"),
    ("/v1/generate", {}, 400, "invalid_request", None),
    (
        "/v1/generate",
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        400,
        "invalid_request",
        None,
    ),
    ("/v1/generate", {"prompt": "x", "temperature": -1}, 400, "invalid_request", "temperature"),
    (
        "/v1/generate",
        {"prompt": "x", "max_new_tokens": 100000},
        400,
        "context_length_exceeded",
        "max_new_tokens",
    ),
    ("/v1/generate", {"prompt": "x" * 5000}, 400, "context_length_exceeded", "prompt"),
    ("/v1/generate", {"prompt": "x", "adapter": "ghost"}, 404, "model_not_found", "adapter"),
    ("/v1/generate", {"prompt": "x", "analysis": {"q": 3}}, 400, "invalid_request", "analysis.q"),
    (
        "/v1/generate",
        {"prompt": "x", "analysis": {"layers": [99]}, "max_new_tokens": 2},
        400,
        "invalid_request",
        "analysis.layers",
    ),
    ("/v1/generate", {"prompt": "x", "surprise": 1}, 400, "invalid_request", "surprise"),
    ("/v1/analyze", {"prompt": "x"}, 400, "invalid_request", "completion"),
    (
        "/v1/analyze",
        {"prompt": "x", "completion": "y", "analysis": {"saliency": {"method": "magic"}}},
        400,
        "invalid_request",
        "analysis.saliency.method",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_request", "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        400,
        "invalid_request",
        "stream",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {}},
        400,
        "invalid_request",
        None,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": True, "n": 2},
        400,
        "unsupported",
        "n",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": "sure"},
        },
        400,
        "invalid_request",
        "stream_options.include_usage",
    ),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "unsupported", "echo"),
    ("/v1/adapters/load", {"name": "evil", "path": "../../etc"}, 400, "adapter_path_invalid", "path"),
    ("/v1/adapters/load", {"name": "evil", "path": "/etc"}, 400, "adapter_path_invalid", "path"),
    ("/v1/adapters/load", {"name": "../x", "path": "x"}, 400, "invalid_request", "name"),
    ("/v1/adapters/unload", {"name": "ghost"}, 404, "model_not_found", "name"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    BAD,
    ids=[f"{p}-{c}-{i}" for i, (p, _, _, c, _) in enumerate(BAD)],
)
def test_bad_input_gets_its_error_code(server, path, body, status, code, param):
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param


def test_transport_level_errors(server):
    with server.client() as c:
        big = c.post(
            "/v1/generate",
            content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        chunked = c.post(
            "/v1/generate",
            content=iter([b'{"prompt": "', b"x" * (2 << 20), b'"}']),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
        broken = c.post("/v1/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
        assert c.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert c.get("/v1/generate").json()["error"]["code"] == "method_not_allowed"


def test_adapter_must_be_safetensors(server, tiny_dir):
    from tests.servers import make_adapter

    target = server.store / "pickled"
    make_adapter(tiny_dir, target)
    (target / "adapter_model.safetensors").rename(target / "adapter_model.bin")
    with server.client() as c:
        r = c.post("/v1/adapters/load", json={"name": "pickled", "path": "pickled"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"


# -- limits and auth (servers of their own) ----------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after(tiny_dir, tmp_path):
    srv = start_server(
        tmp_path,
        tiny_dir,
        FAITHLENS_MAX_BATCH_SIZE="1",
        FAITHLENS_MAX_QUEUE="0",
        FAITHLENS_RETRY_AFTER_S="3",
        FAITHLENS_MAX_NEW_TOKENS="2000",
    )
    try:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                slow = asyncio.ensure_future(
                    c.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 600})
                )
                await asyncio.sleep(0.5)
                rejected = await c.post("/v1/generate", json={"prompt": "b", "max_new_tokens": 2})
                return [await slow, rejected]

        slow, rejected = asyncio.run(run())
        assert slow.status_code == 200
        assert rejected.status_code == 503
        assert rejected.headers["retry-after"] == "3"
        assert rejected.json()["error"]["code"] == "overloaded"
    finally:
        srv.stop()


def test_api_keys_and_scopes(tiny_dir, tmp_path):
    srv = start_server(tmp_path, tiny_dir, FAITHLENS_API_KEYS="k-infer:infer,k-admin:admin")
    try:
        with srv.client() as c:
            assert c.get("/healthz").status_code == 200
            r = c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = c.post(
                "/v1/generate",
                json={"prompt": "x", "max_new_tokens": 2},
                headers={"Authorization": "Bearer wrong"},
            )
            assert r.status_code == 401
            ok = c.post(
                "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, headers={"X-API-Key": "k-infer"}
            )
            assert ok.status_code == 200
            r = c.post("/v1/adapters/unload", json={"name": "a"}, headers={"Authorization": "Bearer k-infer"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
            r = c.post("/v1/adapters/unload", json={"name": "a"}, headers={"Authorization": "Bearer k-admin"})
            assert r.status_code == 404  # authorised; the adapter just does not exist
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="k-infer", max_retries=0)
        assert client.models.list().data[0].id == "tiny-llama"
    finally:
        srv.stop()


def test_without_keys_the_server_binds_loopback_only(tiny_dir, tmp_path):
    from tests.servers import REPO, free_port

    port = free_port()
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "FAITHLENS_MODEL": str(tiny_dir),
        "FAITHLENS_ADAPTER_STORE": str(tmp_path / "s"),
        "FAITHLENS_API_KEYS": "",
    }
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["redis"] == "disabled"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "binding 127.0.0.1 instead" in out
