"""Exact rank selection (medians) on CPU, fast also when the data hold long runs of ties."""

from __future__ import annotations

import math

import numpy as np
import torch

# Exact rank selection (medians). Rows up to _SELECT_SMALL values are simply partitioned; larger ones are
# first probed with a random sample of _SELECT_SAMPLE values to see whether they are tie-heavy.
_SELECT_SMALL = 1 << 14
_SELECT_SAMPLE = 1024
_SELECT_TIE_FRACTION = 0.05


def rank_value(v: np.ndarray, rank: int, rng: np.random.Generator) -> float:
    """The exact `rank`-th smallest value of v (0-based); v is scratch and may be reordered in place.

    numpy's SIMD partition is ~10x faster than torch.median on CPU, but 20-50x slower when the target sits
    in a long run of equal values (masked entries, exact zeros after ReLU/softmax). A sorted sample reveals
    such ties (many equal neighbours); then the value is bracketed between two sample quantiles, the ties
    at the bracket ends are resolved by counting, and only the values strictly inside the bracket are
    partitioned.
    """
    n = v.size
    if n <= _SELECT_SMALL:
        v.partition(rank)
        return float(v[rank])
    m = _SELECT_SAMPLE
    sample = v[rng.integers(0, n, m)]
    sample.sort()
    if np.count_nonzero(sample[1:] == sample[:-1]) <= _SELECT_TIE_FRACTION * m:  # few ties: partition
        v.partition(rank)
        return float(v[rank])
    p = (rank + 0.5) / n
    margin = 4.0 * math.sqrt(p * (1.0 - p) / m) + 2.0 / m
    lo = sample[max(0, math.floor((p - margin) * m))]
    hi = sample[min(m - 1, math.ceil((p + margin) * m))]
    n_lt = int(np.count_nonzero(v < lo))
    n_eq_lo = int(np.count_nonzero(v == lo))
    if n_lt <= rank < n_lt + n_eq_lo:
        return float(lo)
    n_le_hi = n - int(np.count_nonzero(v > hi))
    n_eq_hi = int(np.count_nonzero(v == hi))
    if n_le_hi - n_eq_hi <= rank < n_le_hi:
        return float(hi)
    if not n_lt + n_eq_lo <= rank < n_le_hi - n_eq_hi:  # the sample bracket missed: rare, still exact
        v.partition(rank)
        return float(v[rank])
    inner = v[(v > lo) & (v < hi)]
    r = rank - n_lt - n_eq_lo
    inner.partition(r)
    return float(inner[r])


def use_numpy_select(t: torch.Tensor) -> bool:
    """numpy's SIMD partition is ~10x faster than torch.median on CPU; on GPUs stay on the device."""
    return t.device.type == "cpu"
