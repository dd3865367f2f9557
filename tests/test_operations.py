"""Operations, against real servers and a real private Redis: readiness means "can serve inference" and
survives a Redis blip (Redis is reported beside it), jobs routes answer 503 while Redis is down; without
API keys only loopback callers with a loopback ``Host:`` are served (DNS rebinding); request JSON with a
number that is not finite is a 400 before any work; error messages do not echo big inputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from faithlens.tiny import save_tiny
from service.launcher import redis_server_binary
from tests.servers import REPO, free_port, start_server

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
DATASETS = {"gsm8k-dev": True, "gsm8k-train": True}  # conftest points FAITHLENS_DATA_DIR at ../shared/data


class PrivateRedis:
    """A redis-server on a fixed free port that a test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the private Redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-ops") / "tiny-llama")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    redis = PrivateRedis(tmp_path_factory.mktemp("redis-ops"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def keyless(tiny, redis_server, tmp_path_factory):
    """No API keys; its Redis is the private one above."""
    srv = start_server(
        tmp_path_factory.mktemp("srv-ops"),
        tiny,
        REDIS_URL=redis_server.url,
        FAITHLENS_API_KEYS="",
        FAITHLENS_MAX_NEW_TOKENS="4",
    )
    yield srv
    srv.stop()


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_readiness_survives_a_redis_blip_and_jobs_answer_503_meanwhile(keyless, redis_server):
    job = {"method": {"type": "grpo"}, "training_data": [{"question": "1+1?", "answer": "2"}]}
    with keyless.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"model": True, "engine": True},
            "redis": "ok",
            "datasets": DATASETS,
        }
        assert c.get("/v1/jobs").status_code == 200

        redis_server.stop()
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text  # a load balancer keeps the server in
        assert ready.json() == {
            "status": "degraded",
            "checks": {"model": True, "engine": True},
            "redis": "down",
            "datasets": DATASETS,
        }
        calls = [
            ("GET", "/v1/jobs", None),
            ("GET", "/v1/jobs/ftjob-x", None),
            ("GET", "/v1/jobs/ftjob-x/events", None),
            ("GET", "/v1/jobs/ftjob-x/checkpoints", None),
            ("POST", "/v1/jobs/ftjob-x/cancel", None),
            ("POST", "/v1/jobs", {**job, "adapter_name": "blip"}),
        ]
        for method, path, body in calls:
            started = time.monotonic()
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert _error(r)["code"] == "redis_unavailable" and int(r.headers["retry-after"]) >= 1, r.text
            print(f"{method} {path}: 503 in {time.monotonic() - started:.2f}s")
        assert (
            c.post("/v1/generate", json={"prompt": "still serving", "max_new_tokens": 2}).status_code == 200
        )

        redis_server.start()
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["redis"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get("/readyz").json() == {
            "status": "ready",
            "checks": {"model": True, "engine": True},
            "redis": "ok",
            "datasets": DATASETS,
        }
        assert c.get("/v1/jobs").status_code == 200
    log = keyless.log_text()
    assert '"level": "error"' not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:1", "127.1.2.3", "[::1]", "[::1]:8000"]
)
def test_without_keys_loopback_host_names_are_served(keyless, host):
    r = httpx.get(f"{keyless.url}/healthz", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "[::2]",
        "10.0.0.1",
        "",
    ],
)
def test_without_keys_other_host_names_are_refused_dns_rebinding(keyless, host):
    """A page on evil.example whose DNS name an attacker re-points at 127.0.0.1 reaches the loopback port
    from the victim's browser, but its requests carry ``Host: evil.example``."""
    for method, path, body in [("GET", "/healthz", None), ("POST", "/v1/chat/completions", CHAT)]:
        r = httpx.request(method, f"{keyless.url}{path}", json=body, headers={"Host": host})
        assert r.status_code == 400, (host, r.text)
        assert _error(r)["code"] == "invalid_host" and _error(r)["param"] == "Host"


