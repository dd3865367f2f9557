"""The rhythm study (spec §11): peaks, statistic B, Jaccard and the bootstrap on hand-made sequences with
hand-worked expectations; the perturbation trial on the tiny model against a direct greedy decode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from faithlens.generation import generate
from faithlens.params import SamplingParams
from faithlens.stats import bootstrap_pooled
from faithlens.study import RhythmConfig, pool_rhythm, study_response
from faithlens.study.peaks import find_peaks, followed, shuffled_fai
from faithlens.study.rhythm import (
    EntropyCounts,
    FollowCounts,
    ResponseRhythm,
    Trial,
    continuation_length,
    eligible_positions,
    follow_counts,
    high_low,
    perturbed_continuations,
)
from faithlens.study.words import content_words, jaccard

NAN = float("nan")


def peaks(values: list[float], q: float) -> list[int]:
    return np.flatnonzero(find_peaks(np.asarray(values), q)).tolist()


# -- peaks --------------------------------------------------------------------------------------------


def test_a_plateau_peaks_at_its_last_point():
    # t=1: 3 ≥ 1 but 3 > 3 fails; t=2: 3 ≥ 3 and 3 > 1.
    assert peaks([1, 3, 3, 1], q=1.0) == [2]


def test_both_ends_can_peak():
    # t=0: 5 ≥ −∞ and 5 > 1; t=3: 4 ≥ 2 and 4 > −∞; t=2: 2 > 4 fails.
    assert peaks([5, 1, 2, 4], q=1.0) == [0, 3]


def test_a_value_tied_with_the_quantile_is_in():
    # Sorted [0, 0, 1, 2, 2]; at q=0.5 the threshold is the 0.5 quantile, exactly 1: t=2 (value 1) is in.
    assert peaks([2, 0, 1, 0, 2], q=0.5) == [0, 2, 4]
    # At q=0.4 the threshold is the 0.6 quantile: index 2.4, 1 + 0.4·(2 − 1) = 1.4: t=2 is out.
    assert peaks([2, 0, 1, 0, 2], q=0.4) == [0, 4]


def test_undefined_values_never_peak_and_count_as_minus_infinity():
    assert peaks([1, 3, NAN, NAN], q=1.0) == [1]
    assert peaks([NAN, NAN], q=1.0) == []


def test_peaks_row_wise_equal_peaks_per_row():
    rng = np.random.default_rng(0)
    rows = rng.random((5, 17))
    rows[:, -3:] = NAN
    together = find_peaks(rows, 0.4)
    for row, found in zip(rows, together, strict=True):
        assert (find_peaks(row, 0.4) == found).all()


# -- statistic B --------------------------------------------------------------------------------------


def test_followed_counts_fai_peaks_with_a_waad_peak_at_most_k_before():
    waad = np.zeros(8, dtype=bool)
    waad[2] = True
    fai = np.zeros(8, dtype=bool)
    fai[[2, 3, 5]] = True
    assert followed(fai, waad, k=0) == 1  # only s=2 coincides
    assert followed(fai, waad, k=1) == 2  # s=3 has t=2 in [2, 3]; s=5 has nothing in [4, 5]
    assert followed(fai, waad, k=3) == 3  # s=5 has t=2 in [2, 5]


def test_b_is_one_when_every_fai_peak_follows_a_waad_peak_and_its_shuffled_baseline_is_lower():
    # WAAD spikes at t ≡ 1 (mod 3), FAI spikes one token later; 30 tokens, 10 spikes each. At q_peak=0.2
    # the threshold is the 0.8 quantile of 20 zeros and 10 ones (index 23.2: 1), so the peaks are the spikes.
    n = 30
    waad = np.array([1.0 if t % 3 == 1 else 0.0 for t in range(n)])
    fai = np.array([1.0 if t % 3 == 2 else 0.0 for t in range(n)])
    shuffled = shuffled_fai(fai, 100, np.random.default_rng(0))
    counts = follow_counts(waad, fai, shuffled, q_peak=0.2, k=1)
    assert counts.fai_peaks == 10 and counts.followed == 10
    baseline = counts.shuffled_followed / counts.shuffled_fai_peaks
    assert baseline < 1.0
    assert follow_counts(waad, fai, shuffled, q_peak=0.2, k=0).followed == 0  # none coincides
    row = _row(0, b=counts)
    pooled = pool_rhythm([row]).B
    assert pooled["observed"] == 1.0
    assert pooled["baseline"] == pytest.approx(baseline)
    assert pooled["lift"] == pytest.approx(1.0 / baseline - 1.0)


def test_shuffling_permutes_only_the_defined_values():
    fai = np.array([3.0, 1.0, 2.0, NAN, NAN])
    shuffled = shuffled_fai(fai, 20, np.random.default_rng(1))
    assert np.isnan(shuffled[:, 3:]).all()
    assert (np.sort(shuffled[:, :3], axis=1) == [1.0, 2.0, 3.0]).all()
    assert len({tuple(r) for r in shuffled[:, :3]}) > 1


# -- statistic C's parts ------------------------------------------------------------------------------


def test_content_words_drop_stop_words_punctuation_and_case():
    assert content_words("The Cat sat on THE mat, and the cat's 2 hats!") == {
        "cat",
        "sat",
        "mat",
        "2",
        "hats",
    }
    assert content_words("It is what it is.") == set()


def test_jaccard_by_hand():
    assert jaccard({"cat", "sat"}, {"cat", "mat"}) == pytest.approx(1 / 3)
    assert jaccard(content_words("The CAT"), content_words("a cat")) == 1.0  # case does not matter
    assert jaccard(set(), set()) == 1.0  # two empty sets are identical
    assert jaccard(content_words("and then it was"), content_words("so it is")) == 1.0  # stop words only
    assert jaccard({"cat"}, set()) == 0.0


def test_eligible_positions_stop_before_the_answer_and_keep_tokens_after():
    fai = np.array([0.5] * 50 + [NAN] * 10)
    # 60 tokens: t ≤ 27 has ≥ 32 after it; the answer starts at 20.
    assert eligible_positions(fai, answer_start=None, min_after=32).tolist() == list(range(28))
    assert eligible_positions(fai, answer_start=20, min_after=32).tolist() == list(range(20))
    values = np.array([0.2, 0.9, 0.1, 0.9, 0.1])
    assert high_low(values, np.arange(5)) == (1, 2)  # the first on ties
    assert high_low(values, np.array([4])) == (None, None)
    assert high_low(np.ones(3), np.arange(3)) == (None, None)


# -- pooling and the bootstrap ------------------------------------------------------------------------


def _row(
    index: int, a: EntropyCounts | None = None, b: FollowCounts | None = None, trials=()
) -> ResponseRhythm:
    b = b or FollowCounts(0.4, 1, 0, 0, 0.0, 0.0)
    config = RhythmConfig()
    return ResponseRhythm(
        index=index,
        tokens=10,
        answer_start=None,
        waad_peaks=[],
        fai_peaks=[],
        A=a or EntropyCounts(0.0, 0, 0.0, 0),
        B=b,
        B_grid=[b] * (len(config.grid_q_peak) * len(config.grid_k)),
        high=None,
        low=None,
        trials=list(trials),
    )


def test_pooled_figures_are_ratios_of_summed_counts():
    rows = [
        _row(
            0,
            a=EntropyCounts(3.0, 2, 10.0, 10),
            trials=[Trial(2, "a", "b", 0.2, 0.5), Trial(3, "c", "d", 0.6, 0.4)],
        ),
        _row(1, a=EntropyCounts(1.0, 2, 2.0, 4), trials=[Trial(2, "e", "f", 0.1, 0.1)]),
    ]
    report = pool_rhythm(rows)
    assert report.A["observed"] == pytest.approx(4.0 / 4)  # (3 + 1) / (2 + 2)
    assert report.A["baseline"] == pytest.approx(12.0 / 14)
    assert report.A["lift"] == pytest.approx((4.0 / 4) / (12.0 / 14) - 1)
    assert report.C["trials"] == 3
    assert report.C["jaccard_high"] == pytest.approx(0.9 / 3)
    assert report.C["jaccard_low"] == pytest.approx(1.0 / 3)
    assert report.C["share_high_diverges_more"] == pytest.approx(1 / 3)  # a tie is not "diverges more"
    assert report.B["observed"] is None and report.B["ci95"]["observed"] == [None, None]  # no peaks at all
    low, high = report.A["ci95"]["observed"]
    assert low <= report.A["observed"] <= high
    again = ResponseRhythm.from_json(rows[0].to_json())
    assert again == rows[0]


def test_bootstrap_is_deterministic_for_a_seed_and_resamples_units():
    sums = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 5.0], [6.0, 1.0]])

    def ratio(s):
        return {"r": s[..., 0] / s[..., 1]}

    first = bootstrap_pooled(sums, ratio, seed=7, resamples=500)
    assert first == bootstrap_pooled(sums, ratio, seed=7, resamples=500)
    assert first != bootstrap_pooled(sums, ratio, seed=8, resamples=500)
    value, (low, high) = first[0]["r"], first[1]["r"]
    assert value == pytest.approx(10.0 / 12)
    assert 0.0 <= low < value < high <= 6.0  # every resample's ratio lies between the extreme units
    assert bootstrap_pooled(np.zeros((0, 2)), ratio)[0] == {"r": None}


# -- the model parts (tiny model) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def response(tiny_llama):
    prompt = tiny_llama.prompt_ids("Tom has 3 apples and buys 4 more. How many?")
    gen = generate(tiny_llama, prompt, SamplingParams(max_new_tokens=70, min_new_tokens=70))
    return prompt, gen.token_ids


def test_a_perturbed_continuation_equals_a_direct_greedy_decode_from_the_perturbed_prefix(
    tiny_llama, response
):
    prompt, ids = response
    config = RhythmConfig()
    candidates = {5: [7, 8, 9], 30: [10, 11, 12]}
    runs = perturbed_continuations(tiny_llama, prompt, ids, candidates, config)
    for position, tokens in candidates.items():
        length = continuation_length(ids, position, config)
        assert length == min(64, len(ids) - position - 1)
        for token, run in zip(tokens, runs[position], strict=True):
            alone = generate(
                tiny_llama, [*prompt, *ids[:position], token], SamplingParams(max_new_tokens=length)
            )
            assert run.token_ids == alone.token_ids
            assert run.text == alone.text


def test_a_response_study_is_reproducible_and_self_consistent(tiny_llama, response):
    prompt, ids = response
    first = study_response(tiny_llama, prompt, ids, index=3)
    again = study_response(tiny_llama, prompt, ids, index=3)
    first.seconds = again.seconds = 0.0
    assert first == again  # B's permutations are seeded by (seed, index)
    assert first.tokens == len(ids) and first.A.tokens == len(ids)
    assert first.A.waad_peaks == len(first.waad_peaks)
    assert first.B.fai_peaks == len(first.fai_peaks)
    assert all(0 <= t < len(ids) for t in first.waad_peaks + first.fai_peaks)
    if first.high is not None:
        assert [t.rank for t in first.trials] == [2, 3, 4]
        assert all(0.0 <= t.jaccard_high <= 1.0 and 0.0 <= t.jaccard_low <= 1.0 for t in first.trials)
    grid = [(g.q_peak, g.k) for g in first.B_grid]
    assert grid == [(q, k) for q in (0.1, 0.2, 0.4) for k in (0, 1, 3)]
    assert first.B_grid[grid.index((0.4, 1))] == first.B
    assert not math.isnan(first.A.entropy_sum)


def test_sampled_studies_give_each_problem_its_own_seed():
    assert RhythmConfig().sampling(3).seed is None  # greedy by default (spec §11)
    sampled = RhythmConfig(temperature=0.7, seed=5)
    assert [sampled.sampling(i).seed for i in (0, 3)] == [5, 8]
    assert sampled.sampling(0).temperature == 0.7 and sampled.sampling(0).max_new_tokens == 256
