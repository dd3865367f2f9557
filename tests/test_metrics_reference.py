"""The streaming probe equals the naive eager reference (spec §1–4)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_metrics

from faithlens.analysis import compute_metrics
from faithlens.data import load_gsm8k
from faithlens.params import AnalysisParams, ComputeOptions

PARAM_SETS = {
    "default": (AnalysisParams(), None),
    "to_the_end": (AnalysisParams(W=4, H_lo=2, H_hi=None, layers=[0, 3, 5]), None),
    "short_horizon": (AnalysisParams(W=20, H_lo=0, H_hi=7, q=0.2, head_fraction=0.5), None),
    "tiny_chunks": (AnalysisParams(), ComputeOptions(probe_memory_mb=0)),  # one row per chunk
}


def _random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_matches_reference(lm, ids, prompt_len, params, atol, compute=None):
    got = compute_metrics(lm, ids, prompt_len, params, compute=compute)
    ref = reference_metrics(
        lm.model, ids, prompt_len, got.layers, params.W, params.H_lo, params.H_hi, params.head_fraction
    )
    assert got.heads == ref.heads
    torch.testing.assert_close(got.head_distance, ref.distance, atol=atol, rtol=0)
    assert got.split.local == ref.local and got.split.global_ == ref.global_
    torch.testing.assert_close(got.waad.double(), ref.waad, atol=atol, rtol=0)
    assert torch.equal(torch.isnan(got.fai), torch.isnan(ref.fai)), "FAI nulls differ"
    torch.testing.assert_close(got.fai.nan_to_num(), ref.fai.nan_to_num(), atol=atol, rtol=0)
    return got


@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_tiny_models_match_reference(tiny_lm, name):
    params, compute = PARAM_SETS[name]
    got = assert_matches_reference(tiny_lm, _random_ids(180, 1), 50, params, atol=1e-5, compute=compute)
    n = 180
    if params.H_hi is None or params.H_lo > 0:
        # The last H_lo positions have no future rows in reach: FAI is null there, never 0.
        assert torch.isnan(got.fai[n - params.H_lo :]).all()
        assert not torch.isnan(got.fai[: n - params.H_lo]).any()
    assert ((got.waad >= 0) & (got.waad <= params.W + 1e-5)).all()


def test_response_of_one_token(tiny_llama):
    got = assert_matches_reference(tiny_llama, _random_ids(30, 2), 29, AnalysisParams(H_lo=0), atol=1e-5)
    assert got.waad.shape == (1,)
    assert got.flags.preplan == [False]


def test_chunking_does_not_change_results(tiny_llama):
    ids = _random_ids(300, 3)
    whole = compute_metrics(tiny_llama, ids, 20, compute=ComputeOptions(probe_memory_mb=1024))
    chunked = compute_metrics(tiny_llama, ids, 20, compute=ComputeOptions(probe_memory_mb=0))
    torch.testing.assert_close(whole.waad, chunked.waad)
    torch.testing.assert_close(whole.fai, chunked.fai, equal_nan=True)


def test_fixed_head_split_is_used(tiny_llama):
    got = compute_metrics(tiny_llama, _random_ids(80, 4), 10, heads=([(1, 0), (2, 3)], [(4, 1)]))
    assert got.layers == [1, 2, 4]
    assert [got.heads[i] for i in got.split.local] == [(1, 0), (2, 3)]
    assert [got.heads[i] for i in got.split.global_] == [(4, 1)]


@pytest.mark.smollm
@pytest.mark.parametrize("name", ["default", "to_the_end"])
def test_smollm_matches_reference(smollm, name):
    params = PARAM_SETS[name][0] if name == "default" else AnalysisParams(W=4, H_lo=2, H_hi=None)
    problem = load_gsm8k("dev", limit=1)[0]
    prompt = smollm.prompt_ids(problem.question, chat=True)
    completion = smollm.completion_ids(problem.answer.replace("\n", " "))
    got = assert_matches_reference(smollm, prompt + completion, len(prompt), params, atol=1e-4)
    assert got.layers == ([10, 12, 15, 17, 20] if name == "default" else got.layers)
