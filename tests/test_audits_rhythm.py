"""The ``rhythm`` audit report (spec §11) end to end: a real server, a real Celery worker process and a
private redis-server, on the tiny random model; and its HTML section from a hand-made report.

The tiny model's tokenizer is byte-level: the given completions are long enough (in tokens) for some of
statistic C's trials, the short generated response is not, and C's figures may be null."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch

from service.report_html import render_report
from tests.test_audits import audit_server, create, results, start_workers, wait

UI_DIR = Path(__file__).resolve().parent.parent / "clients" / "python" / "faithlens_client" / "static"
STATS = {"n", "A", "B", "C", "B_grid", "per_problem"}
ROWS = [
    {"id": "given", "prompt": "Add 17 and 25.", "completion": " 17 + 25 = 42, so <b>the answer</b> is 42 & done."},
    {"id": "chat", "messages": [{"role": "user", "content": "What is 6 * 7?"}]},
    {"id": "plain", "prompt": "Count to five:", "completion": " one, two, three, four, five. That is all."},
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server and one audit worker, shared by the module's tests."""
    work = tmp_path_factory.mktemp("audits-rhythm")
    settings = {"FAITHLENS_AUDIT_SHARD_SIZE": "2", "FAITHLENS_MAX_AUDIT_ROW_COST": "20000"}
    with audit_server(work, "rhythm", **settings) as (server, _):
        workers = start_workers({**server.env, "FAITHLENS_LOG_LEVEL": "INFO"}, work, 1)
        try:
            yield server
        finally:
            workers[0].stop()


def run_audit(server, reports: list[str]) -> tuple[str, list[dict]]:
    with server.client(timeout=120) as c:
        audit = create(c, input=ROWS, reports=reports, sampling={"max_new_tokens": 12})
        done = wait(c, audit["id"], {"completed", "failed", "cancelled"}, timeout=240)
        assert done["status"] == "completed", done
        return audit["id"], results(c, audit["id"])


def test_summary_and_rhythm_pool_the_rows_studies(stack):
    audit_id, lines = run_audit(stack, ["summary", "rhythm"])
    analysed = [line for line in lines if line["error"] is None]
    assert analysed, lines
    with stack.client() as c:
        report = c.get(f"/v1/audits/{audit_id}/report").json()
        page = c.get(f"/v1/audits/{audit_id}/report", params={"format": "html"})
    assert report["summary"] is not None and report["summary"]["n_rows"] == len(analysed)
    rhythm = report["rhythm"]
    assert set(rhythm) >= STATS
    assert rhythm["n"] == len(analysed) == len(rhythm["per_problem"])
    assert [p["index"] for p in rhythm["per_problem"]] == [line["index"] for line in analysed]
    for problem, line in zip(rhythm["per_problem"], analysed, strict=True):
        assert problem["tokens"] == len(line["annotations"]["tokens"])
    # A pools the rows' sums: Σ entropy at WAAD peaks / Σ WAAD peaks
    peaks = sum(p["A"]["waad_peaks"] for p in rhythm["per_problem"])
    assert peaks > 0
    at_peaks = sum(p["A"]["entropy_sum_at_peaks"] for p in rhythm["per_problem"])
    assert rhythm["A"]["observed"] == pytest.approx(at_peaks / peaks)
    tokens = sum(p["A"]["tokens"] for p in rhythm["per_problem"])
    entropy = sum(p["A"]["entropy_sum"] for p in rhythm["per_problem"])
    assert rhythm["A"]["baseline"] == pytest.approx(entropy / tokens)
    # the examples: the first rows studied, their response tokens and peaks
    examples = rhythm["examples"]
    assert [e["index"] for e in examples] == [line["index"] for line in analysed][:3]
    for example, line, problem in zip(examples, analysed, rhythm["per_problem"], strict=False):
        assert example["tokens"] == [t["text"] for t in line["annotations"]["tokens"]]
        assert example["waad_peaks"] == problem["waad_peaks"]
        assert example["fai_peaks"] == problem["fai_peaks"]
    assert page.status_code == 200, page.text
    assert 'id="headline"' in page.text and 'id="rhythm"' in page.text


