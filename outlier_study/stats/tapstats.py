"""What a tap reducer reports, and what every tap reducer shares: combining per-channel block sums into
moments, and assembling the result with its nan conventions (the CPU reducer and the device one keep
their state differently but must report it the same way)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from outlier_study.stats.moments import EMPTY_MOMENTS, ChannelMoments, Moments


@dataclass
class TopEntry:
    """One of the k largest |a| with its exact position, so outliers can be traced to tokens/channels."""

    value: float  # signed value
    abs: float
    window: int  # global window index
    token: int
    channel: int


@dataclass
class TapStats:
    """Summary of one (layer, tap) over all windows seen so far.

    Quantities that need at least one finite element (max_abs, mean, std, kurtosis, median_abs, channel
    values of channels without any element) are nan when there is none; counts are 0.
    `median_abs` is the mean of the per-window medians of |a| (nan medians of all-non-finite windows are
    ignored), not the median over all windows pooled: the exact pooled median cannot be streamed.
    """

    n_windows: int
    n_elements: int  # finite (and valid) elements that entered the statistics
    nan_count: int
    inf_count: int
    max_abs: float
    top: list[TopEntry]  # k largest |a| over all windows, descending by abs (ties: any order)
    window_medians: list[float]  # lower median |a| of each window, in window order (nan: no element)
    median_abs: float  # mean of the non-nan window_medians
    ma_count: int  # elements with |a| > ma_abs and |a| >= ma_ratio * (their window's median |a|)
    mean: float
    std: float  # population std
    kurtosis: float  # Pearson (non-excess) m4 / m2^2, Gaussian -> 3; nan if m2 == 0
    channel_mean: np.ndarray | None  # (C,) float64
    channel_std: np.ndarray | None  # (C,) population std
    channel_absmax: np.ndarray | None  # (C,)
    channel_count: np.ndarray | None  # (C,) finite (and valid) values per channel


StatsByTap = dict[tuple[int, str], TapStats]  # a profile's result: (layer, tap) -> its statistics


def combine_groups(groups: np.ndarray, channels: bool) -> tuple[Moments, ChannelMoments | None]:
    """Combine (G, 6, C) block sums (count, shift, S1..S4 per channel, see `TapReducer._block_moments`)
    into global central moments (EMPTY_MOMENTS without elements) and, with `channels`, per-channel
    (count, mean, M2).

    With f = shift - mean for a group, the group's sum of (a - mean)^p is the binomial expansion
    sum_q binom(p, q) f^(p-q) S_q (S_0 = count): exact algebra, no float32 left, and an empty group
    (count, shift and sums all 0) contributes nothing. Dot products keep this to ~20 numpy calls."""
    G, _, C = groups.shape
    moments = EMPTY_MOMENTS
    n, shift, s1, s2, s3, s4 = groups.transpose(1, 0, 2).reshape(6, G * C)
    n_tot = float(n.sum())
    if n_tot > 0:
        mean = float((np.dot(n, shift) + s1.sum()) / n_tot)
        f = shift - mean
        f2 = f * f
        f3 = f2 * f
        nf = n * f
        bm2 = float(s2.sum() + 2.0 * np.dot(f, s1) + np.dot(nf, f))
        bm3 = float(s3.sum() + 3.0 * np.dot(f, s2) + 3.0 * np.dot(f2, s1) + np.dot(nf, f2))
        bm4 = float(
            s4.sum() + 4.0 * np.dot(f, s3) + 6.0 * np.dot(f2, s2) + 4.0 * np.dot(f3, s1) + np.dot(nf, f3)
        )
        moments = (n_tot, mean, bm2, bm3, bm4)
    if not channels:
        return moments, None
    n, shift, s1, s2 = groups[:, 0], groups[:, 1], groups[:, 2], groups[:, 3]
    n_c = n.sum(axis=0)
    mean_c = (n * shift + s1).sum(axis=0) / np.maximum(n_c, 1.0)  # the sums are 0 where n_c is
    f = shift - mean_c
    m2_c = np.maximum((s2 + f * (2.0 * s1 + n * f)).sum(axis=0), 0.0)
    return moments, (n_c, mean_c, m2_c)


def assemble_stats(
    *,
    n_windows: int,
    n_elements: int,
    nan_count: int,
    inf_count: int,
    max_abs: float,
    top: list[TopEntry],
    medians: dict[int, float],
    ma_count: int,
    moments: Moments,
    channels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
) -> TapStats:
    """A TapStats from a reducer's state (medians by window; channels as (count, mean, M2, absmax)), with
    the nan conventions of TapStats; copies everything, so the reducer's later updates do not show."""
    n, mean, m2, _, m4 = moments
    if n > 0:  # moments skipped: n is 0, so all three are nan
        std = math.sqrt(m2 / n)
        kurt = n * m4 / (m2 * m2) if m2 > 0 else math.nan
    else:
        mean = std = kurt = math.nan
    window_medians = [medians[w] for w in sorted(medians)]
    finite_medians = [m for m in window_medians if not math.isnan(m)]
    median_abs = sum(finite_medians) / len(finite_medians) if finite_medians else math.nan

    ch_mean = ch_std = ch_absmax = ch_count = None
    if channels is not None:
        cnt, c_mean, c_m2, c_absmax = channels
        has = cnt > 0
        ch_mean = np.where(has, c_mean, np.nan)
        ch_std = np.sqrt(np.divide(c_m2, cnt, out=np.full(cnt.shape, np.nan), where=has))
        ch_absmax = np.where(has, c_absmax, np.nan)
        ch_count = cnt.astype(np.int64)
    return TapStats(
        n_windows=n_windows,
        n_elements=n_elements,
        nan_count=nan_count,
        inf_count=inf_count,
        max_abs=max_abs if n_elements > 0 else math.nan,
        top=[TopEntry(e.value, e.abs, e.window, e.token, e.channel) for e in top],
        window_medians=window_medians,
        median_abs=median_abs,
        ma_count=ma_count,
        mean=mean,
        std=std,
        kurtosis=kurt,
        channel_mean=ch_mean,
        channel_std=ch_std,
        channel_absmax=ch_absmax,
        channel_count=ch_count,
    )
