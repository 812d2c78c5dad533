"""What a tap's reducer hands back (`TapStats`) and what every tap reducer shares.

The reference reducer (`stats.reducers.TapReducer`) and the fused one (`stats.fused.FusedReducer`) differ
only in how one update is reduced; what an update's summary does to the running state (Pébay and Chan
merges, the top-k order, the window medians, the snapshot) has one body here (`TapState`), so the two
cannot drift. The device reducer (`stats.device_reducer`) keeps its state on the device instead, but
combines block sums (`combine_groups`) and reports (`assemble_stats`) through the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from outlier_study.stats.moments import (
    EMPTY_MOMENTS,
    ChannelMoments,
    Moments,
    merge_channel_moments,
    merge_moments,
)


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
    top: list[TopEntry]  # k largest |a| over all windows, descending by abs, ties by (window, token, channel)
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


def top_order(e: TopEntry) -> tuple[float, int, int, int]:
    """The top-k order: larger |a| first, ties to the earlier (window, token, channel), so the kept entries
    do not depend on how windows were batched into updates or in which order the updates came."""
    return (-e.abs, e.window, e.token, e.channel)


def check_tap_input(x: torch.Tensor, channels: int | None) -> int:
    """x must be a floating (B, T, C) tensor with the channel count of earlier updates (None: first)."""
    if x.dim() != 3:
        raise ValueError(f"expected a (B, T, C) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {x.dtype}")
    if channels is not None and x.shape[2] != channels:
        raise ValueError(f"channel count changed from {channels} to {x.shape[2]}")
    return x.shape[2]


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


class TapState:
    """The running statistics of one tap; subclasses reduce an update and merge it with these methods."""

    def __init__(
        self,
        top_k: int = 3,
        ma_abs: float = 100.0,
        ma_ratio: float = 1000.0,
        channel_stats: bool = True,
        moments: bool = True,
    ) -> None:
        """`moments=False` skips every moment (global and per channel: mean, std, kurtosis and the channel
        arrays come back nan / None), the costliest part of a tap; an experiment that reads only max,
        top-k, medians and MA counts asks for that."""
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = top_k
        self.ma_abs = float(ma_abs)
        self.ma_ratio = float(ma_ratio)
        self.moments = moments
        self.channel_stats = channel_stats and moments
        self._n_windows = 0
        self._nan = 0
        self._inf = 0
        self._max_abs = -math.inf
        self._top: list[TopEntry] = []
        self._medians: dict[int, float] = {}
        self._count = 0  # valid finite elements seen
        self._ma = 0
        self._moments: Moments = EMPTY_MOMENTS
        self._channels: int | None = None
        self._ch_count: np.ndarray | None = None
        self._ch_mean: np.ndarray | None = None
        self._ch_m2: np.ndarray | None = None
        self._ch_absmax: np.ndarray | None = None

    def _begin(self, x: torch.Tensor, window_offset: int) -> torch.Tensor | None:
        """Check an update's input and count its windows; None when it has no element (its windows get
        nan medians), else the detached tensor."""
        self._channels = check_tap_input(x, self._channels)
        self._n_windows += x.shape[0]
        if x.numel() == 0:
            for b in range(x.shape[0]):
                self._medians[window_offset + b] = math.nan
            return None
        return x.detach()

    def _merge_top(self, rows: list[list[float]]) -> None:
        """rows (abs, value, window, token, channel); negative abs marks an excluded entry."""
        new = [
            TopEntry(value=value, abs=absval, window=int(w), token=int(t), channel=int(c))
            for absval, value, w, t, c in rows
            if absval >= 0.0
        ]
        merged = self._top + new
        merged.sort(key=top_order)
        self._top = merged[: self.top_k]

    def _merge_channels(
        self, n_c: np.ndarray, mean_c: np.ndarray, m2_c: np.ndarray, ch_max: np.ndarray
    ) -> None:
        """An update's per-channel (count, mean, M2) and |a| max (negative: no element) into the state."""
        C = n_c.shape[0]
        if self._ch_count is None:
            self._ch_count, self._ch_mean, self._ch_m2 = np.zeros(C), np.zeros(C), np.zeros(C)
            self._ch_absmax = np.full(C, -np.inf)
        merged = merge_channel_moments((self._ch_count, self._ch_mean, self._ch_m2), (n_c, mean_c, m2_c))
        self._ch_count, self._ch_mean, self._ch_m2 = merged
        self._ch_absmax = np.maximum(self._ch_absmax, ch_max)

    def _merge_moments(self, moments: Moments) -> None:
        self._moments = merge_moments(self._moments, moments)

    def result(self) -> TapStats:
        """Snapshot of the statistics so far; copies everything, so later updates are not disturbed."""
        channels = None
        if self.channel_stats and self._ch_count is not None:
            channels = (self._ch_count, self._ch_mean, self._ch_m2, self._ch_absmax)
        return assemble_stats(
            n_windows=self._n_windows,
            n_elements=self._count,
            nan_count=self._nan,
            inf_count=self._inf,
            max_abs=self._max_abs,
            top=self._top,
            medians=self._medians,
            ma_count=self._ma,
            moments=self._moments,
            channels=channels,  # type: ignore[arg-type]
        )
