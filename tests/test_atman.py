"""AtMan (spec §7) against a naive unbatched reference, planted facts, gradient mode and AtManRL (§8)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from faithlens.answer import CharSpan, char_span_to_tokens
from faithlens.atman import (
    CPU_RECOMPUTE_SLACK,
    GPU_FILL_TOKENS,
    GPU_RECOMPUTE_SLACK,
    MAX_ROWS,
    BatchPlan,
    _gradient,
    atman_rl_saliency,
    batch_plan,
    bias_rows,
    plan_batches,
    suppression_groups,
)
from faithlens.model import LoadedModel, unwrap
from faithlens.params import ComputeOptions, SaliencyParams
from faithlens.saliency import compute_saliency, resolve_target
from tests.devices import tiny


def naive_target_logprob(lm, input_ids, target, column_bias: torch.Tensor | None) -> float:
    """One eager pass with a 4D float mask: causal, plus ``column_bias`` added to every row."""
    model = unwrap(lm.model)
    n = len(input_ids)
    mask = torch.full((n, n), torch.finfo(torch.float32).min, device=lm.device).triu(1)
    if column_bias is not None:
        mask = mask + column_bias.to(lm.device)[None, :]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            logits = model(
                torch.tensor([input_ids], device=lm.device), attention_mask=mask[None, None], use_cache=False
            ).logits[0]
    finally:
        model.set_attn_implementation(previous)
    logp = torch.log_softmax(logits.float(), -1)
    return float(sum(logp[t - 1, input_ids[t]] for t in target))


def naive_saliency(lm, input_ids, target, rows) -> torch.Tensor:
    base = naive_target_logprob(lm, input_ids, target, None)
    return torch.tensor([base - naive_target_logprob(lm, input_ids, target, row) for row in rows])


def _ids(n, seed=0):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("params", "compute"),
    [
        (SaliencyParams(target=[44, 45, 46]), ComputeOptions()),  # the device's own batch plan
        (SaliencyParams(target=[44, 45, 46]), ComputeOptions(recompute_slack=math.inf)),  # widest batches
        (SaliencyParams(target=[44, 45, 46]), ComputeOptions(prefix_reuse=False)),
        (SaliencyParams(target=[44, 45, 46]), ComputeOptions(atman_memory_mb=0)),  # batches of one
        (SaliencyParams(target=[30, 46], factor=3.0), ComputeOptions()),  # amplification, scattered targets
        (SaliencyParams(target=[44, 45, 46], conceptual_threshold=0.1), ComputeOptions()),
    ],
    ids=["default_plan", "batched", "no_prefix_reuse", "batch_of_one", "amplify", "conceptual"],
)
def test_exact_batched_equals_naive_loop(tiny_lm, params, compute):
    ids = _ids(47)
    got = compute_saliency(tiny_lm, ids, 20, params, compute)
    rows = bias_rows(tiny_lm, ids, got.groups, params.factor, params.conceptual_threshold)
    expected = naive_saliency(tiny_lm, ids, got.target, rows)
    flat = torch.tensor([float(got.scores[g[0]]) for g in got.groups])
    torch.testing.assert_close(flat, expected, atol=1e-4, rtol=0)
    assert torch.isnan(got.scores[got.target]).all()


def bf16_copy(lm: LoadedModel) -> LoadedModel:
    """The same weights in bfloat16 (buffers such as RoPE's frequencies stay float32)."""
    copy = tiny(lm.name.removeprefix("tiny-"))
    for parameter in copy.model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return replace(copy, dtype=torch.bfloat16)


def test_bf16_scores_follow_float32_whatever_the_batch_plan(tiny_lm):
    """Below float32 the target head runs in float32 and each batch carries a reference row: every plan
    gives the same scores (bit-equal on a CPU), and they stay close to the float32 loop."""
    lm16 = bf16_copy(tiny_lm)
    ids, params = _ids(47), SaliencyParams(target=[44, 45, 46])
    plans = [ComputeOptions(), ComputeOptions(recompute_slack=math.inf), ComputeOptions(prefix_reuse=False)]
    plans.append(ComputeOptions(atman_memory_mb=0))
    found = [compute_saliency(lm16, ids, 20, params, compute) for compute in plans]
    scores = [torch.tensor([float(f.scores[g[0]]) for g in f.groups]) for f in found]
    rows = bias_rows(tiny_lm, ids, found[0].groups, params.factor, params.conceptual_threshold)
    expected = naive_saliency(tiny_lm, ids, found[0].target, rows)
    scale = float(expected.abs().max())
    for got in scores:
        torch.testing.assert_close(got, scores[0], atol=0.02 * scale, rtol=0)
        assert float((got - expected).abs().max()) <= 0.1 * scale  # measured: 3–5 % on the tiny models


def test_batch_plan_bounds_size_recomputation_and_fill():
    first = [0, 1, 2, 3, 10, 11, 50, 90]
    order = list(range(len(first)))
    assert plan_batches(first, 100, BatchPlan(64, math.inf, 0, True)) == [order]
    assert plan_batches(first, 100, BatchPlan(3, math.inf, 0, True)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # slack 0.1: rows within 10 % of the batch's remaining span (100 − start) share it
    assert plan_batches(first, 100, BatchPlan(64, 0.1, 0, True)) == [[0, 1, 2, 3, 4], [5], [6], [7]]
    assert plan_batches(first, 100, BatchPlan(64, 0.0, 0, True)) == [[g] for g in order]
    # fill: a batch of fewer than 150 tokens takes rows regardless of slack (the rows ≥ 50: spans of 50)
    assert plan_batches(first, 100, BatchPlan(64, 0.0, 150, True)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # without prefix reuse every row starts at 0: no recomputation, so only the size bounds a batch
    assert plan_batches(first, 100, BatchPlan(3, 0.0, 0, False)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    unsorted = [50, 0, 90, 1]
    assert plan_batches(unsorted, 100, BatchPlan(2, math.inf, 0, True)) == [[1, 3], [0, 2]]


def test_the_batch_plan_follows_the_device_and_memory(tiny_llama):
    own = batch_plan(tiny_llama, 100, ComputeOptions())
    if tiny_llama.device.type == "cpu":
        assert own.slack == CPU_RECOMPUTE_SLACK and own.fill_tokens == 0 and own.rows > 1
    else:  # a GPU's batches are bounded by its free memory and filled to a GEMM's width
        assert (
            own.slack == GPU_RECOMPUTE_SLACK and own.fill_tokens == GPU_FILL_TOKENS and own.rows == MAX_ROWS
        )
    assert batch_plan(tiny_llama, 100, ComputeOptions(atman_memory_mb=0)).rows == 1
    small = batch_plan(tiny_llama, 1000, ComputeOptions(atman_memory_mb=32)).rows
    assert 1 <= small < batch_plan(tiny_llama, 1000, ComputeOptions(atman_memory_mb=512)).rows


def test_word_and_sentence_groups_are_suppressed_together(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt = tok("Cats sleep a lot. Dogs bark!\nBirds sing")["input_ids"]
    ids = prompt + tok(" so", add_special_tokens=False)["input_ids"]
    for granularity in ("word", "sentence"):
        params = SaliencyParams(granularity=granularity, target=[len(ids) - 1])
        got = compute_saliency(tiny_llama, ids, len(prompt), params)
        rows = bias_rows(tiny_llama, ids, got.groups, 0.1, None)
        expected = naive_saliency(tiny_llama, ids, got.target, rows)
        for group, value in zip(got.groups, expected, strict=True):
            assert torch.allclose(got.scores[group], value.float(), atol=1e-4)


def test_suppression_groups():
    texts = ["The", " cat", "'s", " toy", ".", " It", " is", " red", "\n", "Ok"]
    positions = list(range(10))
    # Every token here starts with a space or punctuation, or follows a non-alphanumeric one.
    assert suppression_groups(texts, positions, "word") == [[i] for i in range(10)]
    words = suppression_groups(["The", " c", "at", " sat", ".", " R", "un"], list(range(7)), "word")
    assert words == [[0], [1, 2], [3], [4], [5, 6]]
    sentences = suppression_groups(texts, positions, "sentence")
    assert sentences == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert suppression_groups(texts, [0, 1, 5, 6], "sentence") == [[0, 1], [5, 6]]  # gaps split groups


def test_target_resolution():
    texts = ["<s>", "Q", ":", " 2", "+", "2", " =", " 4", ".", " ####", " 4"]
    assert resolve_target(texts, 3, "answer") == [10]
    assert resolve_target(texts, 3, "response") == list(range(3, 11))
    assert resolve_target(["a", " b", " c"], 1, "answer") == [1, 2]  # no answer: the whole response
    assert resolve_target(texts, 3, [7, 5]) == [5, 7]
    with pytest.raises(ValueError):
        resolve_target(texts, 3, [0])


def test_postprocessing(tiny_llama):
    ids = _ids(30, 3)
    raw = compute_saliency(tiny_llama, ids, 10, SaliencyParams(target=[29]))
    sq = compute_saliency(
        tiny_llama, ids, 10, SaliencyParams(target=[29], postprocess="square", normalize=True)
    )
    scored = ~torch.isnan(raw.scores)
    expected = raw.scores[scored].square()
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    torch.testing.assert_close(sq.scores[scored], expected)
    assert math.isclose(float(sq.scores[scored].max()), 1.0) and math.isclose(
        float(sq.scores[scored].min()), 0.0
    )


def test_gradient_matches_finite_differences(tiny_llama):
    ids = _ids(25, 4)
    target = [23, 24]
    grad, base = _gradient(tiny_llama, ids, target)
    eps = 1e-2
    for i in (0, 7, 15, 22):
        bump = torch.zeros(len(ids))
        bump[i] = eps
        plus = naive_target_logprob(tiny_llama, ids, target, bump)
        bump[i] = -eps
        minus = naive_target_logprob(tiny_llama, ids, target, bump)
        assert math.isclose(float(grad[i]), (plus - minus) / (2 * eps), rel_tol=2e-2, abs_tol=1e-4)
    assert math.isclose(base, naive_target_logprob(tiny_llama, ids, target, None), abs_tol=1e-4)


def test_atman_rl_lowers_nll_and_is_deterministic(tiny_llama):
    ids = _ids(40, 5)
    cot, answer = list(range(15, 36)), [36, 37, 38, 39]
    first = atman_rl_saliency(tiny_llama, ids, cot, answer, steps=8, lr=5e-2, seed=3)
    again = atman_rl_saliency(tiny_llama, ids, cot, answer, steps=8, lr=5e-2, seed=3)
    assert first.nll_final < first.nll_initial
    assert ((first.scores >= 0) & (first.scores <= 1)).all()
    assert torch.equal(first.scores, again.scores)
    assert math.isclose(first.r_faith, float(first.scores.mean()))
    assert (first.mask <= 0).all()


# ---------------------------------------------------------------- planted facts on SmolLM2

PLANTED = [
    (
        "The password is Zebra. I went to the market and bought bread, milk and eggs. The password is",
        " Zebra",
        "Zebra",
    ),
    (
        "Alice's favourite colour is teal. Bob likes football and his dog is called Max. Alice's favourite colour is",
        " teal",
        "teal",
    ),
    (
        "Note: the meeting room is Neptune. Lunch is at noon and the coffee machine is broken. The meeting room is",
        " Neptune",
        "Neptune",
    ),
]


def first_mention(texts: list[str], fact: str) -> list[int]:
    """Token positions covering the first occurrence of ``fact`` in the joined token texts."""
    joined = "".join(texts)
    at = joined.index(fact)
    span = char_span_to_tokens(texts, CharSpan(at, at + len(fact), fact))
    return list(range(*span))


@pytest.mark.smollm
@pytest.mark.parametrize(("prompt", "completion", "fact"), PLANTED, ids=["zebra", "teal", "neptune"])
def test_planted_fact_ranks_first(smollm, prompt, completion, fact):
    """Exact AtMan ranks the first mention of the fact first. (atman_grad, a first-order estimate, does
    not always: on "Neptune" it ranks " room" first; bench/atman.py reports its agreement.)"""
    prompt_ids = smollm.prompt_ids(prompt)
    ids = prompt_ids + smollm.completion_ids(completion)
    target = list(range(len(prompt_ids), len(ids)))
    got = compute_saliency(smollm, ids, len(prompt_ids), SaliencyParams(target=target))
    texts = smollm.token_texts(ids)
    fact_tokens = first_mention(texts, fact)
    ranked = torch.nan_to_num(got.scores, nan=-math.inf).argsort(descending=True).tolist()
    assert ranked[0] in fact_tokens, f"top {[texts[i] for i in ranked[:3]]}, fact {fact_tokens}"


@pytest.mark.smollm
def test_atman_rl_on_smollm(smollm):
    prompt = smollm.prompt_ids("What is 3 times 4?", chat=True)
    response = smollm.completion_ids("3 times 4 means adding 3 four times: 3+3+3+3 = 12. The answer is 12")
    ids = prompt + response
    got = compute_saliency(smollm, ids, len(prompt), SaliencyParams(method="atman_rl", rl_steps=10))
    assert got.extra["nll_final"] < got.extra["nll_initial"]
    cot = [g[0] for g in got.groups]
    assert all(0 <= float(got.scores[c]) <= 1 for c in cot)
    assert 0 <= got.extra["r_faith"] <= 1


def test_analysis_carries_saliency_and_the_faithfulness_summary(tiny_llama):
    from faithlens.analysis import analyze

    tok = tiny_llama.tokenizer
    prompt = tok("Q: what is 2+3?")["input_ids"]
    response = tok(" 2 plus 3 makes 5, so the answer is 5", add_special_tokens=False)["input_ids"]
    params = SaliencyParams(counterfactual_k=3)
    analysis = analyze(tiny_llama, prompt, response, saliency=params)
    s = analysis.summary
    target = s.saliency_target
    assert analysis.answer_span.text == "5" and target == list(
        range(analysis.answer_span.start, analysis.answer_span.end)
    )
    assert all(analysis.prompt_saliency[i] is not None for i in range(len(prompt)))
    by_index = {t.index: t for t in analysis.tokens}
    assert all(by_index[i].saliency is None for i in target)
    assert all(t.saliency is not None for t in analysis.tokens if t.index < min(target))
    assert math.isclose(s.reasoning_saliency_share + s.prompt_saliency_share, 1.0)
    reasoning = [t.saliency for t in analysis.tokens if t.index < min(target)]
    prompt_part = [abs(x) for x in analysis.prompt_saliency]
    assert math.isclose(
        s.reasoning_saliency_share,
        sum(map(abs, reasoning)) / (sum(map(abs, reasoning)) + sum(prompt_part)),
        rel_tol=1e-6,
    )
    assert s.spearman_fai_saliency is None or -1 <= s.spearman_fai_saliency <= 1
    cf = s.counterfactual
    assert cf.k == 3 and math.isclose(cf.base_logprob, s.target_logprob, abs_tol=1e-4)
    top3 = sorted((t for t in analysis.tokens if t.index < min(target)), key=lambda t: -t.saliency)[:3]
    assert cf.top_k_positions == sorted(t.index for t in top3)
    assert analysis.timings["saliency"] > 0


def test_target_logprob_is_the_same_sum_for_every_method(tiny_llama):
    """``target_logprob`` (Saliency.base_logprob) is Σ log p(target) of the unperturbed sequence, whatever
    the method: atman_rl's loss is a mean over the target, but what it reports is the sum."""
    ids = _ids(40, 7)
    target = [36, 37, 38, 39]
    expected = naive_target_logprob(tiny_llama, ids, target, None)
    for method in ("atman", "atman_grad", "atman_rl"):
        got = compute_saliency(tiny_llama, ids, 10, SaliencyParams(method=method, target=target, rl_steps=1))
        assert math.isclose(got.base_logprob, expected, abs_tol=1e-3), (method, got.base_logprob, expected)
