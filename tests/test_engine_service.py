"""No request can freeze the server: cost limits, deadlines, cancellation and admission, against a real
server process on the tiny model."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from faithlens.tiny import save_tiny
from tests.servers import start_server

TIMEOUT_S = 3.0
MAX_COST = 1_000_000
PROMPT = "Question: Tom has 3 apples and buys 4 more. How many?\n"


def _completion(chars: int) -> str:
    return ("He has 3. He buys 4. So 3 + 4 = 7. " * 200)[:chars] + " The answer is 7."


LONG = _completion(800)  # exact AtMan ≈ 390k units: allowed, but about 10 s on the tiny model
HUGE = _completion(2000)  # ≈ 2.6M units: over the limit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    srv = start_server(
        tmp_path_factory.mktemp("srv"),
        tiny,
        FAITHLENS_ANALYSIS_TIMEOUT_S=str(TIMEOUT_S),
        FAITHLENS_MAX_ANALYSIS_COST=str(MAX_COST),
        FAITHLENS_MAX_NEW_TOKENS="2000",
    )
    yield srv
    srv.stop()


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def atman(completion: str) -> dict:
    return {"prompt": PROMPT, "completion": completion, "analysis": {"saliency": {"method": "atman"}}}


def small_completion_seconds(server) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    return time.perf_counter() - started


def test_too_costly_analysis_is_refused_before_any_work(server):
    analyses = metric(server, "faithlens_analysis_seconds_count")
    started = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/analyze", json=atman(HUGE), timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "analysis_too_costly" and error["param"] == "analysis"
    assert f"{MAX_COST:,}" in error["message"] and "would fit" in error["message"]
    assert "granularity 'sentence'" in error["message"] or "atman_grad" in error["message"]
    assert time.perf_counter() - started < 2
    assert metric(server, "faithlens_analysis_seconds_count") == analyses  # no analysis ran


def test_generation_with_a_costly_analysis_is_bounded_by_max_new_tokens(server):
    body = {"prompt": PROMPT, "max_new_tokens": 1900, "analysis": {"saliency": {"method": "atman"}}}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "analysis_too_costly"
    assert "at most" in r.json()["error"]["message"]


def test_past_its_deadline_an_analysis_fails_and_frees_the_engine(server):
    timeouts = metric(server, "faithlens_analysis_timeouts_total")
    started = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/analyze", json=atman(LONG), timeout=60)
    elapsed = time.perf_counter() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "analysis_timeout"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2
    assert metric(server, "faithlens_analysis_timeouts_total") == timeouts + 1
    assert small_completion_seconds(server) < 2  # nothing of it is left running


def test_a_disconnect_mid_analysis_cancels_it_within_a_slice(server):
    cancelled = metric(server, "faithlens_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/analyze", json=atman(LONG), timeout=0.8)
    gone_at = time.perf_counter()
    while metric(server, "faithlens_cancelled_total") == cancelled:
        assert time.perf_counter() - gone_at < 1.5, "the analysis was not cancelled"
        time.sleep(0.05)
    assert metric(server, "faithlens_analysis_timeouts_total") >= 0
    assert small_completion_seconds(server) < 2


def test_a_small_request_is_served_while_a_large_analysis_runs(server):
    result: dict = {}

    def analysis() -> None:
        result["response"] = httpx.post(f"{server.url}/v1/analyze", json=atman(LONG), timeout=60)

    worker = threading.Thread(target=analysis)
    worker.start()
    time.sleep(0.8)  # the analysis is running now
    try:
        assert metric(server, "faithlens_analysis_seconds_count") >= 0
        seconds = [small_completion_seconds(server) for _ in range(3)]
        assert max(seconds) < 2, seconds
        assert worker.is_alive()  # it was still running while the small requests were served
    finally:
        worker.join()
    assert result["response"].status_code == 504  # it ran on until its deadline


def test_oversized_prompts_are_refused_without_delaying_others(server):
    huge = "x" * 300_000  # over FAITHLENS_MAX_PROMPT_CHARS; under the body limit
    statuses: list[int] = []

    def oversized() -> None:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": huge, "max_tokens": 2}, timeout=60)
        statuses.append(r.status_code)
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert len(r.content) < 2000  # the error does not echo the input

    threads = [threading.Thread(target=oversized) for _ in range(30)]
    for t in threads:
        t.start()
    try:
        assert small_completion_seconds(server) < 2
    finally:
        for t in threads:
            t.join()
    assert statuses == [400] * 30
