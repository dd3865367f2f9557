"""One decode path: ``generate``, a shared DecodeBatch, the developer CLI and ``training.eval`` give the
same tokens for the same prompt, seed and sampling params; stop strings, min_new_tokens and incremental
detokenisation. The static cache and the step itself: tests/test_static_decode.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from faithlens.batching import (
    BASE_ADAPTER,
    DecodeBatch,
    Detokenizer,
    SequenceState,
    visible_text,
)
from faithlens.data import Problem
from faithlens.generation import generate
from faithlens.model import load_model
from faithlens.params import SamplingParams
from faithlens.tiny import save_tiny
from tests.devices import tiny
from training.eval import answers

CASES = {
    "greedy": dict(max_new_tokens=24),
    "seeded": dict(max_new_tokens=24, temperature=0.8, seed=7),
}
NUCLEUS = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("decode") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The tiny model the CLI subprocess loads, loaded in this process."""
    return load_model(tiny_dir, device="cpu", dtype="float32")


def decoded(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True)


def run(batch: DecodeBatch, steps: int | None = None) -> None:
    while len(batch) and (steps is None or steps > 0):
        batch.step()
        steps = None if steps is None else steps - 1


# -- (a) generate == (b) a shared batch ----------------------------------------------------------------
@pytest.mark.parametrize("case", [*CASES, "nucleus"])
@pytest.mark.parametrize("join_after", [0, 3])
def test_a_request_decodes_the_same_alone_and_in_a_shared_batch(tiny_lm, case, join_after):
    params = SamplingParams(**CASES.get(case, NUCLEUS))
    prompt = tiny_lm.prompt_ids("The same prompt, whatever else runs.", chat=True)
    ref = generate(tiny_lm, prompt, params)
    assert ref.token_ids and ref.text == decoded(tiny_lm, ref.token_ids)

    batch = DecodeBatch(tiny_lm, slots=8, max_context=512)
    short = SequenceState(tiny_lm.prompt_ids("hi"), SamplingParams(max_new_tokens=40))
    long = SequenceState(
        tiny_lm.prompt_ids("a much longer prompt " * 4, chat=True),
        SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=8),
    )
    brief = SequenceState(tiny_lm.prompt_ids("x"), SamplingParams(max_new_tokens=3))  # leaves early
    cancelled = SequenceState(tiny_lm.prompt_ids("yz" * 9), SamplingParams(max_new_tokens=40))
    target = SequenceState(prompt, params)
    batch.add(short)
    batch.add(cancelled)
    run(batch, join_after)
    batch.add(target)
    batch.add(brief)
    run(batch, 2)
    batch.add(long)
    run(batch, 4)
    assert batch.remove([batch.rows.index(cancelled)]) == [cancelled]
    run(batch)
    assert brief.finish_reason == "length" and len(brief.token_ids) == 3
    assert target.token_ids == ref.token_ids
    assert target.text == ref.text and target.finish_reason == ref.finish_reason
    torch.testing.assert_close(torch.tensor(target.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    for seq in (short, long, brief, target):
        assert seq.text == decoded(tiny_lm, seq.token_ids)


def test_seeds_and_samplers_matter(tiny_llama):
    """Guards the test above against passing vacuously: seeds, temperature and greedy all differ."""
    prompt = tiny_llama.prompt_ids("seed", chat=True)
    seeded = generate(tiny_llama, prompt, SamplingParams(**CASES["seeded"]))
    assert seeded.token_ids == generate(tiny_llama, prompt, SamplingParams(**CASES["seeded"])).token_ids
    other_seed = generate(tiny_llama, prompt, SamplingParams(**{**CASES["seeded"], "seed": 8}))
    greedy = generate(tiny_llama, prompt, SamplingParams(**CASES["greedy"]))
    assert seeded.token_ids != other_seed.token_ids
    assert seeded.token_ids != greedy.token_ids


def test_greedy_matches_hf_generate(tiny_lm):
    """The batch's forward passes (static slotted cache, 4D mask from positions) compute what HF's own loop does."""
    prompt = tiny_lm.prompt_ids("Compare with transformers.", chat=True)
    ours = generate(tiny_lm, prompt, SamplingParams(max_new_tokens=32, min_new_tokens=32))
    ids = torch.tensor([prompt], device=tiny_lm.device)
    hf = tiny_lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=sorted(tiny_lm.eos_token_ids),
    )
    assert ours.token_ids == hf[0, len(prompt) :].tolist()


# -- (c) the developer CLI -------------------------------------------------------------------------------
def run_cli(*args: str) -> dict:
    env = {**os.environ, "FAITHLENS_DEVICE": "cpu", "FAITHLENS_DTYPE": "float32"}
    out = subprocess.run(
        [sys.executable, "-m", "faithlens", "generate", *args, "--json", "--H-hi", "none"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def cli_flags(params: SamplingParams) -> list[str]:
    flags = ["--max-new-tokens", str(params.max_new_tokens), "--temperature", str(params.temperature)]
    flags += ["--min-new-tokens", str(params.min_new_tokens)]
    flags += [] if params.seed is None else ["--seed", str(params.seed)]
    for stop in params.stop:
        flags.append(f"--stop={stop}")
    return flags


@pytest.mark.parametrize("case", CASES)
def test_cli_generates_the_same_tokens(tiny_dir, local, case):
    prompt = "What does the CLI say?"
    params = SamplingParams(**CASES[case], min_new_tokens=4)
    ref = generate(local, local.prompt_ids(prompt), params)
    if case == "seeded":  # and a stop string, cut where the in-process decode cuts
        params.stop = [stop_within(ref.text)]
        ref = generate(local, local.prompt_ids(prompt), params)
        assert ref.finish_reason == "stop"
    data = run_cli("--model", str(tiny_dir), "--prompt", prompt, *cli_flags(params))
    assert [t["id"] for t in data["tokens"]] == ref.token_ids
    assert data["text"] == ref.text and data["finish_reason"] == ref.finish_reason


# -- (d) training.eval -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_eval_answers_decode_the_same_tokens(tiny_llama, case):
    params = SamplingParams(**CASES[case])
    problems = [Problem("What is 2+2?", "4"), Problem("Name a colour, then a much longer thing.", "red")]
    seqs = answers(tiny_llama, problems, BASE_ADAPTER, params.max_new_tokens, params)
    for seq, problem in zip(seqs, problems, strict=True):
        ref = generate(tiny_llama, tiny_llama.prompt_ids(problem.question, chat=True), params)
        assert seq.token_ids == ref.token_ids and seq.text == ref.text


# -- stop strings and min_new_tokens ----------------------------------------------------------------------
def stop_within(text: str) -> str:
    """Two characters (else one) from the middle of ``text``, not U+FFFD, as a stop string."""
    for size in (2, 1):
        for i in range(len(text) // 3, len(text) - size + 1):
            if "\ufffd" not in text[i : i + size]:
                return text[i : i + size]
    raise AssertionError(f"no stop string in {text!r}")


@pytest.mark.parametrize("case", CASES)
def test_stop_strings_cut_the_text_and_tokens(tiny_lm, case):
    prompt = tiny_lm.prompt_ids("Stop somewhere.", chat=True)
    full = generate(tiny_lm, prompt, SamplingParams(**{**CASES[case], "max_new_tokens": 60}))
    stop = stop_within(full.text)
    cut = generate(
        tiny_lm, prompt, SamplingParams(**{**CASES[case], "max_new_tokens": 60}, stop=[stop, "never"])
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert decoded(tiny_lm, cut.token_ids) == cut.text
    assert len(cut.logprobs) == len(cut.token_ids)


def test_a_stream_holds_back_a_possible_stop():
    seq = SequenceState([1], SamplingParams(stop=["END"]), text="abc EN")
    assert visible_text(seq) == "abc "
    seq.text = "abc \ufffd"
    assert visible_text(seq) == "abc "


@pytest.fixture
def eos_loving_llama():
    """A tiny model whose raw distribution puts EOS on top at every step."""
    lm = tiny("llama", seed=1)
    eos = sorted(lm.eos_token_ids)
    bias = torch.zeros(lm.model.config.vocab_size, device=lm.device)
    bias[eos] = 30.0
    handle = lm.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    yield lm
    handle.remove()


@pytest.mark.parametrize("case", CASES)
def test_min_new_tokens_masks_eos_but_logprobs_stay_raw(eos_loving_llama, case):
    lm = eos_loving_llama
    prompt = lm.prompt_ids("min tokens", chat=True)
    eos = sorted(lm.eos_token_ids)
    assert generate(lm, prompt, SamplingParams(**CASES[case])).token_ids == []
    params = SamplingParams(**CASES[case], min_new_tokens=5)
    gen = generate(lm, prompt, params, top_logprobs=2)
    assert len(gen.token_ids) == 5 and gen.finish_reason == "stop"
    # The raw distribution still prefers EOS: reported log-probs are the model's, before the mask.
    assert all(top[0][0] in eos for top in gen.top_logprobs)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + gen.token_ids], device=lm.device)).logits[
            0, len(prompt) - 1 : -1
        ]
    raw = torch.log_softmax(logits.float(), -1)[torch.arange(5), gen.token_ids].cpu()
    torch.testing.assert_close(torch.tensor(gen.logprobs), raw, atol=1e-4, rtol=0)
    if case == "greedy":  # the same tokens as HF's MinNewTokensLogitsProcessor
        ids = torch.tensor([prompt], device=lm.device)
        hf = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
        assert hf[0, len(prompt) :].tolist() == [*gen.token_ids, eos[0]]


# -- incremental detokenisation -------------------------------------------------------------------------
def check_incremental(tokenizer, ids: list[int], every: int = 1) -> None:
    detok = Detokenizer(tokenizer)
    for n in range(1, len(ids) + 1):
        text = detok.text(ids[:n])
        if n % every == 0 or n == len(ids):
            assert text == tokenizer.decode(ids[:n], skip_special_tokens=True), n


def test_incremental_text_equals_decode_on_random_bytes(tiny_llama):
    rng = random.Random(0)
    tokenizer = tiny_llama.tokenizer
    byte_id = {b: tokenizer.convert_tokens_to_ids(c) for b, c in enumerate(byte_alphabet())}
    # Random bytes (mostly invalid UTF-8), with a few special tokens in between.
    noise = [rng.choice([0, 1, 2]) if rng.random() < 0.02 else rng.randrange(3, 259) for _ in range(3000)]
    check_incremental(tokenizer, noise, every=7)
    # Valid multi-byte text, interrupted by stray continuation and lead bytes.
    text = "".join(rng.choice("aé€𝄞東 \n🚀ß") for _ in range(800))
    utf8 = [byte_id[b] for b in text.encode()]
    for at in sorted(rng.sample(range(len(utf8)), 40), reverse=True):
        utf8.insert(at, byte_id[rng.choice([0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF])])
    check_incremental(tokenizer, utf8, every=3)


def byte_alphabet() -> list[str]:
    """The byte-level BPE character of each byte 0..255 (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.mark.smollm
def test_incremental_text_equals_decode_on_smollm(smollm):
    tokenizer = smollm.tokenizer
    text = (
        "Café déjà vu: naïve façades, 東京の夜 🚀🌕 and ½ + ¼ = ¾. Ünïcödé «quotes» — dashes… "
        "def f(x):\n    return x ** 2  # 平方\n" * 8
    )
    check_incremental(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    rng = random.Random(1)  # random ids split multi-byte characters across tokens
    check_incremental(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(2000)], every=5)
