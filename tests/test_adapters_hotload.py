"""Adapters on a real server: load/unload over HTTP, hot-load from Redis, and swaps under load."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import psutil
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
        assert models["style"]["parent"] == "tiny-llama" and models["style"]["root"] == "style/1"
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


def _server_connections(server, bus: redis.Redis) -> list[dict]:
    """The server process's connections to Redis, as Redis's CLIENT LIST shows them."""
    ports = {
        conn.laddr.port
        for conn in psutil.Process(server.proc.pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == bus.connection_pool.connection_kwargs.get("port", 6379)
    }
    return [c for c in bus.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]


def _wait_for(c: httpx.Client, name: str, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        adapters = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
        if name in adapters:
            return adapters[name]
        time.sleep(0.05)
    return None


def _bad_announcements(server, tiny_dir) -> list[bytes | str]:
    outside = server.store.parent / "outside"
    make_adapter(tiny_dir, outside, seed=3)
    poisoned = make_adapter(tiny_dir, server.store / "poisoned" / "1", seed=4)
    config = json.loads((poisoned / "adapter_config.json").read_text())
    (poisoned / "adapter_config.json").write_text(
        json.dumps({**config, "layer_replication": [[0, 6], [0, 6]]})
    )

    def announce(**fields) -> str:
        return json.dumps({"name": "ok", "path": "ok/1", "version": 1, **fields})

    return [
        "not json",
        b"\xff\xfe\x00garbage",
        "",
        "null",
        "[]",
        "42",
        '"a string"',
        "[" * 5000 + "]" * 5000,
        '{"name": "deep", "path": ' + "[" * 5000 + "]" * 5000 + ', "version": 1}',
        "x" * (1 << 20),
        json.dumps({"name": 5, "path": "ok/1", "version": 1}),
        json.dumps({"name": ["ok"], "path": "ok/1", "version": 1}),
        json.dumps({"path": "ok/1", "version": 1}),
        announce(path=None),
        announce(path=7),
        announce(path={"$ne": 1}),
        announce(version=1e999),
        announce(version=-1),
        announce(version=1.5),
        announce(version={"v": 1}),
        announce(version="1; DROP"),
        announce(version=2**80),
        announce(name="ok\x00"),
        announce(name="\x00"),
        announce(name="../ok"),
        announce(name="x" * 500),
        announce(name=""),
        announce(name="tiny-llama"),
        announce(path="ok/1\x00"),
        announce(path="\x00"),
        announce(path="ok/\x1b[2J"),
        announce(path=""),
        announce(path="x" * 10000),
        announce(path="../../etc"),
        announce(path="/etc"),
        announce(path="/etc/passwd"),
        announce(path=str(outside)),
        announce(path="nowhere/1"),
        announce(name="escape", path=str(outside)),
        announce(name="ghost", path="nowhere"),
        announce(name="poisoned", path="poisoned/1"),
        announce(name="poisoned", path=str(poisoned)),
        announce(path="poisoned/1"),
        announce(path="."),
        announce(path="ok"),
        '{"name": "ok", "path": "ok/1", "version": 1',
        '{"name": "ok", "path": "ok/1", "version": 1}}',
        '{"name": "ok", "name": 3, "path": "ok/1", "version": 1}',
        json.dumps({"name": "ok", "path": "ok/1", "version": True, "extra": "x" * 100}),
        b'{"name": "\xed\xa0\x80", "path": "ok/1", "version": 1}',  # a UTF-8-encoded lone surrogate
    ]


def test_bad_announcements_are_ignored_and_the_server_keeps_going(server, tiny_dir):
    """50 messages an attacker might publish, then a good one: each bad one is dropped without leaking a
    connection or a subscription, and the good one is loaded."""
    bus = redis.Redis.from_url(REDIS_URL)
    bad = _bad_announcements(server, tiny_dir)
    assert len(bad) == 50
    good = make_adapter(tiny_dir, server.store / "ok" / "1", seed=6)
    before = _server_connections(server, bus)
    assert bus.pubsub_numsub(server.channel) == [(server.channel.encode(), 1)]
    for message in bad:
        assert bus.publish(server.channel, message) == 1
    assert bus.publish(server.channel, json.dumps({"name": "ok", "path": "ok/1", "version": 1})) == 1
    with server.client() as c:
        loaded = _wait_for(c, "ok", timeout=15)
        assert loaded is not None, server.log_text()[-3000:]
        assert (loaded["path"], loaded["version"]) == ("ok/1", "1")
        assert base_text(c, "hello", 8, model="ok") == adapter_reference(tiny_dir, good, "hello", 8)
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "ok" in ids and not {"poisoned", "escape", "ghost", "deep"} & ids
        assert c.get("/readyz").status_code == 200
    after = _server_connections(server, bus)
    assert bus.pubsub_numsub(server.channel) == [(server.channel.encode(), 1)]
    assert sum(1 for conn in after if int(conn.get("sub", 0)) > 0) == 1
    assert len(after) <= len(before), (before, after)
    assert "reconnecting" not in server.log_text()
    events = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    loads = [e for e in events if e.get("event") == "adapter loaded" and e.get("adapter") == "ok"]
    assert len(loads) == 1, loads  # no bad message loaded anything
    shutil.rmtree(server.store.parent / "outside")


def test_a_good_announcement_right_after_a_bad_one_is_loaded(server, tiny_dir):
    bus = redis.Redis.from_url(REDIS_URL)
    make_adapter(tiny_dir, server.store / "next" / "1", seed=8)
    bus.publish(server.channel, json.dumps({"name": "next", "path": "next/1\x00", "version": 1}))
    time.sleep(0.1)
    bus.publish(server.channel, json.dumps({"name": "next", "path": "next/1", "version": 1}))
    with server.client() as c:
        assert _wait_for(c, "next", timeout=3) is not None, server.log_text()[-3000:]


def test_start_up_serves_the_latest_version_of_every_stored_adapter(tiny_dir, tmp_path):
    """The store is the durable registry: a server that starts (or restarts after versions were announced
    while it was down) serves each adapter's newest version that passes the checks."""
    store = tmp_path / "adapters"
    make_adapter(tiny_dir, store / "alpha" / "1", seed=21)
    alpha2 = make_adapter(tiny_dir, store / "alpha" / "2", seed=22)
    make_adapter(tiny_dir, store / "beta" / "3", seed=23)
    make_adapter(tiny_dir, store / "beta" / ".4.partial", seed=24)  # a half-written version
    (store / "beta" / "checkpoints" / "job-1").mkdir(parents=True)
    make_adapter(tiny_dir, store / "gamma" / "1", seed=25)
    make_adapter(tiny_dir, store / "gamma" / "2", seed=26, r=65)  # refused (rank): gamma stays at 1
    make_adapter(tiny_dir, store / "tiny-llama" / "1", seed=27)  # would shadow the base model
    bus = redis.Redis.from_url(REDIS_URL)
    srv = start_server(tmp_path, tiny_dir)
    try:
        with srv.client() as c:
            assert _wait_for(c, "gamma", timeout=60) is not None, srv.log_text()[-3000:]
            adapters = {a["name"]: (a["version"], a["path"]) for a in c.get("/v1/adapters").json()["data"]}
            assert adapters == {"alpha": ("2", "alpha/2"), "beta": ("3", "beta/3"), "gamma": ("1", "gamma/1")}
            assert next(m["id"] for m in c.get("/v1/models").json()["data"]) == "tiny-llama"
            assert base_text(c, "hello", 8, model="alpha") == adapter_reference(tiny_dir, alpha2, "hello", 8)
            assert c.post("/v1/adapters/unload", json={"name": "beta"}).status_code == 200
            # the subscription is cut: the follower opens a new one (and only one), and serves what was
            # stored meanwhile; the version an operator unloaded stays unloaded
            alpha3 = make_adapter(tiny_dir, store / "alpha" / "3", seed=28)
            connections = _server_connections(srv, bus)
            (subscriber,) = [conn for conn in connections if int(conn.get("sub", 0)) > 0]
            bus.client_kill_filter(_id=subscriber["id"])
            deadline = time.monotonic() + 30
            while (_wait_for(c, "alpha", timeout=1) or {}).get("version") != "3":
                assert time.monotonic() < deadline, srv.log_text()[-3000:]
            assert base_text(c, "hello", 8, model="alpha") == adapter_reference(tiny_dir, alpha3, "hello", 8)
            assert {a["name"] for a in c.get("/v1/adapters").json()["data"]} == {"alpha", "gamma"}
            assert bus.pubsub_numsub(srv.channel) == [(srv.channel.encode(), 1)]
            assert len(_server_connections(srv, bus)) <= len(connections)
        # a version announced while the server is down
        srv.stop()
        alpha4 = make_adapter(tiny_dir, store / "alpha" / "4", seed=29)
        assert bus.publish(srv.channel, json.dumps({"name": "alpha", "path": "alpha/4", "version": 4})) == 0
        srv = start_server(tmp_path, tiny_dir)
        with srv.client() as c:
            deadline = time.monotonic() + 60
            while (_wait_for(c, "alpha", timeout=1) or {}).get("version") != "4":
                assert time.monotonic() < deadline, srv.log_text()[-3000:]
            assert base_text(c, "hello", 8, model="alpha") == adapter_reference(tiny_dir, alpha4, "hello", 8)
    finally:
        srv.stop()