def test_a_rows_study_is_the_one_study_response_gives(stack):
    """A row's study on the worker equals :func:`faithlens.study.study_response` run here on the same
    model, seeded by the row's index (rows with a given completion; floats up to the CPU's rounding)."""
    from faithlens.model import encode_completion, encode_prompt, load_model
    from faithlens.study import RhythmConfig, study_response
    from jobs.audits import AuditStore

    audit_id, lines = run_audit(stack, ["rhythm"])
    assert lines[0]["error"] is None and lines[2]["error"] is None
    stored = AuditStore(stack.env["REDIS_URL"]).results(audit_id, [0, 2])
    lm = load_model(stack.env["FAITHLENS_MODEL"], device="cpu", dtype="float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (FAITHLENS_TORCH_THREADS=1); many threads crawl on tiny shapes
    try:
        mine_all = [
            study_response(
                lm,
                encode_prompt(lm.tokenizer, ROWS[index]["prompt"]),
                encode_completion(lm.tokenizer, ROWS[index]["completion"]),
                index=index,
                config=RhythmConfig(),
            ).to_json()
            for index in (0, 2)
        ]
    finally:
        torch.set_num_threads(threads)
    for mine, result in zip(mine_all, stored, strict=True):
        theirs = result["rhythm"]
        for key in ("index", "tokens", "answer_start", "waad_peaks", "fai_peaks"):
            assert theirs[key] == mine[key], key
        assert theirs["A"] == pytest.approx(mine["A"], rel=1e-4)
        assert theirs["B"] == pytest.approx(mine["B"])
        assert [(t["rank"], t["token_high"]) for t in theirs["C"]["trials"]] == [
            (t["rank"], t["token_high"]) for t in mine["C"]["trials"]
        ]


def test_rhythm_alone_renders_its_section_with_escaped_tokens(stack):
    audit_id, lines = run_audit(stack, ["rhythm"])
    with stack.client() as c:
        report = c.get(f"/v1/audits/{audit_id}/report").json()
        page = c.get(f"/v1/audits/{audit_id}/report", params={"format": "html"})
    assert report["summary"] is None and report["rhythm"]["n"] == sum(1 for x in lines if x["error"] is None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert 'id="rhythm"' in text and 'id="headline"' not in text
    assert f"faithlens audit {audit_id}: rhythm" in text
    section = text[text.index('id="rhythm"') : text.index('id="rows"')]
    for example in report["rhythm"]["examples"]:
        for token in example["tokens"]:
            assert html.escape(token, quote=True) in section
    assert "<b>" not in text and "&lt;" in section  # the given completion's markup, escaped
    shown = section[section.index('class="rhythm-example"') :]
    assert 'class="waad-peak' in shown or 'class="fai-peak' in shown


def test_an_unknown_report_is_refused(stack):
    with stack.client() as c:
        r = c.post("/v1/audits", json={"input": [{"prompt": "a"}], "reports": ["rhythm", "bogus"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_report", r.text
    assert "rhythm" in r.json()["error"]["message"]


def hand_made() -> dict:
    ci = {"observed": [0.3, 0.5], "baseline": [0.2, 0.3], "lift": [0.1, 0.9]}
    return {
        "n": 2,
        "A": {"observed": 0.4, "baseline": 0.25, "lift": 0.6, "ci95": ci},
        "B": {"observed": 0.5, "baseline": None, "lift": None, "ci95": {"observed": [None, None]}},
        "C": {"jaccard_high": None, "jaccard_low": None, "share_high_diverges_more": None, "trials": 0,
              "ci95": {}},
        "B_grid": [{"q_peak": q, "k": k, "observed": 0.5, "baseline": 0.4, "lift": 0.25}
                   for q in (0.1, 0.2, 0.4) for k in (0, 1, 3)],
        "per_problem": [],
        "examples": [{"index": 7, "tokens": ["<script>", "alert(1)", "</script>", " & x"],
                      "waad_peaks": [0, 2], "fai_peaks": [2, 3]}],
    }  # fmt: skip


def test_rhythm_section_from_a_hand_made_report():
    page = render_report("a<1>", None, [], ui_dir=UI_DIR, rhythm=hand_made())
    section = page[page.index('id="rhythm"') : page.index('id="rows"')]
    # [PA]'s figures beside ours, lifts as percentages, undefined figures as a dash
    for figure in ("0.3608", "0.2386", "+51.97%", "0.5253", "+42.47%", "0.534", "0.631", "0.8714"):
        assert figure in section
    assert "+60.00%" in section and "[+10.00%, +90.00%]" in section and "[0.3, 0.5]" in section
    assert section.count("<tr>") == 2 + 9 + 9  # two heads; 3 figures × A, B, C; the 3 × 3 grid
    # tokens escaped, each peak kind marked apart, both on one token
    assert "<script>alert" not in page and page.lower().count("</script") == 3
    spans = re.findall(r'<span class="([^"]+)"[^>]*>([^<]*)</span>', section)
    assert ("waad-peak", "&lt;script&gt;") in spans
    assert ("waad-peak fai-peak", "&lt;/script&gt;") in spans
    assert ("fai-peak", " &amp; x") in spans
    assert "<span>alert(1)</span>" in section
    assert "a&lt;1&gt;" in page and 'id="headline"' not in page
    assert not re.search(r"https?://", section)


def test_the_rhythm_study_counts_against_the_row_cost_limit(stack):
    """A completion whose analysis fits FAITHLENS_MAX_AUDIT_ROW_COST (20,000 here) but whose analysis
    plus rhythm study does not: refused up front with the rhythm report, accepted without it."""
    from faithlens import cost

    row = {"prompt": "Go.", "completion": "b" * 2500}  # byte tokens: about 2,500 of them
    n = 2504
    assert (
        cost.analysis_cost([" x"] * n, 4, None) < 20000 < cost.analysis_cost([" x"] * n, 4, None, rhythm=True)
    )
    with stack.client() as c:
        refused = c.post("/v1/audits", json={"input": [row], "reports": ["summary", "rhythm"]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "analysis_too_costly"
        accepted = c.post("/v1/audits", json={"input": [row], "reports": ["summary"]})
        assert accepted.status_code == 200, accepted.text
        c.post(f"/v1/audits/{accepted.json()['id']}/cancel")
