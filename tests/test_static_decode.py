"""The static decode step, checked on the CPU for the properties that make it fast on a GPU (issue 28):
storage that never moves, one host read per step, a step that compiles with no graph break, and the
same tokens and log-probs as HF and a plain forward pass."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from faithlens.batching import DecodeBatch, SequenceState
from faithlens.decode_step import Buckets, StepShape, host_read, resolve_cuda_graphs
from faithlens.generation import generate, generate_batch
from faithlens.params import SamplingParams
from faithlens.sampling import TOP_LOGPROBS_MAX, RowSampling, SamplerFlags, sample, uniform, unit_interval

aten = torch.ops.aten
SCALAR_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
}


class HostReads(TorchDispatchMode):
    """Counts every op that makes the host wait for a device value: scalar reads, data-dependent shapes,
    copies to the CPU (on a CPU too: the step's read is an explicit copy), bool-mask indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in SCALAR_READS
            or func in DATA_DEPENDENT
            or self._to_cpu(func, args, kwargs)
            or (func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu")
            or (func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]))
        ):
            self.reads.append(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _to_cpu(func, args, kwargs) -> bool:
        """A copy to the CPU: ``_to_copy``, or under inference mode the undecomposed ``to``; a ``to`` that
        stays on the CPU without ``copy=True`` returns its input and reads nothing."""
        if func.overloadpacket not in (aten._to_copy, aten.to):
            return False
        devices = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, torch.device)]
        if not devices or devices[0].type != "cpu":
            return False
        copies = func.overloadpacket is aten._to_copy or kwargs.get("copy", False) or True in args[3:5]
        return args[0].device.type != "cpu" or bool(copies)


