"""Flag logic on hand-made WAAD and FAI vectors, with expectations worked out by hand (spec §5)."""

from __future__ import annotations

import math

import torch

from faithlens.metrics import compute_flags, default_layers, fai_counts, split_heads

NAN = math.nan


def flags(waad, fai, **kw):
    return compute_flags(
        torch.tensor(waad, dtype=torch.float64), torch.tensor(fai, dtype=torch.float64), **kw
    )


def test_worked_example():
    # Δ = [4, 0, 3, 0, 0]; 0.6-quantile of sorted [0,0,0,3,4] at 2.4 → 0 + 0.4·3 = 1.2.
    # FAI defined [0.1,0.5,0.2,0.5]; 0.6-quantile at 1.8 → 0.2 + 0.8·0.3 = 0.44 → anchors 1 and 3.
    # τ_waad = median[1,2,2,2,5,5] = 2, τ_Δ = median Δ = 0.
    # Anchor 1 has WAAD 5 > 2: not dominated. Anchor 3 has WAAD 2 ≤ 2 and max Δ[0..2] = 4 ≥ 0: dominated,
    # introduced by argmax Δ[0..2] = 0.
    f = flags([1, 5, 5, 2, 2, 2], [0.1, 0.5, 0.2, 0.5, NAN, NAN])
    assert f.delta == [4, 0, 3, 0, 0]
    assert f.preplan == [True, False, True, False, False, False]
    assert f.anchor == [False, True, False, True, False, False]
    assert f.dominated_anchor == [False, False, False, True, False, False]
    assert f.intro == [True, False, False, False, False, False]
    assert f.coupled_pairs == [(0, 3)]
    assert (f.tau_waad, f.tau_delta) == (2.0, 0.0)


def test_ties_at_threshold_are_included():
    f = flags([0, 1, 2, 3, 4], [0.3, 0.3, 0.3, 0.3, 0.3])
    assert f.delta == [1, 1, 1, 1]
    assert f.preplan == [True, True, True, True, False]  # the last token has no Δ
    assert f.anchor == [True] * 5


def test_undefined_fai_is_never_an_anchor_nor_counted():
    # Defined values [0.9, 0.1]: the 0.6-quantile is 0.1 + 0.6·0.8 = 0.58, so only 0.9 is an anchor.
    f = flags([1, 1, 1, 1], [0.9, NAN, 0.1, NAN])
    assert f.anchor == [True, False, False, False]


def test_single_token_response():
    f = flags([3.0], [0.2])
    assert f.preplan == [False] and f.anchor == [True]
    assert f.dominated_anchor == [False] and f.tau_delta is None
    g = flags([3.0], [NAN])
    assert g.anchor == [False]


def test_anchor_at_start_has_no_lookback():
    # Anchor at t=0 with low WAAD: [t−k, t−1] is empty, so it cannot be dominated.
    f = flags([0, 5, 5, 5], [0.9, 0.1, 0.1, 0.1], q=0.25)
    assert f.anchor == [True, False, False, False]
    assert f.dominated_anchor == [False] * 4 and f.coupled_pairs == []


def test_k_clips_at_the_response_start():
    # Anchor at t=1, k=3: the window is [0, 0] only. Δ = [5, 0, 0]; τ_Δ = 0; WAAD_1 = 0 ≤ median.
    f = flags([5, 0, 0, 0], [0.1, 0.9, 0.1, 0.1], q=0.25, k=3)
    assert f.dominated_anchor == [False, True, False, False]
    assert f.coupled_pairs == [(0, 1)]


def test_intro_is_the_earliest_maximum_and_k_limits_the_window():
    # Δ = [3, 3, 3, 0]; the anchor at t=3 looks back over [0, 2] (k=3) → earliest max 0; with k=2 → 1.
    waad, fai = [0, 3, 0, 3, 3], [0.1, 0.1, 0.1, 0.9, 0.1]
    # τ_waad = median = 3, WAAD_3 = 3 ≤ 3; τ_Δ = median[0,3,3,3] = 3.
    assert flags(waad, fai, q=0.2, k=3).coupled_pairs == [(0, 3)]
    assert flags(waad, fai, q=0.2, k=2).coupled_pairs == [(1, 3)]


def test_explicit_thresholds_override_medians():
    waad, fai = [1, 5, 5, 2, 2, 2], [0.1, 0.5, 0.2, 0.5, NAN, NAN]
    assert flags(waad, fai, tau_delta=10.0).coupled_pairs == []  # no Δ reaches 10
    # With τ_waad = 5 the anchor at 1 (WAAD 5) qualifies too, looking back to Δ_0 = 4.
    assert flags(waad, fai, tau_waad=5.0).coupled_pairs == [(0, 1), (0, 3)]


def test_default_layers_follow_the_spec():
    assert default_layers(30) == [10, 12, 15, 17, 20]
    assert default_layers(6) == [2, 3, 4]
    assert default_layers(3) == [1, 2]


def test_head_split_is_stable_and_sized():
    d = torch.tensor([5.0, 1.0, 1.0, 9.0, 3.0, 9.0, 2.0, 4.0, 7.0, 6.0])
    s = split_heads(d, 0.3)  # n = 3; stable ascending order: 1,2,6,4,7,0,9,8,3,5
    assert s.local == [1, 2, 6]
    assert s.global_ == [8, 3, 5]
    assert split_heads(torch.tensor([1.0, 2.0]), 0.3).local == [0]  # at least one head


def test_fai_counts():
    # N=8, response starts at 3, H_lo=2, H_hi=3: s=0 → t∈[3,3]; s=1 → [3,4]; s=5 → [7,7]; s=6 → none.
    assert fai_counts(8, 3, 2, 3).tolist() == [1, 2, 2, 2, 2, 1, 0, 0]
    assert fai_counts(8, 3, 2, None).tolist() == [5, 5, 4, 3, 2, 1, 0, 0]  # s=2 → t∈[4,7]
