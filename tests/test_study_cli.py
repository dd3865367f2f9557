"""``python -m faithlens study rhythm`` as a real subprocess: on a tiny model (shape, offset, errors) and
on the embedded SmolLM2 over the first five GSM8K dev problems, whose per-problem counts must add up to
the pooled figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faithlens.data import gsm8k_path
from faithlens.tiny import save_tiny

FIGURES = {"observed", "baseline", "lift", "ci95"}


def run_study(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faithlens", "study", "rhythm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def check_adds_up(report: dict) -> None:
    """Every pooled figure is the ratio of the per-problem counts summed."""
    rows = report["per_problem"]
    a = np.sum(
        [[r["A"][k] for k in ("entropy_sum_at_peaks", "waad_peaks", "entropy_sum", "tokens")] for r in rows],
        0,
    )
    b = np.sum(
        [
            [r["B"][k] for k in ("followed", "fai_peaks", "shuffled_followed", "shuffled_fai_peaks")]
            for r in rows
        ],
        0,
    )
    for name, sums in (("A", a), ("B", b)):
        observed, baseline = ratio(sums[0], sums[1]), ratio(sums[2], sums[3])
        assert report[name]["observed"] == pytest.approx(observed)
        assert report[name]["baseline"] == pytest.approx(baseline)
        if observed is not None and baseline:
            assert report[name]["lift"] == pytest.approx(observed / baseline - 1)
    trials = [t for r in rows for t in r["C"]["trials"]]
    assert report["C"]["trials"] == len(trials)
    if trials:
        assert report["C"]["jaccard_high"] == pytest.approx(np.mean([t["jaccard_high"] for t in trials]))
        assert report["C"]["jaccard_low"] == pytest.approx(np.mean([t["jaccard_low"] for t in trials]))
        share = np.mean([t["jaccard_high"] < t["jaccard_low"] for t in trials])
        assert report["C"]["share_high_diverges_more"] == pytest.approx(share)
    for i, cell in enumerate(report["B_grid"]):
        sums = np.sum(
            [
                [
                    r["B_grid"][i][k]
                    for k in ("followed", "fai_peaks", "shuffled_followed", "shuffled_fai_peaks")
                ]
                for r in rows
            ],
            0,
        )
        assert (cell["q_peak"], cell["k"]) == (rows[0]["B_grid"][i]["q_peak"], rows[0]["B_grid"][i]["k"])
        assert cell["observed"] == pytest.approx(ratio(sums[0], sums[1]))
        assert cell["baseline"] == pytest.approx(ratio(sums[2], sums[3]))


def check_shape(report: dict, n: int) -> None:
    assert report["n"] == n == len(report["per_problem"])
    assert set(report["A"]) == set(report["B"]) == FIGURES
    assert set(report["C"]) == {"jaccard_high", "jaccard_low", "share_high_diverges_more", "trials", "ci95"}
    assert set(report["C"]["ci95"]) == {"jaccard_high", "jaccard_low", "share_high_diverges_more"}
    assert [(c["q_peak"], c["k"]) for c in report["B_grid"]] == [
        (q, k) for q in (0.1, 0.2, 0.4) for k in (0, 1, 3)
    ]
    for stat in ("A", "B"):
        for name in ("observed", "baseline", "lift"):
            low, high = report[stat]["ci95"][name]
            if report[stat][name] is not None and low is not None:
                assert low <= high


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [
        {"question": f"Sam has {i} cats and {i + 2} dogs. How many pets?", "answer": f"#### {2 * i + 2}"}
        for i in range(4)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_tiny_study_has_the_json_shape_and_honours_the_offset(tiny_dir, problems):
    out = run_study(
        "--input",
        str(problems),
        "--offset",
        "1",
        "--n",
        "2",
        "--max-new-tokens",
        "48",
        "--model",
        str(tiny_dir),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    check_shape(report, 2)
    assert [r["index"] for r in report["per_problem"]] == [1, 2]
    assert all(r["tokens"] <= 48 for r in report["per_problem"])
    check_adds_up(report)


def test_the_table_names_pa_figures(tiny_dir, problems):
    out = run_study("--input", str(problems), "--n", "1", "--max-new-tokens", "40", "--model", str(tiny_dir))
    assert out.returncode == 0, out.stderr
    assert "[PA]" in out.stdout and "0.3608" in out.stdout and "share_high_diverges_more" in out.stdout
    assert "sensitivity grid" in out.stdout


def test_bad_flags_and_input_fail_before_the_model_loads(tmp_path):
    """No model at all: the input's and the flags' errors still come first."""
    missing = run_study("--input", str(tmp_path / "nope.jsonl"), "--model", str(tmp_path / "no-model"))
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr and "No model" not in missing.stderr
    good = tmp_path / "ok.jsonl"
    good.write_text('{"question": "q", "answer": "#### 1"}\n')
    hot = run_study("--input", str(good), "--temperature", "5", "--model", str(tmp_path / "no-model"))
    assert hot.returncode != 0 and "temperature" in hot.stderr and "Traceback" not in hot.stderr
    late = run_study("--input", str(good), "--offset", "3", "--model", str(tmp_path / "no-model"))
    assert late.returncode != 0 and "no rows after offset 3" in late.stderr
    no_model = run_study("--input", str(good), "--model", str(tmp_path / "no-model"))
    assert no_model.returncode == 2 and "No model" in no_model.stderr


def test_bad_input_is_a_clear_error(tiny_dir, tmp_path):
    missing = run_study("--input", str(tmp_path / "nope.jsonl"), "--model", str(tiny_dir))
    assert missing.returncode != 0 and "error:" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    out = run_study("--input", str(bad), "--model", str(tiny_dir))
    assert out.returncode != 0 and "question, answer" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.smollm
def test_five_dev_problems_on_smollm_add_up():
    out = run_study("--input", str(gsm8k_path("dev")), "--n", "5", "--json", timeout=900)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["model"] == "SmolLM2-135M-Instruct"
    check_shape(report, 5)
    assert [r["index"] for r in report["per_problem"]] == [0, 1, 2, 3, 4]
    check_adds_up(report)
    assert report["C"]["trials"] > 0  # SmolLM2's responses are long enough for the perturbation trials
