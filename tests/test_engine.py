"""The engine in-process on tiny models: sliced analyses equal unsliced ones bit for bit while decode steps
run between their slices; stopping unwinds at once; the cost estimate follows the work really done."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from faithlens import cost
from faithlens.analysis import analyze
from faithlens.engine import (
    AnalysisRequest,
    AnalysisSpec,
    AnalysisTooCostly,
    Cancelled,
    EngineConfig,
    GenerationRequest,
    LocalEngine,
    Prompt,
)
from faithlens.model import unwrap
from faithlens.params import AnalysisParams, ComputeOptions, SaliencyParams, SamplingParams
from faithlens.slicing import SlicedRun, checkpoint, install_checkpoints

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many?\n"
COMPLETION = "He has 3. He buys 4. So 3 + 4 = 7. The answer is 7." * 2

SPECS = {
    "metrics": AnalysisSpec(AnalysisParams()),
    "atman": AnalysisSpec(AnalysisParams(), SaliencyParams(method="atman", granularity="word")),
    "atman_grad": AnalysisSpec(AnalysisParams(), SaliencyParams(method="atman_grad")),
    "atman_rl": AnalysisSpec(AnalysisParams(), SaliencyParams(method="atman_rl", rl_steps=5)),
}


def _without_timings(analysis) -> dict:
    data = analysis.to_json_dict()
    data.pop("timings", None)
    return data


@pytest.mark.parametrize("method", list(SPECS))
def test_sliced_analysis_equals_unsliced_bit_for_bit(tiny_lm, method):
    """Tiny slices (a yield at every checkpoint) with decode steps of other requests in between."""
    spec = SPECS[method]
    prompt_ids = tiny_lm.prompt_ids(PROMPT)
    response_ids = tiny_lm.completion_ids(COMPLETION)
    direct = analyze(tiny_lm, prompt_ids, response_ids, spec.params, saliency=spec.saliency)

    async def run():
        engine = LocalEngine(tiny_lm, EngineConfig(analysis_share=1e-9, analysis_idle_slice_s=0.0))
        await engine.start()
        try:
            streams = [
                _drain(
                    engine.generate(
                        GenerationRequest(Prompt(f"stream {i}"), SamplingParams(max_new_tokens=40))
                    )
                )
                for i in range(3)
            ]
            analysis = engine.analyze(AnalysisRequest(Prompt(PROMPT), COMPLETION, spec))
            results = await asyncio.gather(analysis, *streams)
            return results[0]
        finally:
            await engine.stop()

    output = asyncio.run(run())
    assert output.token_ids == response_ids
    assert _without_timings(output.analysis) == _without_timings(direct)


async def _drain(outputs) -> list:
    return [o async for o in outputs]


def test_slices_interleave_and_stop_unwinds(tiny_llama):
    """A run yields at its checkpoints (many slices, not one), and stop raises inside it at once."""
    install_checkpoints(tiny_llama.model)
    ids = torch.tensor([tiny_llama.prompt_ids(PROMPT * 4)])
    passes: list[int] = []

    def work() -> str:
        for i in range(50):
            with torch.inference_mode():
                tiny_llama.model(input_ids=ids)
            passes.append(i)
        return "done"

    run = SlicedRun(work)
    assert not run.run_slice(0.0)
    assert not run.run_slice(0.0)
    slices_before = run.slices
    run.stop(Cancelled("gone"))
    assert run.done and isinstance(run.error, Cancelled)
    assert len(passes) < 5 and slices_before == 2

    whole = SlicedRun(work)
    assert whole.run_slice(math.inf) and whole.result == "done"


def test_checkpoint_outside_a_run_is_a_no_op():
    checkpoint()


def test_an_exception_inside_analysis_code_cannot_swallow_a_stop(tiny_llama):
    install_checkpoints(tiny_llama.model)
    ids = torch.tensor([tiny_llama.prompt_ids(PROMPT)])

    def stubborn() -> int:
        count = 0
        while count < 1000:
            try:
                with torch.inference_mode():
                    tiny_llama.model(input_ids=ids)
            except Exception:  # analysis code that catches broadly must still be stoppable
                pass
            count += 1
        return count

    run = SlicedRun(stubborn)
    run.run_slice(0.0)
    run.stop(Cancelled("gone"))
    assert run.done and isinstance(run.error, Cancelled)


def _count_forward_tokens(lm) -> list[int]:
    counted: list[int] = []
    embed = unwrap(lm.model).get_input_embeddings()
    embed.register_forward_hook(lambda module, args, out: counted.append(args[0].numel()))
    return counted


@pytest.mark.parametrize("granularity", ["token", "word", "sentence"])
def test_cost_estimate_follows_the_tokens_really_run(monkeypatch, granularity):
    """Without attention's share, the estimate is the number of tokens the forward passes process: never
    below it (the limit is a bound), and within 15% of it."""
    from faithlens.tiny import tiny_loaded_model

    lm = tiny_loaded_model("llama")
    monkeypatch.setattr(cost, "ATTENTION_TOKENS", math.inf)
    prompt_ids = lm.prompt_ids(PROMPT)
    response_ids = lm.completion_ids(COMPLETION)
    saliency = SaliencyParams(method="atman", granularity=granularity)
    counted = _count_forward_tokens(lm)
    analyze(
        lm,
        prompt_ids,
        response_ids,
        AnalysisParams(),
        saliency=saliency,
        compute=ComputeOptions(recompute_slack=0.0),
    )
    texts = lm.token_texts(prompt_ids + response_ids)
    estimate = cost.analysis_cost(texts, len(prompt_ids), saliency)
    assert sum(counted) <= estimate <= 1.15 * sum(counted), (sum(counted), estimate)


def test_cost_orders_methods_and_granularities():
    texts = ["Q", ":"] + [" He", " has", " 3", "ap", "ples", "."] * 60 + [" The", " answer", " is", " 7", "."]
    token, word, sentence = (
        cost.analysis_cost(texts, 50, SaliencyParams(granularity=g)) for g in ("token", "word", "sentence")
    )
    grad = cost.analysis_cost(texts, 50, SaliencyParams(method="atman_grad"))
    assert token > word > sentence > cost.analysis_cost(texts, 50, None)
    assert token > grad > cost.analysis_cost(texts, 50, None)


def test_too_costly_is_refused_before_any_work_and_says_what_fits(tiny_llama):
    spec = AnalysisSpec(AnalysisParams(), SaliencyParams(method="atman"))
    prompt_ids = tiny_llama.prompt_ids(PROMPT)
    texts = tiny_llama.token_texts(prompt_ids + tiny_llama.completion_ids(COMPLETION))
    grad = cost.analysis_cost(
        texts, len(prompt_ids), spec.saliency.model_copy(update={"method": "atman_grad"})
    )
    limit = math.ceil(grad) + 1

    async def run() -> AnalysisTooCostly:
        engine = LocalEngine(tiny_llama, EngineConfig(max_analysis_cost=limit))
        await engine.start()
        try:
            with pytest.raises(AnalysisTooCostly) as caught:
                await engine.analyze(AnalysisRequest(Prompt(PROMPT), COMPLETION, spec))
            assert engine.health().analyses == 0
            return caught.value
        finally:
            await engine.stop()

    error = asyncio.run(run())
    assert error.estimate > error.limit == limit
    assert f"{limit:,}" in error.message and "method 'atman_grad'" in error.message
