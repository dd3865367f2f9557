"""End to end on the embedded SmolLM2: a GSM8K question, annotated, over the native and OpenAI APIs."""

from __future__ import annotations

import pytest
from openai import OpenAI

from faithlens.data import load_gsm8k
from tests.servers import start_server

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv-smol"), None)
    yield srv
    srv.stop()


def test_annotated_gsm8k_answer(smol_server):
    question = load_gsm8k("dev", limit=1)[0].question
    with smol_server.client(timeout=300) as c:
        out = c.post(
            "/v1/generate",
            json={
                "messages": [{"role": "user", "content": question}],
                "max_new_tokens": 96,
                "analysis": {"metrics": ["fai", "waad", "flags"]},
            },
        ).json()
    assert out["model"] == "SmolLM2-135M-Instruct"
    annotations = out["annotations"]
    assert len(annotations["tokens"]) == out["usage"]["completion_tokens"] > 10
    assert annotations["summary"]["num_anchors"] > 0 and annotations["summary"]["num_preplan"] > 0
    assert len(annotations["layers"]) == 5  # the spec's default: five layers from L/3 to 2L/3 of 30
    assert all(0 <= t["waad"] <= annotations["params"]["W"] for t in annotations["tokens"])


def test_openai_stream_on_smollm(smol_server):
    client = OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    full = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, temperature=0
    )
    assert "Paris" in full.choices[0].message.content
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == full.choices[0].message.content
    )