def prompts(lm, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [lm.prompt_ids("x" * rng.randrange(3, 40) + str(i), chat=True) for i in range(n)]


# -- storage that never moves ------------------------------------------------------------------------------
def test_cache_storage_never_moves_while_rows_join_and_leave(tiny_llama):
    lm, rng = tiny_llama, random.Random(1)
    batch = DecodeBatch(lm, slots=8, max_context=256)
    pointers = batch.cache.data_ptrs() + [t.data_ptr() for t in batch.state.tensors()]
    queue = prompts(lm, 400, seed=2)
    joined = left = cancelled = 0
    for step in range(200):
        while batch.has_free_slot() and rng.random() < 0.5:
            params = SamplingParams(
                max_new_tokens=rng.randrange(2, 30), temperature=rng.choice([0, 0.9]), seed=step
            )
            batch.add(SequenceState(queue.pop(), params))
            joined += 1
        if batch.rows and rng.random() < 0.1:
            cancelled += len(batch.remove([rng.randrange(len(batch.rows))]))
        left += len(batch.step())
        assert batch.cache.data_ptrs() + [t.data_ptr() for t in batch.state.tensors()] == pointers, step
    assert joined > 40 and left > 30 and cancelled > 5  # the storage saw real churn


def test_a_step_reads_only_the_columns_its_rows_need(tiny_llama):
    batch = DecodeBatch(tiny_llama, slots=4, max_context=1024, key_block=64)
    batch.add(SequenceState(list(range(3, 103)), SamplingParams(max_new_tokens=50)))
    shape = batch.buckets.shape(
        max(s.slot for s in batch.rows), max(s._position for s in batch.rows) + 1, SamplerFlags()
    )
    assert shape == StepShape(rows=1, key_len=128, flags=SamplerFlags())
    captured = Buckets(slots=8, max_context=1024, key_block=256, power_of_two_rows=True)
    assert [captured.rows(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert captured.key_len(1000) == 1024 and captured.key_len(257) == 512


# -- one host read per step -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_one_host_read_per_step(tiny_llama, rows, temperature, top_logprobs):
    batch = DecodeBatch(tiny_llama, slots=8, max_context=256)
    for i, ids in enumerate(prompts(tiny_llama, rows)):
        params = SamplingParams(
            max_new_tokens=40, min_new_tokens=40, temperature=temperature, top_p=0.9, seed=i
        )
        batch.add(SequenceState(ids, params, num_top_logprobs=top_logprobs))
    for _ in range(5):
        with HostReads() as counter:
            batch.step()
        assert len(counter.reads) == 1, counter.reads
    assert all(len(seq.token_ids) == 6 for seq in batch.rows)
    assert all(len(seq.top_logprobs) == (6 if top_logprobs else 0) for seq in batch.rows)


def test_the_counter_sees_what_the_old_step_did(tiny_llama):
    """Guards the test above: per-row reads like the old step's are counted."""
    for inference in (False, True):
        with torch.inference_mode(inference):
            logits = torch.randn(4, 10)
            with HostReads() as counter:
                [int(row.argmax()) for row in logits]
                float(torch.log_softmax(logits[0], -1)[3])
                logits[logits > 0]
                logits.any(0).nonzero()
                logits.cpu()  # a no-op on a CPU: not a copy
                logits.to("cpu", copy=True)
        assert len(counter.reads) == 8, (inference, counter.reads)


# -- capturable ---------------------------------------------------------------------------------------------------
def _snapshot(batch: DecodeBatch) -> list[torch.Tensor]:
    return [t.clone() for t in (*batch.cache.keys, *batch.cache.values, *batch.state.tensors())]


def _restore(batch: DecodeBatch, saved: list[torch.Tensor]) -> None:
    for tensor, value in zip(
        (*batch.cache.keys, *batch.cache.values, *batch.state.tensors()), saved, strict=True
    ):
        tensor.copy_(value)


def check_compiles(lm, shapes: list[tuple[int, int]]) -> None:
    """For each (rows, key_len): the step compiles with fullgraph=True, explain finds no break, and the
    compiled step gives the eager step's tokens, log-probs and state."""
    batch = DecodeBatch(lm, slots=max(r for r, _ in shapes), max_context=max(k for _, k in shapes))
    for i, ids in enumerate(prompts(lm, batch.slots)):
        params = SamplingParams(max_new_tokens=100, min_new_tokens=100, temperature=[0, 0.7][i % 2], seed=i)
        batch.add(SequenceState(ids, params, num_top_logprobs=2))
    step = batch._step
    for rows, key_len in shapes:
        shape = StepShape(
            rows, key_len, SamplerFlags(sampled=True, nucleus=False, top_logprobs=TOP_LOGPROBS_MAX)
        )
        with torch.inference_mode():
            explained = torch._dynamo.explain(step)(shape)
            assert explained.graph_break_count == 0, explained.break_reasons
            torch._dynamo.reset()
            saved = _snapshot(batch)
            eager = step(shape).clone()
            after_eager = [t.clone() for t in batch.state.tensors()]
            _restore(batch, saved)
            compiled = torch.compile(step, fullgraph=True, dynamic=False)(shape).clone()
            after_compiled = [t.clone() for t in batch.state.tensors()]
            _restore(batch, saved)
        assert compiled[:, 0].tolist() == eager[:, 0].tolist()
        torch.testing.assert_close(compiled[:, 1], eager[:, 1], atol=1e-4, rtol=0)
        for a, b in zip(after_eager, after_compiled, strict=True):
            assert torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_step_compiles_with_no_graph_break(arch):
    from tests.devices import tiny

    check_compiles(tiny(arch, layers=2), [(1, 64), (4, 128)])


@pytest.mark.smollm
def test_the_step_compiles_with_no_graph_break_on_smollm(smollm):
    check_compiles(smollm, [(1, 128), (2, 256)])


def test_sliding_window_models_and_empty_prompts_are_refused(tiny_llama):
    from transformers import Qwen2Config

    from faithlens.kvcache import check_supported

    check_supported(Qwen2Config())  # no window unless asked for
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0))
    with pytest.raises(ValueError, match="empty"):
        DecodeBatch(tiny_llama, slots=1, max_context=16).add(SequenceState([], SamplingParams()))


def test_cuda_graphs_setting():
    assert not resolve_cuda_graphs("auto", torch.device("cpu"))
    assert not resolve_cuda_graphs("off", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        resolve_cuda_graphs("on", torch.device("cpu"))


# -- equal ----------------------------------------------------------------------------------------------------
def test_logprobs_equal_a_plain_forward(tiny_lm):
    lm = tiny_lm
    prompt = lm.prompt_ids("log-probs", chat=True)
    gen = generate(
        lm,
        prompt,
        SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.9, seed=5),
        top_logprobs=4,
    )
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + gen.token_ids], device=lm.device)).logits[
            0, len(prompt) - 1 : -1
        ]
    logp = torch.log_softmax(logits.float(), -1).cpu()
    torch.testing.assert_close(
        torch.tensor(gen.logprobs), logp[torch.arange(24), gen.token_ids], atol=1e-5, rtol=0
    )
    top = logp.topk(4, -1)
    assert [[i for i, _ in row] for row in gen.top_logprobs] == top.indices.tolist()
    torch.testing.assert_close(
        torch.tensor([[v for _, v in row] for row in gen.top_logprobs]), top.values, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_seeded_request_decodes_the_same_alone_and_among_eight(tiny_lm, top_p):
    lm = tiny_lm
    target = (
        lm.prompt_ids("seeded", chat=True),
        SamplingParams(max_new_tokens=30, temperature=1.0, top_p=top_p, seed=11),
    )
    alone = generate(lm, *target)
    others = [
        (ids, SamplingParams(max_new_tokens=random.Random(i).randrange(5, 40), temperature=0.7, seed=i))
        for i, ids in enumerate(prompts(lm, 7))
    ]
    for position in (0, 5):
        batch = [*others[:position], target, *others[position:]]
        together = generate_batch(lm, batch)[position]
        assert together.token_ids == alone.token_ids
        torch.testing.assert_close(
            torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
        )


def test_requests_beyond_the_slots_queue_and_decode_the_same(tiny_llama):
    reqs = [
        (ids, SamplingParams(max_new_tokens=12, temperature=0.8, seed=i))
        for i, ids in enumerate(prompts(tiny_llama, 7))
    ]
    wide = generate_batch(tiny_llama, reqs, slots=8)
    narrow = generate_batch(tiny_llama, reqs, slots=2)
    assert [g.token_ids for g in wide] == [g.token_ids for g in narrow]


def test_a_prompt_longer_than_the_context_is_refused_and_a_long_row_ends_at_it(tiny_llama):
    batch = DecodeBatch(tiny_llama, slots=2, max_context=64)
    with pytest.raises(ValueError, match="64"):
        batch.add(SequenceState(list(range(3, 70)), SamplingParams()))
    seq = SequenceState(list(range(3, 53)), SamplingParams(max_new_tokens=100, min_new_tokens=100))
    batch.add(seq)
    while len(batch):
        batch.step()
    assert seq.finish_reason == "length" and len(seq.prompt_ids) + len(seq.token_ids) == 64


# -- the sampler -------------------------------------------------------------------------------------------------
def rows_of(
    n: int, temperature: float = 1.0, top_p: float = 1.0, min_new: int = 0, count: int = 0
) -> RowSampling:
    rows = RowSampling.allocate(n, torch.device("cpu"))
    rows.temperature.fill_(temperature)
    rows.top_p.fill_(top_p)
    rows.seed.copy_(torch.arange(n) * 7919 + 3)
    rows.min_new.fill_(min_new)
    rows.count.fill_(count)
    return rows


def test_sampling_draws_from_the_tempered_nucleus():
    """20,000 draws (each its own seed) from a fixed 6-token distribution: frequencies match softmax(z/T)
    restricted to the nucleus, within 4.5 standard errors; tokens outside the nucleus never appear."""
    n = 20_000
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])).repeat(n, 1)
    eos = torch.zeros(6, dtype=torch.bool)
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.75)]:
        out = sample(
            logits, rows_of(n, temperature, top_p), eos, SamplerFlags(sampled=True, nucleus=top_p < 1)
        )
        probs = torch.softmax(logits[0] / temperature, -1)
        keep = (probs.cumsum(0) - probs) < top_p
        expected = torch.where(keep, probs, 0) / probs[keep].sum()
        seen = Counter(out.tokens.tolist())
        for token in range(6):
            p = float(expected[token])
            sd = math.sqrt(max(p * (1 - p), 1e-12) / n)
            assert abs(seen[token] / n - p) <= 4.5 * sd + 1e-9, (temperature, top_p, token, seen)


