"""Streaming reducers for one (layer, tap): fed inside a forward hook, they keep only small summaries.

A hook sees each activation once and must not hold on to it (a 17-tap x 30-layer profile would not fit
in memory otherwise), so every statistic here is mergeable across `update` calls: running top-k, Chan
merging of per-channel (count, mean, M2), Pebay merging of global central moments, and exact per-window
medians (a window always arrives whole in one call).

Cost matters as much as correctness (the whole profile may add at most ~30% to a forward pass), so an
all-finite, unmasked batch takes a fast path: one `abs`, one reduction that doubles as the non-finite
check, four matrix-vector column sums for the moments and one numpy partition per window for the median.
Masks are only built when a valid mask is given or non-finite values show up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Above this |a| the float32 fourth powers used for the moments could overflow: such batches go float64.
_F32_MOMENT_LIMIT = 1e8
_INVALID = -1.0  # |a| is >= 0, so -1 marks excluded entries in the abs buffer (never a top-k or MA hit)


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


_Moments = tuple[float, float, float, float, float]  # (n, mean, M2, M3, M4); M_p = sum of (a - mean)^p
_EMPTY_MOMENTS: _Moments = (0.0, 0.0, 0.0, 0.0, 0.0)


def _merge_moments(a: _Moments, b: _Moments) -> _Moments:
    """Pebay's pairwise update of central moments: stable when the mean is large relative to the std."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    dn = delta / n
    mean = ma + nb * dn
    m2 = m2a + m2b + delta * dn * na * nb
    m3 = m3a + m3b + delta * dn * dn * na * nb * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + delta * dn**3 * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * dn * dn * (na * na * m2b + nb * nb * m2a)
        + 4.0 * dn * (na * m3b - nb * m3a)
    )
    return (n, mean, m2, m3, m4)


def _ceil_to(value: float, dtype: np.dtype) -> float:
    """Smallest `dtype` number >= value, so `a >= result` in that dtype equals `a >= value` exactly."""
    v = dtype.type(value)
    if float(v) < value:
        v = np.nextafter(v, dtype.type(np.inf))
    return float(v)


def _floor_to(value: float, dtype: np.dtype) -> float:
    """Largest `dtype` number <= value, so `a > result` in that dtype equals `a > value` exactly."""
    v = dtype.type(value)
    if float(v) > value:
        v = np.nextafter(v, dtype.type(-np.inf))
    return float(v)


def _use_numpy_select(t: torch.Tensor) -> bool:
    """numpy's SIMD partition is ~10x faster than torch.median on CPU; on GPUs stay on the device."""
    return t.device.type == "cpu"


