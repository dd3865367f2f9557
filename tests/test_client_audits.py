"""Audits from the SDK (sync and async) and the client CLI, against a real tiny-model server, a real Celery
worker process and a private redis-server. No mocks: every answer the SDK types is the server's own."""

from __future__ import annotations

import asyncio
import inspect
import json

import httpx
import pytest
from faithlens_client import (
    AsyncFaithlens,
    Audit,
    AuditReportSummary,
    AuditResult,
    Faithlens,
    SamplingOptions,
    _client,
)
from faithlens_client.cli import build_parser, main
from faithlens_client.errors import BadRequestError, ConflictError, NotFoundError
from faithlens_client.types import Analysis
from pydantic import ValidationError

from tests.test_audits import audit_server, start_workers

SAMPLING = {"max_new_tokens": 4}
ANALYSIS = {"metrics": ["fai", "waad", "flags"]}


def rows(n: int) -> list[dict]:
    """Completions given or generated, prompts or messages, references or none."""
    out = []
    for i in range(n):
        row: dict = {"id": f"c{i}"}
        if i % 3 == 0:
            row["messages"] = [{"role": "user", "content": f"What is {i} + {i}?"}]
        else:
            row["prompt"] = f"Add {i} and {i}. Answer:"
        if i % 2 == 0:
            row["completion"] = f" {i} + {i} = {2 * i}. #### {2 * i}"
            row["reference"] = f"#### {2 * i}"
        out.append(row)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server, one worker on its private audit queue, and a private Redis."""
    work = tmp_path_factory.mktemp("client-audits")
    with audit_server(work, "client", FAITHLENS_AUDIT_SHARD_SIZE="4") as (server, _):
        workers = start_workers({**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}, work, 1)
        try:
            yield server
        finally:
            workers[0].stop()


@pytest.fixture
def client(stack):
    with Faithlens(stack.url, timeout=120) as c:
        yield c


def test_sdk_audit_create_wait_results_and_report(stack, client):
    data = rows(6)
    audit = client.audits.create(data, analysis=ANALYSIS, sampling=SAMPLING, metadata={"who": "sdk"})
    assert isinstance(audit, Audit) and audit.id.startswith("audit_")
    assert audit.request_counts.total == 6 and audit.metadata == {"who": "sdk"}
    seen: list[tuple[str, int]] = []
    done = client.audits.wait(
        audit.id,
        on_progress=lambda a, events: seen.append((a.status, a.request_counts.completed)),
        poll_interval=0.2,
        timeout=300,
    )
    assert done.status == "completed" and done.finished, done
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert done.completed_at is not None and seen[-1] == ("completed", 6)
    assert client.audits.get(audit.id) == done
    assert any("created" in e.message for e in client.audits.events(audit.id))

    results = list(client.audits.results(audit.id))
    assert all(isinstance(r, AuditResult) for r in results)
    assert [r.id for r in results] == [row["id"] for row in data]
    assert [r.index for r in results] == list(range(6))
    for row, result in zip(data, results, strict=True):
        assert result.error is None and isinstance(result.annotations, Analysis)
        assert result.text is not None
        if "completion" in row:
            assert result.text == row["completion"] and result.correct is True
        else:
            assert result.correct is None
    # the typed rows are the server's lines, nothing added or lost
    with stack.client() as raw:
        lines = [json.loads(line) for line in raw.get(f"/v1/audits/{audit.id}/results").text.splitlines()]
    assert [r.model_dump(mode="json", by_alias=True, exclude_unset=True) for r in results] == lines

    report = client.audits.report(audit.id)
    assert isinstance(report, AuditReportSummary) and report.id == audit.id
    assert report.summary is not None and report.summary["n_rows"] == 6
    page = client.audits.report_html(audit.id)
    assert isinstance(page, str) and "<html" in page.lower()

    assert audit.id in [a.id for a in client.audits.list(limit=100)]
    with pytest.raises(ConflictError) as exc:
        client.audits.cancel(audit.id)
    assert exc.value.code == "audit_finished"


def test_sdk_errors_are_typed(client):
    with pytest.raises(NotFoundError):
        client.audits.get("audit_nope")
    with pytest.raises(NotFoundError):
        list(client.audits.results("audit_nope"))
    with pytest.raises(BadRequestError) as exc:
        client.audits.create("gsm8k-test")
    assert exc.value.code == "unknown_dataset"
    with pytest.raises(ValidationError):  # checked by the SDK before anything is sent
        client.audits.create([{"prompt": "a"}], sampling={"max_new_tokens": 0})


def test_list_pages_with_after(client):
    first = client.audits.create([{"prompt": "a", "completion": " b"}], analysis=ANALYSIS)
    second = client.audits.create([{"prompt": "c", "completion": " d"}], analysis=ANALYSIS)
    listed = client.audits.list(limit=2)
    assert [a.id for a in listed] == [second.id, first.id]
    assert [a.id for a in client.audits.list(limit=1, after=second.id)] == [first.id]
    for audit in (first, second):
        assert client.audits.wait(audit.id, poll_interval=0.2, timeout=300).status == "completed"


def test_async_audits(stack):
    text = "\n".join(json.dumps(row) for row in rows(3))

    async def go() -> tuple[Audit, list[AuditResult], AuditReportSummary, str]:
        async with AsyncFaithlens(stack.url, timeout=120) as c:
            audit = await c.audits.create(
                {"jsonl": text}, analysis=ANALYSIS, sampling=SamplingOptions(max_new_tokens=4)
            )
            assert (await c.audits.get(audit.id)).id == audit.id
            done = await c.audits.wait(audit.id, poll_interval=0.2, timeout=300)
            results = [r async for r in c.audits.results(audit.id)]
            assert audit.id in [a.id for a in await c.audits.list()]
            assert await c.audits.events(audit.id)
            return done, results, await c.audits.report(audit.id), await c.audits.report_html(audit.id)

    done, results, report, page = asyncio.run(go())
    assert done.status == "completed" and done.input == "upload"
    assert [r.id for r in results] == ["c0", "c1", "c2"]
    assert all(isinstance(r.annotations, Analysis) for r in results)
    assert report.summary is not None and report.summary["n_rows"] == 3 and "<html" in page.lower()


# -- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(stack, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        status = main([*args, "--base-url", stack.url])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def test_cli_audit_a_file_end_to_end(cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows(5)) + "\n")
    status, out, err = cli("audits", "create", "--file", str(path), "--max-new-tokens", "4", "--watch")
    assert status == 0, err
    audit_id = out.splitlines()[0]
    assert audit_id.startswith("audit_") and "completed" in out and "5/5 rows" in out

    status, out, _ = cli("audits", "get", audit_id, "--json")
    assert status == 0 and Audit.model_validate_json(out).status == "completed"
    status, out, _ = cli("audits", "list")
    assert status == 0 and audit_id in out
    status, out, _ = cli("audits", "results", audit_id)
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [line["id"] for line in lines] == [f"c{i}" for i in range(5)]
    assert all(line["error"] is None and line["annotations"]["tokens"] for line in lines)

    html = tmp_path / "report.html"
    status, out, _ = cli("audits", "report", audit_id, "--html", str(html))
    assert status == 0 and "5 rows" in out and "mean_fai" in out and f"wrote {html}" in out
    assert "<html" in html.read_text().lower()
    status, out, _ = cli("audits", "report", audit_id, "--json")
    assert status == 0 and json.loads(out)["summary"]["n_rows"] == 5

    status, _, err = cli("audits", "cancel", audit_id)
    assert status == 2 and "audit_finished" in err


def test_cli_audit_with_the_rhythm_report(cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows(2)) + "\n")
    argv = ["audits", "create", "--file", str(path), "--max-new-tokens", "4", "--report", "summary"]
    status, out, err = cli(*argv, "--report", "rhythm", "--watch")
    assert status == 0, err
    audit_id = out.splitlines()[0]
    status, out, _ = cli("audits", "get", audit_id, "--json")
    assert Audit.model_validate_json(out).reports == ["summary", "rhythm"]
    status, out, _ = cli("audits", "report", audit_id)
    assert status == 0 and "mean_fai" in out and "rhythm study: 2 responses" in out
    assert all(line in out for line in ("  A  observed", "  B  observed", "  C  ("))
    status, _, err = cli(*argv[:-2], "--report", "bogus")
    assert status == 2 and "unknown_report" in err


def test_cli_dataset_with_saliency_and_json_watch(cli):
    status, out, err = cli(
        "audits",
        "create",
        "--dataset",
        "gsm8k-dev",
        "--limit",
        "2",
        "--saliency",
        "atman",
        "--max-new-tokens",
        "4",
        "--watch",
        "--json",
    )
    assert status == 0, err
    decoder = json.JSONDecoder()
    audit, end = decoder.raw_decode(out)
    assert audit["input"] == "gsm8k-dev" and audit["request_counts"]["total"] == 2
    assert audit["analysis"]["saliency"]["method"] == "atman"
    events = [json.loads(line) for line in out[end:].splitlines() if line.strip()]
    assert events and all(e["object"] == "audit.event" for e in events)
    status, out, _ = cli("audits", "results", audit["id"])
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["id"] for line in lines] == ["gsm8k-dev-0", "gsm8k-dev-1"]
    assert all(line["annotations"]["summary"]["saliency_method"] == "atman" for line in lines)
    assert all(isinstance(line["correct"], bool) for line in lines)


def test_cli_refuses_an_unknown_saliency_method_and_a_missing_audit(cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    status, _, err = cli("audits", "create", "--file", str(path), "--saliency", "no-such-method")
    assert status == 2 and "unknown saliency method" in err
    status, _, err = cli("audits", "get", "audit_nope")
    assert status == 2 and "404" in err


# -- without a server ----------------------------------------------------------------------------------------
def test_cli_audits_create_takes_a_file_or_a_dataset(capsys):
    args = build_parser().parse_args(["audits", "create", "--dataset", "gsm8k-dev", "--limit", "3", "--json"])
    assert (args.dataset, args.limit, args.file, args.json, args.watch) == ("gsm8k-dev", 3, None, True, False)
    for argv in (["audits", "create"], ["audits", "create", "--file", "f", "--dataset", "gsm8k-dev"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    capsys.readouterr()


def test_audits_create_takes_what_its_request_builder_takes():
    params = list(inspect.signature(_client.Audits.create).parameters.values())
    assert params[0].name == "self"
    assert params[1:] == list(inspect.signature(_client.create_audit_call).parameters.values())


def test_the_request_body():
    call = _client.create_audit_call("gsm8k-dev", limit=3, saliency="atman", sampling={"max_new_tokens": 8})
    assert (call.method, call.path) == ("POST", "/v1/audits")
    assert call.json == {
        "input": "gsm8k-dev",
        "limit": 3,
        "analysis": {"saliency": {"method": "atman"}},
        "sampling": {"max_new_tokens": 8},
    }
    assert _client.create_audit_call([{"prompt": "a"}]).json == {"input": [{"prompt": "a"}]}
    html = _client.audit_report_html_call("audit_x")
    assert html.params == {"format": "html"} and html.text
    assert httpx.URL(f"http://h{_client.audit_results_call('audit_x').path}").path.endswith("/results")