def test_noise_is_uniform_and_independent_of_the_batch():
    seeds, counters = torch.tensor([1, 2, 3, 2**62 + 5]), torch.tensor([0, 0, 7, 1])
    u = uniform(seeds, counters, 50_000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.equal(uniform(seeds[2:3], counters[2:3], 50_000)[0], u[2])  # the same alone
    assert not torch.equal(u[0], u[1])
    lag = torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]
    assert abs(float(lag)) < 0.02


def test_noise_never_reaches_zero_or_one():
    extremes = unit_interval(torch.tensor([0, 0xFFFFFFFF, 0xFFFFFF00]))
    assert float(extremes.min()) > 0 and float(extremes.max()) < 1
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()


def test_min_new_tokens_masks_eos_on_the_device():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]]).repeat(2, 1)
    eos = torch.tensor([False, False, True, False])
    greedy = SamplerFlags()
    assert sample(logits, rows_of(2, 0.0, min_new=3, count=2), eos, greedy).tokens.tolist() != [2, 2]
    assert sample(logits, rows_of(2, 0.0, min_new=3, count=3), eos, greedy).tokens.tolist() == [2, 2]


def test_host_read_is_one_copy():
    packed = torch.arange(6.0).reshape(2, 3)
    with HostReads() as counter:
        values = host_read(packed)
    assert values == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and len(counter.reads) == 1


def test_engine_sized_cache_is_reported(tiny_llama):
    batch = DecodeBatch(copy.copy(tiny_llama), slots=3, max_context=100)
    assert (batch.plan.slots, batch.plan.max_context, batch.plan.source) == (3, 100, "settings")
    assert batch.plan.bytes == sum(
        t.numel() * t.element_size() for t in (*batch.cache.keys, *batch.cache.values)
    )
