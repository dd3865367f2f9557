"""The client CLI (``faithlens``, from clients/python) against a real server process. Most commands run
``faithlens_client.cli.main`` in this process (real HTTP, no interpreter start per command); the README's
example runs as a subprocess. (tests/test_cli.py covers the developer CLI, ``python -m faithlens``.)"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import redis
from faithlens_client import Faithlens
from faithlens_client.cli import build_parser, main
from faithlens_client.types import Capabilities, Generation, Job

from faithlens.tiny import save_tiny
from tests.servers import REDIS_URL, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """No worker listens on this server's private job queue: its jobs stay queued until cancelled."""
    work = tmp_path_factory.mktemp("client-cli")
    queue = f"faithlens-jobs-cli-{uuid.uuid4().hex[:8]}"
    srv = start_server(
        work,
        save_tiny(work / "tiny-llama"),
        FAITHLENS_API_KEYS="k-admin:admin,k-infer:infer",
        FAITHLENS_JOB_QUEUE=queue,
    )
    yield srv
    srv.stop()
    redis.Redis.from_url(REDIS_URL).delete(queue)  # the undelivered tasks


@pytest.fixture
def cli(server, capsys):
    """``faithlens ARGS... --base-url URL --api-key k-admin`` -> (exit status, stdout, stderr)."""

    def run(*args: str, key: str = "k-admin") -> tuple[int, str, str]:
        status = main([*args, "--base-url", server.url, "--api-key", key])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--base-url", "U", "--api-key", "K", "jobs", "list"],
        ["jobs", "list", "--json", "--base-url", "U", "--api-key", "K"],
        ["jobs", "--json", "--base-url", "U", "list", "--api-key", "K"],
        ["--base-url", "U", "jobs", "--api-key", "K", "list", "--json"],
    ],
)
def test_global_options_go_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert (args.json, args.base_url, args.api_key, args.limit) == (True, "U", "K", 20)
    assert args.handler.__name__ == "cmd_jobs_list"


def test_an_option_given_before_the_command_is_not_reset_by_it():
    for argv in (["--json", "models"], ["--base-url", "U", "adapters", "list"], ["--api-key", "K", "models"]):
        args = vars(build_parser().parse_args(argv))
        given = {argv[0].lstrip("-").replace("-", "_"): True if argv[0] == "--json" else argv[1]}
        assert given.items() <= args.items()
    defaults = build_parser().parse_args(["generate", "hi"])
    assert (defaults.json, defaults.base_url, defaults.api_key) == (False, None, None)


def test_the_readme_example_runs(server):
    """``faithlens jobs list --json``, as a process, with every global option after the command."""
    with Faithlens(server.url, api_key="k-infer") as client:  # an infer key lists the jobs it owns
        job = client.jobs.create(method={"type": "grpo"}, adapter_name=f"readme-{uuid.uuid4().hex[:8]}")
        client.jobs.cancel(job.id)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "faithlens_client.cli",
            "jobs",
            "list",
            "--json",
            "--base-url",
            server.url,
            "--api-key",
            "k-infer",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert job.id in [Job.model_validate(j).id for j in json.loads(out.stdout)]


def test_models_adapters_and_errors(cli):
    status, out, _ = cli("models", "--json")
    assert status == 0 and json.loads(out)[0]["id"] == "tiny-llama"
    status, out, _ = cli("models")
    assert status == 0 and out.strip() == "tiny-llama  (base)"
    status, out, _ = cli("adapters", "list", "--json")
    assert status == 0 and json.loads(out) == []
    status, _, err = cli("adapters", "unload", "ghost")
    assert status == 2 and "model_not_found" in err
    status, _, err = cli("adapters", "unload", "ghost", key="k-infer")
    assert status == 2 and "403" in err


def test_generate_analyze_and_audit(cli, tmp_path):
    status, out, _ = cli("generate", "hello", "--max-new-tokens", "6")
    assert status == 0 and "anchors" in out
    status, out, _ = cli("generate", "hello", "--max-new-tokens", "6", "--seed", "1", "--json")
    generated = Generation.model_validate_json(out)
    assert status == 0 and generated.usage.completion_tokens == 6
    status, out, _ = cli("analyze", "hello", "--completion", generated.text, "--json")
    assert status == 0 and len(Generation.model_validate_json(out).annotations.tokens) >= 1
    html = tmp_path / "a.html"
    status, out, _ = cli("audit", "hello", "--max-new-tokens", "16", "--html", str(html))
    assert status == 0 and html.exists() and out.startswith(f"wrote {html}")
    status, out, _ = cli("audit", "hello", "--completion", " hi", "--html", str(html), "--json")
    assert status == 0 and json.loads(out)["num_response_tokens"] >= 1


def test_jobs_create_get_and_cancel(cli, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "What is 1+1?", "answer": "#### 2"}\n')
    status, out, _ = cli(
        "jobs",
        "create",
        "--adapter-name",
        "cli",
        "--set",
        "max_steps=2",
        "--training-file",
        str(data),
        "--json",
    )
    job = Job.model_validate_json(out)
    assert status == 0 and job.status == "queued" and job.hyperparameters["max_steps"] == 2
    status, out, _ = cli("jobs", "get", job.id)
    assert status == 0 and out.startswith(f"{job.id}  queued")
    status, out, _ = cli("jobs", "cancel", job.id)
    assert status == 0 and out.strip() == f"{job.id}: cancelled"
    status, out, _ = cli("jobs", "watch", job.id, "--json")
    assert status == 1 and [json.loads(line)["message"] for line in out.splitlines()] == [
        "job created (grpo)",
        "cancelled while queued",
    ]
    status, _, err = cli("jobs", "cancel", job.id)
    assert status == 2 and "job_finished" in err


def test_capabilities_command(cli, server):
    """Needs the server's GET /v1/capabilities."""
    with Faithlens(server.url, api_key="k-infer") as client:
        caps = client.capabilities()
    status, out, _ = cli("capabilities", "--json", key="k-infer")
    assert status == 0 and Capabilities.model_validate_json(out) == caps
    status, out, _ = cli("capabilities", key="k-infer")
    assert status == 0
    for method in caps.saliency_methods:
        assert any(line.split()[:1] == [method.name] for line in out.splitlines())
    for strategy in caps.credit_strategies:
        assert any(line.split()[:1] == [strategy.name] for line in out.splitlines())
    assert f"granularities: {', '.join(caps.granularities)}" in out


def test_saliency_names_come_from_the_server(cli, server, tmp_path):
    """Needs the server's GET /v1/capabilities. ``--saliency`` has no fixed choices: the name is checked
    against the server's list before anything is generated."""
    with Faithlens(server.url, api_key="k-infer") as client:
        offered = client.capabilities().saliency_method_names
    for command in (
        ["generate", "hi", "--max-new-tokens", "2"],
        ["analyze", "hi", "--completion", " x"],
        ["audit", "hi", "--html", str(tmp_path / "x.html")],
    ):
        status, out, err = cli(*command, "--saliency", "no-such-method")
        assert status == 2 and out == ""
        assert "unknown saliency method 'no-such-method'" in err
        assert all(name in err for name in offered)
    assert not (tmp_path / "x.html").exists()
    status, out, _ = cli("generate", "hi", "--max-new-tokens", "4", "--saliency", "atman_grad", "--json")
    assert status == 0
    assert Generation.model_validate_json(out).annotations.summary.saliency_method == "atman_grad"