class TapReducer:
    """Streaming statistics of one tap; `update` never keeps a reference to the activation it is fed."""

    def __init__(
        self, top_k: int = 3, ma_abs: float = 100.0, ma_ratio: float = 1000.0, channel_stats: bool = True
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = top_k
        self.ma_abs = float(ma_abs)
        self.ma_ratio = float(ma_ratio)
        self.channel_stats = channel_stats
        self._n_windows = 0
        self._nan = 0
        self._inf = 0
        self._max_abs = -math.inf
        self._top: list[TopEntry] = []
        self._medians: dict[int, float] = {}
        self._ma = 0
        self._moments: _Moments = _EMPTY_MOMENTS
        self._channels: int | None = None
        self._ch_count: np.ndarray | None = None
        self._ch_mean: np.ndarray | None = None
        self._ch_m2: np.ndarray | None = None
        self._ch_absmax: np.ndarray | None = None
        self._ones: torch.Tensor | None = None  # cached column-sum vector (reused across same-shape calls)

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        """x: (B, T, C) activation of B windows (global indices window_offset..window_offset+B-1), any float
        dtype (float16/bfloat16 are upcast to float32). valid: optional bool tensor broadcastable to x; False
        entries (e.g. masked attention scores) are excluded from EVERY statistic and do not count as elements.
        Non-finite valid entries are counted in nan_count/inf_count and otherwise treated as invalid."""
        if x.dim() != 3:
            raise ValueError(f"expected a (B, T, C) tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating tensor, got {x.dtype}")
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        x = x.contiguous()
        B, T, C = x.shape
        if self._channels is None:
            self._channels = C
        elif C != self._channels:
            raise ValueError(f"channel count changed from {self._channels} to {C}")
        self._n_windows += B
        if x.numel() == 0:
            for b in range(B):
                self._medians[window_offset + b] = math.nan
            return

        a = x.abs()  # our own buffer: masked in place and partitioned in place below
        mask: torch.Tensor | None = None  # entries that enter the statistics; None = all of them
        if valid is not None:
            valid = valid.to(device=x.device, dtype=torch.bool)
            if not bool(valid.all()):
                mask = valid.expand(B, T, C)
                a.masked_fill_(~mask, _INVALID)
        wc_max = a.amax(dim=1)  # (B, C); NaN propagates, so this is also the non-finite check
        if not bool(torch.isfinite(wc_max).all()):
            mask, wc_max = self._exclude_nonfinite(x, a, mask)

        self._update_top(x, a, wc_max, window_offset)
        finite_max = self._update_max_and_channel_absmax(wc_max)
        self._update_moments(x, mask, finite_max)
        # Last: partitions `a` in place, which destroys the layout the top-k and channel steps need.
        self._update_medians_and_ma(a, mask, wc_max, window_offset)

    def _exclude_nonfinite(
        self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slow path: count nan/inf among valid entries, then drop them like invalid ones."""
        finite = torch.isfinite(x)
        nan = torch.isnan(x)
        nonfinite = ~finite
        if mask is not None:
            nan &= mask
            nonfinite &= mask
            finite &= mask
        n_nan = int(torch.count_nonzero(nan))
        self._nan += n_nan
        self._inf += int(torch.count_nonzero(nonfinite)) - n_nan
        a.masked_fill_(~finite, _INVALID)
        return finite, a.amax(dim=1)

    def _update_top(self, x: torch.Tensor, a: torch.Tensor, wc_max: torch.Tensor, offset: int) -> None:
        """The top-k elements lie in the k (window, channel) columns with the largest column max: only those
        k*T values are searched, instead of a full-tensor topk (which copies everything on CPU)."""
        k = self.top_k
        if k == 0:
            return
        B, T, C = a.shape
        kc = min(k, B * C)
        _, col = wc_max.reshape(-1).topk(kc)
        b_idx = torch.div(col, C, rounding_mode="floor")
        c_idx = col % C
        cand = a[b_idx, :, c_idx]  # (kc, T)
        vals, flat = cand.reshape(-1).topk(min(k, kc * T))
        j = torch.div(flat, T, rounding_mode="floor")
        t_idx = flat % T
        bb, cc = b_idx[j], c_idx[j]
        signed = x[bb, t_idx, cc]
        rows = torch.stack([t.to(torch.float64) for t in (vals, signed, bb, t_idx, cc)], dim=1).tolist()
        new = [
            TopEntry(value=s, abs=v, window=offset + int(b), token=int(t), channel=int(c))
            for v, s, b, t, c in rows
            if v >= 0.0  # _INVALID entries are negative
        ]
        merged = self._top + new
        merged.sort(key=lambda e: e.abs, reverse=True)
        self._top = merged[:k]

    def _update_max_and_channel_absmax(self, wc_max: torch.Tensor) -> float:
        """Returns the batch's max |a| over valid finite entries (-inf if none)."""
        if self.channel_stats:
            ch = wc_max.amax(dim=0).to(torch.float64).cpu().numpy()
            ch = np.where(ch < 0.0, -np.inf, ch)
            self._ch_absmax = ch if self._ch_absmax is None else np.maximum(self._ch_absmax, ch)
            batch_max = float(ch.max())
        else:
            batch_max = float(wc_max.max())
            batch_max = batch_max if batch_max >= 0.0 else -math.inf
        self._max_abs = max(self._max_abs, batch_max)
        return batch_max

    def _column_ones(self, n: int, like: torch.Tensor) -> torch.Tensor:
        ones = self._ones
        if ones is None or ones.numel() != n or ones.dtype != like.dtype or ones.device != like.device:
            ones = torch.ones(n, dtype=like.dtype, device=like.device)
            self._ones = ones
        return ones

    def _update_moments(self, x: torch.Tensor, mask: torch.Tensor | None, finite_max: float) -> None:
        """Per-channel power sums of (a - batch channel mean) via matrix-vector column sums (BLAS speed, short
        float32 accumulations of T*B terms), turned into central moments in float64, then merged: per channel
        with Chan's formula and, across channels and batches, with Pebay's formulas for M2..M4."""
        B, T, C = x.shape
        n_rows = B * T
        x2 = x.view(n_rows, C)
        if finite_max > _F32_MOMENT_LIMIT and x2.dtype != torch.float64:
            x2 = x2.double()  # fourth powers of such values would overflow float32
        ones = self._column_ones(n_rows, x2)
        if mask is None:
            count = torch.full((C,), n_rows, dtype=torch.int64, device=x.device)
            shift = (ones @ x2) / n_rows
            d = x2 - shift
        else:
            m2 = mask.reshape(n_rows, C)
            excluded = ~m2
            count = n_rows - torch.count_nonzero(excluded, dim=0)
            xm = x2.masked_fill(excluded, 0.0)
            shift = (ones @ xm) / count.clamp(min=1).to(xm.dtype)
            d = xm.sub_(shift).masked_fill_(excluded, 0.0)
        d2 = d * d
        s1 = ones @ d
        s2 = ones @ d2
        d.mul_(d2)
        s3 = ones @ d
        d2.square_()
        s4 = ones @ d2
        packed = torch.stack([count.to(x2.dtype), shift, s1, s2, s3, s4]).to(torch.float64).cpu().numpy()
        n, k, s1n, s2n, s3n, s4n = packed
        has = n > 0
        n_safe = np.where(has, n, 1.0)
        delta = np.where(has, s1n / n_safe, 0.0)  # offset of the true channel mean from the float32 shift
        mean_c = np.where(has, k + delta, 0.0)
        m2_c = np.maximum(s2n - n * delta**2, 0.0)
        m3_c = s3n - 3.0 * delta * s2n + 2.0 * n * delta**3
        m4_c = np.maximum(s4n - 4.0 * delta * s3n + 6.0 * delta**2 * s2n - 3.0 * n * delta**4, 0.0)

        n_tot = float(n.sum())
        if n_tot > 0:
            mean = float((n * mean_c).sum() / n_tot)
            e = np.where(has, mean_c - mean, 0.0)
            bm2 = float((m2_c + n * e**2).sum())
            bm3 = float((m3_c + 3.0 * e * m2_c + n * e**3).sum())
            bm4 = float((m4_c + 4.0 * e * m3_c + 6.0 * e**2 * m2_c + n * e**4).sum())
            self._moments = _merge_moments(self._moments, (n_tot, mean, bm2, bm3, bm4))

        if self.channel_stats:
            if self._ch_count is None:
                self._ch_count = np.zeros(C)
                self._ch_mean = np.zeros(C)
                self._ch_m2 = np.zeros(C)
            na, ma, m2a = self._ch_count, self._ch_mean, self._ch_m2
            tot = na + n
            frac = np.divide(n, tot, out=np.zeros(C), where=tot > 0)
            dm = mean_c - ma
            self._ch_mean = ma + dm * frac
            self._ch_m2 = m2a + m2_c + dm * dm * na * frac
            self._ch_count = tot

    def _update_medians_and_ma(
        self, a: torch.Tensor, mask: torch.Tensor | None, wc_max: torch.Tensor, offset: int
    ) -> None:
        """Exact lower median of each window's valid |a| (excluded entries are -1, i.e. sorted first, so the
        median is the element of rank n_invalid + (n_valid - 1) // 2), then the massive-activation count."""
        B = a.shape[0]
        rows = a.view(B, -1)
        per_row = rows.shape[1]
        if mask is None:
            n_valid = [per_row] * B
        else:
            n_valid = torch.count_nonzero(mask.reshape(B, -1), dim=1).tolist()
        wmax = wc_max.amax(dim=1).tolist()
        use_np = _use_numpy_select(rows)
        rows_np = rows.numpy() if use_np else None
        np_dtype = np.dtype(np.float64 if a.dtype == torch.float64 else np.float32)
        for b in range(B):
            nv = int(n_valid[b])
            if nv == 0:
                self._medians[offset + b] = math.nan
                continue
            rank = (per_row - nv) + nv // 2
            if rows_np is not None:
                row_np = rows_np[b]
                row_np.partition(rank)  # in place: `a` is our own scratch buffer
                med = float(row_np[rank])
            else:
                med = float(torch.kthvalue(rows[b], rank + 1).values)
            self._medians[offset + b] = med
            if wmax[b] <= self.ma_abs:
                continue
            ratio_thr = self.ma_ratio * med
            if ratio_thr > self.ma_abs:  # |a| >= ratio_thr already implies |a| > ma_abs
                thr = _ceil_to(ratio_thr, np_dtype)
                hits = np.count_nonzero(row_np >= thr) if rows_np is not None else (rows[b] >= thr).sum()
            else:  # |a| > ma_abs already implies |a| >= ratio_thr
                thr = _floor_to(self.ma_abs, np_dtype)
                hits = np.count_nonzero(row_np > thr) if rows_np is not None else (rows[b] > thr).sum()
            self._ma += int(hits)

    # ------------------------------------------------------------------ result

    def result(self) -> TapStats:
        """Snapshot of the statistics so far; copies everything, so later updates are not disturbed."""
        n, mean, m2, _, m4 = self._moments
        if n > 0:
            std = math.sqrt(m2 / n)
            kurt = n * m4 / (m2 * m2) if m2 > 0 else math.nan
        else:
            mean = std = kurt = math.nan
        medians = [self._medians[w] for w in sorted(self._medians)]
        finite_medians = [m for m in medians if not math.isnan(m)]
        median_abs = sum(finite_medians) / len(finite_medians) if finite_medians else math.nan

        ch_mean = ch_std = ch_absmax = ch_count = None
        if self.channel_stats and self._ch_count is not None:
            cnt = self._ch_count
            has = cnt > 0
            ch_mean = np.where(has, self._ch_mean, np.nan)
            ch_std = np.sqrt(np.divide(self._ch_m2, cnt, out=np.full(cnt.shape, np.nan), where=has))
            ch_absmax = np.where(has, self._ch_absmax, np.nan)
            ch_count = cnt.astype(np.int64)
        return TapStats(
            n_windows=self._n_windows,
            n_elements=int(n),
            nan_count=self._nan,
            inf_count=self._inf,
            max_abs=self._max_abs if n > 0 else math.nan,
            top=[TopEntry(e.value, e.abs, e.window, e.token, e.channel) for e in self._top],
            window_medians=medians,
            median_abs=median_abs,
            ma_count=self._ma,
            mean=mean,
            std=std,
            kurtosis=kurt,
            channel_mean=ch_mean,
            channel_std=ch_std,
            channel_absmax=ch_absmax,
            channel_count=ch_count,
        )