def test_without_keys_a_request_without_host_is_refused(keyless):
    port = int(keyless.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b'"invalid_host"' in reply


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_app_without_keys_refuses_remote_peers_however_it_is_served(tiny, tmp_path):
    """``python -m service`` refuses to bind 0.0.0.0 without keys; uvicorn serving the factory directly
    does bind, and the app itself then answers only loopback peers."""
    address = _non_loopback_address()
    assert address is not None, "this test needs a non-loopback IPv4 address to connect from (CI has one)"
    port = free_port()
    env = {
        **os.environ,
        "FAITHLENS_MODEL": str(tiny),
        "FAITHLENS_API_KEYS": "",
        "FAITHLENS_ADAPTER_STORE": str(tmp_path / "adapters"),
    }
    env.pop("REDIS_URL", None)
    log = tmp_path / "uvicorn.log"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app"),
            *("--host", "0.0.0.0", "--port", str(port)),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, log)
        remote = httpx.get(f"http://{address}:{port}/healthz", headers={"Host": "localhost"})
        assert remote.status_code == 403 and _error(remote)["code"] == "loopback_only", remote.text
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready:\n{log.read_text()[-3000:]}")


def test_with_keys_any_host_is_served_unless_allowed_hosts_are_set(tiny, tmp_path):
    open_server = start_server(tmp_path / "open", tiny, FAITHLENS_API_KEYS="k:admin")
    try:
        r = httpx.get(f"{open_server.url}/healthz", headers={"Host": "api.example.com"})
        assert r.status_code == 200, r.text
    finally:
        open_server.stop()
    strict = start_server(
        tmp_path / "strict",
        tiny,
        FAITHLENS_API_KEYS="k:admin",
        FAITHLENS_ALLOWED_HOSTS="api.example.com, *.corp.example",
    )
    try:
        for host, status in [
            ("api.example.com", 200),
            ("API.example.com:443", 200),
            ("eu.corp.example", 200),
            ("corp.example", 400),
            ("localhost:8000", 200),
            ("evil.example", 400),
        ]:
            r = httpx.get(f"{strict.url}/healthz", headers={"Host": host})
            assert r.status_code == status, (host, r.text)
    finally:
        strict.stop()


NOT_FINITE = [
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "faithlens": {"tau_waad": NaN}}',
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true, '
        '"faithlens": {"tau_waad": NaN}}',
    ),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}'),
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "analysis": {"tau_delta": -Infinity}}'),
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "analysis": {"saliency": {"factor": 1e999}}}'),
    ("/v1/analyze", '{"prompt": "hi", "completion": "ok", "analysis": {"tau_waad": NaN}}'),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi", "name": NaN}], "max_tokens": 2}',
    ),
    (
        "/v1/jobs",
        '{"method": {"type": "grpo", "learning_rate": NaN}, "adapter_name": "nan", '
        '"training_data": [{"question": "q", "answer": "a"}]}',
    ),
]


@pytest.mark.parametrize(("path", "body"), NOT_FINITE)
def test_numbers_that_are_not_finite_are_a_400_before_any_work(keyless, path, body):
    with keyless.client() as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert _error(r)["code"] == "invalid_request" and "finite" in _error(r)["message"], r.text
    assert r.headers["content-type"].startswith("application/json")


def test_the_words_nan_and_infinity_in_strings_are_fine(keyless):
    with keyless.client() as c:
        r = c.post("/v1/completions", json={"prompt": "NaN Infinity 1e999", "max_tokens": 2})
    assert r.status_code == 200, r.text


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} in a response")

    return json.loads(text, parse_constant=refuse)


def test_streams_and_responses_are_strict_json(keyless):
    annotated = {"metrics": ["fai", "waad", "flags"], "tau_waad": 1e308, "tau_delta": -1e308}
    with keyless.client() as c:
        plain = c.post("/v1/chat/completions", json={**CHAT, "faithlens": annotated, "logprobs": True})
        assert plain.status_code == 200, plain.text
        _strict(plain.text)
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={**CHAT, "faithlens": annotated, "stream": True, "logprobs": True, "top_logprobs": 2},
        ) as streamed:
            events = [line[len("data: ") :] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        _strict(event)


def test_errors_quote_at_most_a_short_prefix_of_the_input(keyless):
    huge = "x" * 900_000
    cases = [
        ("/v1/chat/completions", {**CHAT, "model": huge}),
        ("/v1/generate", {"prompt": "hi", "analysis": {"saliency": {"method": huge}}}),
        ("/v1/generate", {"prompt": "hi", huge: 1}),
        ("/v1/adapters/unload", {"name": huge}),
    ]
    with keyless.client() as c:
        for path, body in cases:
            r = c.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, r.status_code)
            assert len(r.content) < 1500, (path, r.status_code, r.text[:300])
            assert "x" * 101 not in r.text
        r = c.get(f"/v1/jobs/{'j' * 8000}")
        assert r.status_code == 404 and len(r.content) < 1500, r.text[:300]
