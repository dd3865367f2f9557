"""Real servers for tests: ``python -m service`` in a subprocess on a free port, against the real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("FAITHLENS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    store: Path
    channel: str
    env: dict[str, str]

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    workdir: Path,
    model: Path | None,
    ready_timeout: float = 180,
    python: Path | str = sys.executable,
    cwd: Path = REPO,
    **env: str,
) -> Server:
    """Start a server and wait for ``/readyz``. ``model=None`` serves the embedded SmolLM2. ``python`` and
    ``cwd`` run it with another interpreter (another install of the project) from another directory.

    Each server gets its own adapter store and its own hot-load channel, so parallel test runs on one
    Redis do not hear each other."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    store = workdir / "adapters"
    channel = f"faithlens:adapters:test-{uuid.uuid4().hex[:8]}"
    full_env = {
        **os.environ,
        "FAITHLENS_ADAPTER_STORE": str(store),
        "FAITHLENS_ADAPTER_CHANNEL": channel,
        "REDIS_URL": REDIS_URL,
        "FAITHLENS_LOG_JSON": "true",
        **env,
    }
    if model is not None:
        full_env["FAITHLENS_MODEL"] = str(model)
    else:
        full_env.pop("FAITHLENS_MODEL", None)
    log = workdir / f"server-{port}.log"
    proc = subprocess.Popen(
        [str(python), "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log, store, channel, full_env)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log_text()[-4000:]}")


def make_adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4) -> Path:
    """A LoRA adapter for the tiny model at ``base_dir``, with random (non-zero) weights so it changes
    the output, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=r, lora_alpha=4 * r, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out
