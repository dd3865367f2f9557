"""Small statistics shared by the audit summary report and the rhythm study: seeded percentile bootstraps.

Everything here returns plain floats (or ``None`` where a value is undefined, never NaN), so results go
straight into JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

# Resample this many values at a time at most, so memory stays bounded for large audits; fixed, so results
# depend on the seed and the data only.
_CHUNK_VALUES = 1 << 22


def _clean(values: Iterable[float | None]) -> np.ndarray:
    """The finite values, in order, as float64; ``None`` and NaN are dropped."""
    kept = [float(v) for v in values if v is not None]
    arr = np.asarray(kept, dtype=np.float64)
    return arr[np.isfinite(arr)]


def _resampled_means(arr: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    n = arr.size
    per_chunk = max(1, _CHUNK_VALUES // n)
    means = np.empty(resamples, dtype=np.float64)
    done = 0
    while done < resamples:
        m = min(per_chunk, resamples - done)
        idx = rng.integers(0, n, size=(m, n))
        means[done : done + m] = arr[idx].mean(axis=1)
        done += m
    return means


def bootstrap_mean_ci(
    values: Iterable[float | None], seed: int = 0, resamples: int = 1000, confidence: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """``(mean, low, high)``: the sample mean and its percentile-bootstrap interval.

    ``resamples`` resamples of the values with replacement (each the size of the sample), drawn from
    ``numpy.random.default_rng(seed)``; the interval is the ``(1 − confidence)/2`` and ``(1 + confidence)/2``
    quantiles of the resampled means (linear interpolation). ``None`` values are skipped. No values gives
    ``(None, None, None)``; one value, or all equal, gives ``(v, v, v)``. Deterministic for a seed."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    arr = _clean(values)
    if arr.size == 0:
        return None, None, None
    if arr.size == 1 or np.all(arr == arr[0]):
        v = float(arr[0])
        return v, v, v
    mean = float(arr.mean())
    means = _resampled_means(arr, np.random.default_rng(seed), resamples)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def bootstrap_mean_diff_ci(
    a: Iterable[float | None],
    b: Iterable[float | None],
    seed: int = 0,
    resamples: int = 1000,
    confidence: float = 0.95,
) -> tuple[float | None, float | None, float | None]:
    """``(mean(a) − mean(b), low, high)``: the difference of two independent samples' means with a
    percentile-bootstrap interval (each sample resampled on its own, ``a`` then ``b`` from one
    ``default_rng(seed)`` stream). ``None`` values are skipped; an empty side gives ``(None, None, None)``."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    xa, xb = _clean(a), _clean(b)
    if xa.size == 0 or xb.size == 0:
        return None, None, None
    diff = float(xa.mean() - xb.mean())
    if np.all(xa == xa[0]) and np.all(xb == xb[0]):
        return diff, diff, diff
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(xa, rng, resamples) - _resampled_means(xb, rng, resamples)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return diff, float(low), float(high)


def bootstrap_pooled(
    sums: np.ndarray,
    figures: Callable[[np.ndarray], dict[str, np.ndarray]],
    seed: int = 0,
    resamples: int = 1000,
    confidence: float = 0.95,
) -> tuple[dict[str, float | None], dict[str, list[float | None]]]:
    """Figures pooled over units (problems) and their percentile-bootstrap intervals over units.

    ``sums`` is ``(units, m)``: each unit's additive counts (say, peaks and the entropy summed over them).
    ``figures`` maps pooled sums ``(..., m)`` to named figures (ratios of sums, a lift); it is applied to
    the column sums of all units, and to those of ``resamples`` resamples of the units with replacement
    drawn from ``numpy.random.default_rng(seed)``. A resample where a figure is undefined (NaN: a zero
    denominator) is left out of that figure's interval. Returns ``(values, intervals)``, ``None`` where
    undefined. Resampling units, not tokens, keeps a long response from counting as many independent
    observations."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2:
        raise ValueError("sums must be (units, columns)")
    units = sums.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        point = figures(sums.sum(0))
        if units == 0:
            return {k: None for k in point}, {k: [None, None] for k in point}
        idx = np.random.default_rng(seed).integers(0, units, size=(resamples, units))
        resampled = figures(sums[idx].sum(1))
    alpha = (1.0 - confidence) / 2.0
    values = {k: _finite_or_none(v) for k, v in point.items()}
    intervals: dict[str, list[float | None]] = {}
    for name, draws in resampled.items():
        kept = np.asarray(draws, dtype=np.float64)
        kept = kept[np.isfinite(kept)]
        if kept.size == 0:
            intervals[name] = [None, None]
            continue
        low, high = np.quantile(kept, [alpha, 1.0 - alpha])
        intervals[name] = [float(low), float(high)]
    return values, intervals


def _finite_or_none(value: Any) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None
