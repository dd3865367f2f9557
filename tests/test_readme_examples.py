"""The README's SDK and CLI examples, run as written against a live server and a job worker on the tiny model.

Blocks are picked by their section's heading (``SECTIONS``), so a new example there is covered without
touching this file. Shell blocks run with bash (``-e -o pipefail``) with the venv's ``bin`` first on PATH, so
``faithlens`` is the venv's console script; Python blocks run with the venv's python. Both find the server
through ``$FAITHLENS_BASE_URL``, which the SDK and the CLI read. Every block runs: there is no way to skip one."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from faithlens.tiny import save_tiny
from service.launcher import start_private_redis
from tests.servers import REPO, start_server
from tests.test_jobs import Worker

README = REPO / "README.md"
SECTIONS = ("Python SDK and CLI",)
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "shell": "bash", "sh": "bash"}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # 1-based line of the opening fence
    language: str  # "python" or "bash"
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{slug}-L{self.line}-{self.language}"


def readme_blocks(text: str, sections: tuple[str, ...] = SECTIONS) -> list[Block]:
    """The fenced python and shell blocks under the ``## `` headings named in ``sections``."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            language = LANGUAGES.get(line[3:].strip().lower())
            if section in sections and language is not None:
                blocks.append(Block(section, i + 1, language, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end + 1
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_the_sections_exist_and_hold_examples():
    """A renamed heading must not silently turn this file into a no-op."""
    found = {b.section for b in BLOCKS}
    assert found == set(SECTIONS), f"README sections without runnable examples: {set(SECTIONS) - found}"
    assert {b.language for b in BLOCKS} == {"python", "bash"}


def test_block_extraction_takes_code_blocks_of_the_named_sections_only():
    text = (
        "## Python SDK and CLI\n\n```python\nprint(1)\n```\n\n```bash\necho yes\n```\n\n"
        "```text\nnot code\n```\n## Other\n\n```bash\necho no\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.language, b.code) for b in blocks] == [("python", "print(1)\n"), ("bash", "echo yes\n")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server on the tiny model and a job worker (as tests/test_jobs.py), on a private Redis: the examples
    list jobs and adapters, which must be theirs, not those of other test runs sharing the test Redis."""
    work = tmp_path_factory.mktemp("readme")
    tiny = save_tiny(work / "tiny-llama")
    with contextlib.ExitStack() as cleanup:
        redis, redis_url = start_private_redis(work)
        cleanup.callback(redis.wait, timeout=10)
        cleanup.callback(redis.terminate)
        # Cost units are SmolLM2's (faithlens/cost.py); the random tiny model writes all max_new_tokens, so an
        # exact AtMan of it is estimated well over the default limit while taking about a second.
        # One torch thread each: the job's steps take about a second instead of several on two cores that
        # other work shares (FAITHLENS_TORCH_THREADS in the README).
        server = start_server(
            work,
            tiny,
            REDIS_URL=redis_url,
            FAITHLENS_MAX_ANALYSIS_COST="1000000",
            FAITHLENS_TORCH_THREADS="1",
        )
        cleanup.callback(server.stop)
        worker = Worker(dict(server.env), work / "worker.log")
        cleanup.callback(worker.stop)
        yield server, worker


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_example_runs(block: Block, stack, tmp_path):
    server, worker = stack
    env = {**os.environ, "FAITHLENS_BASE_URL": server.url, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FAITHLENS_API_KEY", None)
    if block.language == "python":
        script = tmp_path / "example.py"
        command = [sys.executable, str(script)]
    else:
        assert (BIN / "faithlens").exists(), "the client's console script is not installed in this venv"
        script = tmp_path / "example.sh"
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    script.write_text(block.code)
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, (
        f"README.md:{block.line} ({block.language}) exited with {out.returncode}\n"
        f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}\n"
        f"--- server log\n{server.log_text()[-2000:]}\n"
        f"--- worker log\n{worker.log.read_text(errors='replace')[-2000:]}"
    )
