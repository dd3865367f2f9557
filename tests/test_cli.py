"""The developer CLI, run as a real subprocess on a tiny HF directory and on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from faithlens.tiny import save_tiny

TOKEN_KEYS = {
    "index",
    "id",
    "text",
    "logprob",
    "fai",
    "waad",
    "preplan",
    "anchor",
    "dominated_anchor",
    "intro",
    "saliency",
}
ANALYSIS_KEYS = {
    "model",
    "adapter",
    "prompt_token_ids",
    "prompt_tokens",
    "tokens",
    "layers",
    "heads",
    "params",
    "answer_span",
    "summary",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faithlens", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


def test_analyze_json_follows_the_schema(tiny_dir):
    out = run_cli(
        "analyze",
        "--model",
        str(tiny_dir),
        "--prompt",
        "Q: 2+2?",
        "--completion",
        " 2+2 is 4. #### 4",
        "--json",
        "--H-hi",
        "none",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= ANALYSIS_KEYS
    assert set(data["tokens"][0]) == TOKEN_KEYS
    # Without --chat the ids are tokenizer(P) followed by tokenizer(C, add_special_tokens=False).
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert data["prompt_token_ids"] == tokenizer("Q: 2+2?")["input_ids"]
    completion = tokenizer(" 2+2 is 4. #### 4", add_special_tokens=False)["input_ids"]
    assert [t["id"] for t in data["tokens"]] == completion
    assert "".join(t["text"] for t in data["tokens"]) == " 2+2 is 4. #### 4"
    assert data["answer_span"]["text"] == "4"
    assert data["params"]["H_hi"] is None and data["params"]["W"] == 10
    assert set(data["heads"]) == {"local", "global"}
    assert data["tokens"][0]["index"] == len(data["prompt_token_ids"])


def test_analyze_table_is_readable(tiny_dir):
    out = run_cli("analyze", "--model", str(tiny_dir), "--prompt", "Q", "--completion", " the answer is 4")
    assert out.returncode == 0, out.stderr
    assert "FAI" in out.stdout and "WAAD" in out.stdout and "anchors=" in out.stdout


def test_bad_model_is_a_clear_error(tmp_path):
    out = run_cli("analyze", "--model", str(tmp_path / "missing"), "--prompt", "a", "--completion", "b")
    assert out.returncode != 0
    assert "expected an HF model directory" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.smollm
def test_generate_on_the_embedded_model():
    out = run_cli("generate", "--prompt", "What is 3+4?", "--chat", "--max-new-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert 0 < len(data["tokens"]) <= 16
    assert data["layers"] == [10, 12, 15, 17, 20]
    assert len(data["heads"]["local"]) == len(data["heads"]["global"]) == int(0.3 * 45)


def test_analyze_with_saliency(tiny_dir):
    out = run_cli(
        "analyze",
        "--model",
        str(tiny_dir),
        "--prompt",
        "Q: 2+2?",
        "--completion",
        " so #### 4",
        "--saliency",
        "atman",
        "--granularity",
        "word",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["summary"]["saliency_method"] == "atman"
    assert data["summary"]["counterfactual"]["k"] >= 1
    assert all(x is not None for x in data["prompt_saliency"])
    table = run_cli(
        "analyze",
        "--model",
        str(tiny_dir),
        "--prompt",
        "Q",
        "--completion",
        " so #### 4",
        "--saliency",
        "atman_grad",
    )
    assert table.returncode == 0, table.stderr
    assert "saliency=atman_grad" in table.stdout
