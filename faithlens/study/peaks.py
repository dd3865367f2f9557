"""Peaks and the rhythm study's per-response counts (spec §11): pure numpy, unit-testable by hand.

A signal is a float vector over a response's positions with NaN where it is undefined (FAI near the end).
"""

from __future__ import annotations

import numpy as np


def top_q(values: np.ndarray, q: float) -> np.ndarray:
    """value ≥ the (1−q) quantile of the defined values, with linear interpolation (spec §5's rule, ties at
    the threshold included); works row-wise on a ``(rows, n)`` array. Undefined (NaN) values are never in."""
    values = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(values)
    if not defined.any():
        return np.zeros(values.shape, dtype=bool)
    threshold = np.nanquantile(values, 1.0 - q, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return defined & (values >= threshold)


def find_peaks(x: np.ndarray, q_peak: float = 0.4) -> np.ndarray:
    """Peaks of ``x`` (spec §11): t is a peak when x_t is defined, x_t ≥ x_{t−1}, x_t > x_{t+1} (a missing
    or undefined neighbour counts as −∞) and x_t is in the top ``q_peak`` of the defined values.

    So a plateau peaks at its last point, the ends can peak, and every value tied at the quantile may.
    Works on a vector or row-wise on a ``(rows, n)`` array."""
    x = np.asarray(x, dtype=np.float64)
    filled = np.where(np.isnan(x), -np.inf, x)
    pad = np.full((*x.shape[:-1], 1), -np.inf)
    left = np.concatenate([pad, filled[..., :-1]], axis=-1)
    right = np.concatenate([filled[..., 1:], pad], axis=-1)
    return ~np.isnan(x) & (filled >= left) & (filled > right) & top_q(x, q_peak)


def followed(fai_peaks: np.ndarray, waad_peaks: np.ndarray, k: int) -> np.ndarray:
    """How many FAI peaks s have a WAAD peak t with s − k ≤ t ≤ s (statistic B); row-wise for a
    ``(rows, n)`` ``fai_peaks`` against one ``waad_peaks`` vector."""
    waad_peaks = np.asarray(waad_peaks, dtype=bool)
    n = waad_peaks.shape[-1]
    before = np.concatenate([[0], np.cumsum(waad_peaks)])  # before[i] = WAAD peaks at positions < i
    s = np.arange(n)
    has_one = (before[s + 1] - before[np.maximum(s - k, 0)]) > 0
    return (np.asarray(fai_peaks, dtype=bool) & has_one).sum(-1)


def shuffled_fai(fai: np.ndarray, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """``(permutations, n)``: the FAI values permuted over their defined positions, NaN kept in place."""
    fai = np.asarray(fai, dtype=np.float64)
    defined = np.flatnonzero(~np.isnan(fai))
    out = np.tile(fai, (permutations, 1))
    if defined.size:
        order = rng.permuted(np.tile(defined, (permutations, 1)), axis=1)
        out[:, defined] = fai[order]
    return out
