"""The credit study (spec §12, issue 34): synthetic tasks as data sets, held-out evaluation inside jobs,
and ``faithlens study credit`` against a real server and real worker processes, killed mid-grid."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faithlens_client.study import (
    CreditGrid,
    RunResult,
    paired_bootstrap,
    render_report_html,
    report,
)

from faithlens.arith import task_splits
from faithlens.data import UnknownDataset, check_dataset, load_dataset
from tests.servers import REPO
from tests.test_jobs import TINY_JOB, Worker, job_stack

FAITHLENS_CLI = Path(sys.executable).parent / "faithlens"


# -- the data sets -----------------------------------------------------------------------------------------
def test_task_splits_are_disjoint_fixed_by_name_and_seed():
    a = task_splits("arith-add:1-50")
    assert len(a["heldout"]) == 625 and len(a["train"]) == 2500 - 625
    assert not {p.question for p in a["heldout"]} & {p.question for p in a["train"]}
    task_splits.cache_clear()
    assert task_splits("arith-add:1-50") == a  # regenerated, the same problems in the same order
    other = task_splits("arith-add:1-50@1")
    assert other["heldout"] != a["heldout"]
    assert {p.question for p in other["heldout"]} | {p.question for p in other["train"]} == {
        p.question for p in a["heldout"] + a["train"]
    }
    two = task_splits("arith-two-step:1-20")
    assert len(two["heldout"]) == 1000
    for p in two["train"][:50]:
        a_, b_, c_ = map(int, p.question.removeprefix("What is ").rstrip("?").replace("+", "-").split(" - "))
        assert p.answer.endswith(f"#### {a_ + b_ - c_}") and a_ + b_ - c_ >= 0


@pytest.mark.parametrize(
    "name",
    [
        "arith-add:1-15",
        "arith-add:1-15/dev",
        "arith-sub:1-9/train",
        "arith-add:9-1/train",
        "arith-add:1-999/train",
        "../etc/passwd",
        "gsm8k-test",
        "arith-add:1-1/train",
    ],
)
def test_unknown_data_set_names_are_refused(name):
    with pytest.raises(UnknownDataset):
        check_dataset(name)


def test_a_task_split_loads_as_problems_the_gsm8k_reward_scores():
    from faithlens.answer import gsm8k_correct

    problems = load_dataset("arith-mul:2-12/heldout", limit=5)
    assert len(problems) == 5
    assert all(gsm8k_correct(p.answer, p.answer) for p in problems)


# -- the statistics ----------------------------------------------------------------------------------------
def naive_paired_bootstrap(diffs, seed, resamples=1000):
    """The same resampling written out plainly, with the interval from sorted means by index."""
    rng = random.Random(seed)
    n_s, n_p = len(diffs), len(diffs[0])
    means = []
    for _ in range(resamples):
        seeds = [rng.randrange(n_s) for _ in range(n_s)]
        probs = [rng.randrange(n_p) for _ in range(n_p)]
        means.append(sum(diffs[s][i] for s in seeds for i in probs) / (n_s * n_p))
    means.sort()
    return means


def test_paired_bootstrap_matches_a_naive_resampling_and_covers_the_mean():
    rng = random.Random(4)
    diffs = [[rng.choice([-1, 0, 0, 1, 1]) for _ in range(60)] for _ in range(3)]
    mean, low, high = paired_bootstrap(diffs, seed=7)
    assert mean == pytest.approx(sum(map(sum, diffs)) / 180)
    means = naive_paired_bootstrap(diffs, seed=7)
    assert low == pytest.approx(means[24] + (means[25] - means[24]) * 0.975)
    assert low < mean < high
    assert paired_bootstrap([[1] * 10, [1] * 10]) == (1.0, 1.0, 1.0)
    assert paired_bootstrap(diffs, seed=7) == (mean, low, high)  # seeded


def _run(arm, seed, bits_by_step, status="succeeded"):
    evals = {
        str(step): {
            "step": step,
            "eval_accuracy": bits.count("1") / len(bits),
            "eval_problems": len(bits),
            "eval_correct": bits,
        }
        for step, bits in bits_by_step.items()
    }
    steps = [
        {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.0, "flagged_share": 0.0, "gamma_mean": 1.0}
        for s in (1, 2)
    ]
    return RunResult(arm, seed, f"ftjob-{arm}{seed}", status, None, steps, evals, 1.0)


def test_the_report_pairs_arms_by_seed_and_problem_and_lists_failed_runs():
    grid = CreditGrid("arith-add:1-15", ["none", "coupled"], [0, 1], max_steps=2, eval_steps=2)
    results = [
        _run("none", 0, {0: "0000", 2: "0011"}),
        _run("coupled", 0, {0: "0000", 2: "0111"}),
        _run("none", 1, {0: "0000", 2: "0001"}),
        _run("coupled", 1, {}, status="failed"),
    ]
    rep = report(grid, results)
    row = next(r for r in rep["accuracy"] if r["arm"] == "coupled" and r["step"] == 2)
    assert row["paired_seeds"] == 1 and row["diff"] == pytest.approx(0.25)  # seed 1 failed: not paired
    none2 = next(r for r in rep["accuracy"] if r["arm"] == "none" and r["step"] == 2)
    assert none2["accuracy"] == pytest.approx((0.5 + 0.25) / 2) and none2["seeds"] == 2
    assert rep["runs"]["not_succeeded"] == [
        {"arm": "coupled", "seed": 1, "job_id": "ftjob-coupled1", "status": "failed", "error": None}
    ]
    page = render_report_html(rep)
    assert "coupled seed 1: failed" in page and "<svg" in page and "</script>" in page


# -- in jobs and through the CLI, on real processes --------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with job_stack(tmp_path_factory.mktemp("study"), "faithlens-study-test") as parts:
        yield parts


def test_capabilities_list_the_data_sets(stack):
    server, *_ = stack
    with server.client() as c:
        datasets = c.get("/v1/capabilities").json()["datasets"]
    names = [d["name"] for d in datasets]
    assert "gsm8k-train" in names and any(n.startswith("arith-add:") for n in names)
    for d in datasets:  # every example is a name the server takes
        check_dataset(d["example"])


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"training_data": "arith-add:1-15"}, "unknown_dataset", "training_data"),
        ({"training_data": "arith-nope:1-9/train"}, "unknown_dataset", "training_data"),
        (
            {"validation_data": "arith-add:1-15/dev", "method": {"type": "grpo", "eval_steps": 1}},
            "unknown_dataset",
            "validation_data",
        ),
        ({"validation_data": "arith-add:1-15/heldout"}, "invalid_request", "method.eval_steps"),
        ({"method": {"type": "grpo", "eval_steps": 1}}, "invalid_request", "validation_data"),
    ],
)
def test_jobs_refuse_bad_data_set_names_and_half_an_evaluation(stack, body, code, param):
    server, *_ = stack
    request = {
        "method": {"type": "grpo"},
        "training_data": "arith-add:1-15/train",
        "adapter_name": "x",
        **body,
    }
    with server.client() as c:
        r = c.post("/v1/jobs", json=request)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


def test_an_audit_takes_a_task_split(stack):
    server, *_ = stack
    with server.client() as c:
        r = c.post("/v1/audits", json={"input": "arith-add:1-15/heldout", "limit": 2})
        assert r.status_code == 200, r.text
        assert r.json()["request_counts"]["total"] == 2
        bad = c.post("/v1/audits", json={"input": "arith-add:1-15/test"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_dataset"


def test_a_job_evaluates_its_validation_data_at_start_every_eval_steps_and_at_the_end(stack):
    server, *_ = stack
    body = {
        "method": {
            "type": "grpo",
            **TINY_JOB,
            "max_steps": 3,
            "eval_steps": 2,
            "eval_on_start": True,
            "eval_limit": 5,
        },
        "training_data": "arith-add:1-15/train",
        "validation_data": "arith-add:1-15/heldout",
        "adapter_name": "tiny-eval",
    }
    with server.client() as c:
        job = c.post("/v1/jobs", json=body).json()
        deadline = time.monotonic() + 240
        while (job := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in {"succeeded", "failed"}:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert job["status"] == "succeeded", job
        assert job["validation_data"] == "arith-add:1-15/heldout"
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    evals = [e["data"] for e in events if e["type"] == "metrics" and "eval_accuracy" in e["data"]]
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert (
            e["eval_problems"] == 5 and len(e["eval_correct"]) == 5 and set(e["eval_correct"]) <= {"0", "1"}
        )
        assert e["eval_accuracy"] == e["eval_correct"].count("1") / 5


def _study(server, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(FAITHLENS_CLI), "study", "credit", "--smoke", "--out", str(out), "--base-url", server.url],
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.timeout(600)
def test_study_credit_smoke_survives_a_killed_worker_and_a_killed_study(stack):
    """Kill the worker and the study once the first run has ended; the rerun keeps that run (same job, same
    file), follows the other run's job instead of submitting a new one, and writes the report."""
    server, env, worker, work = stack
    out, log = work / "credit-study", work / "study.log"
    first = _study(server, out, log)
    finished = out / "runs" / "none-seed0.json"
    deadline = time.monotonic() + 300
    while not finished.exists():
        assert first.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    worker.kill()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = finished.read_bytes()
    assert json.loads(kept)["status"] == "succeeded"
    restarted = Worker(env, work / "worker-2.log")
    try:
        rerun = _study(server, out, log)
        assert rerun.wait(timeout=300) == 0, log.read_text()
    finally:
        restarted.stop()
    text = log.read_text()
    assert "none-seed0: done earlier, skipped" in text
    assert "coupled-seed0: following ftjob-" in text or "coupled-seed0: done earlier" in text, text
    assert finished.read_bytes() == kept
    rep = json.loads((out / "report.json").read_text())
    assert rep["runs"] == {**rep["runs"], "planned": 2, "ended": 2, "succeeded": 2, "not_succeeded": []}
    steps = {(r["arm"], r["step"]) for r in rep["accuracy"]}
    assert steps == {(arm, s) for arm in ("none", "coupled") for s in (0, 1, 2)}
    coupled = next(r for r in rep["accuracy"] if r["arm"] == "coupled" and r["step"] == 2)
    assert coupled["paired_seeds"] == 1 and coupled["diff_low"] <= coupled["diff"] <= coupled["diff_high"]
    assert {(c["arm"], c["step"]) for c in rep["curves"]} == {
        (a, s) for a in ("none", "coupled") for s in (1, 2)
    }
    assert "credit study" in (out / "report.html").read_text()
    with server.client() as c:
        jobs = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
    ours = [j for j in jobs if j["metadata"].get("study") == rep["study_id"]]
    assert len(ours) == 2  # nothing submitted twice
    # a third run only reports
    again = subprocess.run(
        [str(FAITHLENS_CLI), "study", "credit", "--smoke", "--out", str(out), "--base-url", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and again.stderr.count("done earlier, skipped") == 2, again.stderr


@pytest.mark.timeout(300)
def test_a_recorded_job_the_server_lost_is_submitted_again(stack, tmp_path):
    """Redis wiped under a study: the run's recorded job id is unknown now, so the run is submitted anew
    rather than followed forever or dropped."""
    from faithlens_client import Faithlens
    from faithlens_client.study import SMOKE_HYPERPARAMETERS, StudyFolder, run_grid

    server, env, _, work = stack
    grid = CreditGrid(
        "arith-add:1-15", ["none"], [5], max_steps=1, eval_steps=1, hyperparameters=SMOKE_HYPERPARAMETERS
    )
    folder = StudyFolder(tmp_path / "lost")
    folder.open(grid)
    folder.save_job_id("none", 5, "ftjob-" + "0" * 24)
    lines: list[str] = []
    worker = Worker(env, work / "worker-lost.log")  # its own: an earlier test killed the module's worker
    try:
        with Faithlens(base_url=server.url) as client:
            results = run_grid(client, folder, grid, poll_s=0.3, log=lines.append)
    finally:
        worker.stop()
    assert any("no longer knows ftjob-000" in line for line in lines), lines
    assert [(r.arm, r.seed, r.status) for r in results] == [("none", 5, "succeeded")]
    assert sorted(results[0].evals) == ["0", "1"]
