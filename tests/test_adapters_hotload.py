"""Adapters on a real server: load/unload over HTTP, hot-load from Redis, and swaps under load."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import redis

from faithlens import lora
from faithlens.generation import generate
from faithlens.model import load_model
from faithlens.params import SamplingParams
from faithlens.tiny import save_tiny
from tests.servers import REDIS_URL, make_adapter, start_server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-ad") / "tiny-llama")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv-ad"), tiny_dir)
    yield srv
    srv.stop()


def adapter_reference(tiny_dir, adapter_dir, prompt: str, n: int) -> str:
    lm = load_model(tiny_dir, device="cpu", dtype="float32")
    lora.attach(lm, adapter_dir, "ref")
    return generate(lm, lm.prompt_ids(prompt), SamplingParams(max_new_tokens=n), adapter="ref").text


def base_text(c: httpx.Client, prompt: str, n: int, model: str | None = None) -> str:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    if model:
        body["model"] = model
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_load_use_and_unload_over_http(server, tiny_dir):
    path = make_adapter(tiny_dir, server.store / "style" / "1", seed=1)
    want = adapter_reference(tiny_dir, path, "hello", 10)
    with server.client() as c:
        base = base_text(c, "hello", 10)
        r = c.post("/v1/adapters/load", json={"name": "style", "path": "style/1"})
        assert r.status_code == 200 and r.json()["name"] == "style"
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["style"]["parent"] == "tiny-llama" and models["style"]["root"] == str(path.resolve())
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["style"]
        got = c.post(
            "/v1/generate", json={"prompt": "hello", "max_new_tokens": 10, "adapter": "style"}
        ).json()
        assert got["text"] == want != base
        assert got["adapter"] == "style"
        assert base_text(c, "hello", 10, model="style") == want
        assert base_text(c, "hello", 10) == base  # the base model is untouched next to an adapter
        assert c.post("/v1/adapters/unload", json={"name": "style"}).status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llama"]
        r = c.post("/v1/generate", json={"prompt": "hello", "adapter": "style"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert base_text(c, "hello", 10) == base


def test_publish_to_redis_hot_loads_within_2s(server, tiny_dir):
    path = make_adapter(tiny_dir, server.store / "hot" / "1", seed=2)
    want = adapter_reference(tiny_dir, path, "hello", 8)
    bus = redis.Redis.from_url(REDIS_URL)
    with server.client() as c:
        published = time.monotonic()
        assert bus.publish(server.channel, json.dumps({"name": "hot", "path": str(path), "version": 1})) == 1
        while time.monotonic() - published < 2.0:
            if "hot" in {m["id"] for m in c.get("/v1/models").json()["data"]}:
                break
            time.sleep(0.02)
        answer = base_text(c, "hello", 8, model="hot")
        elapsed = time.monotonic() - published
    assert answer == want
    assert elapsed < 2.0, f"hot-load took {elapsed:.2f}s"


def test_swaps_under_load_fail_no_request(server, tiny_dir):
    """Clients hammer an adapter while three new versions are published; every request succeeds, and
    every answer comes from exactly one version (never a mix)."""
    bus = redis.Redis.from_url(REDIS_URL)
    paths = [make_adapter(tiny_dir, server.store / "swap" / str(v), seed=10 + v) for v in range(1, 5)]
    answers = {adapter_reference(tiny_dir, p, "hello", 12) for p in paths}
    assert len(answers) == 4
    bus.publish(server.channel, json.dumps({"name": "swap", "path": "swap/1", "version": 1}))
    with server.client() as c:
        deadline = time.monotonic() + 5
        while "swap" not in {m["id"] for m in c.get("/v1/models").json()["data"]}:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/completions",
                    json={"model": "swap", "prompt": "hello", "max_tokens": 12, "temperature": 0},
                )
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append(r.json()["choices"][0]["text"])

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    for version in (2, 3, 4):
        before = len(seen) + len(failures)
        bus.publish(
            server.channel, json.dumps({"name": "swap", "path": f"swap/{version}", "version": version})
        )
        deadline = time.monotonic() + 60
        while len(seen) + len(failures) < before + 6 and time.monotonic() < deadline:
            time.sleep(0.05)  # let requests run across the swap
    stop.set()
    for w in workers:
        w.join()
    assert not failures
    assert len(seen) >= 18
    assert set(seen) <= answers
    with server.client() as c:
        assert base_text(c, "hello", 12, model="swap") == adapter_reference(tiny_dir, paths[-1], "hello", 12)
    with server.client() as c:
        swap = [a for a in c.get("/v1/adapters").json()["data"] if a["name"] == "swap"]
    assert swap[0]["version"] == "4"


def test_bad_announcements_are_ignored_and_the_server_keeps_going(server, tiny_dir):
    bus = redis.Redis.from_url(REDIS_URL)
    outside = server.store.parent / "outside"
    make_adapter(tiny_dir, outside, seed=3)
    bus.publish(server.channel, "not json")
    bus.publish(server.channel, json.dumps({"name": "escape", "path": str(outside), "version": 1}))
    bus.publish(server.channel, json.dumps({"name": "ghost", "path": "nowhere", "version": 1}))
    time.sleep(0.5)
    with server.client() as c:
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert not {"escape", "ghost"} & ids
        assert c.get("/readyz").status_code == 200
    shutil.rmtree(outside)
