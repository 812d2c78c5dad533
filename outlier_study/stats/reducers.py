"""The reference reducer of one (layer, tap): fed inside a forward hook, it keeps only small summaries.

`TapReducer` is the specification: torch and numpy passes that run on any device. The fused reducer
(`stats.fused`, one compiled pass per window on CPU) and the device reducer (`stats.device_reducer`) are
tested equal to it; the fused one merges its updates into the running state with the same code
(`stats.tapstats.TapState`). Kept top-k entries are ordered by `tapstats.top_order` (of equal |a|, the
earlier window, token, channel).

A hook sees each activation once and must not hold on to it (a 17-tap x 30-layer profile would not fit
in memory otherwise), so every statistic here is mergeable across `update` calls: running top-k, Chan
merging of per-channel (count, mean, M2), Pebay merging of global central moments, and exact per-window
medians (a window always arrives whole in one call).

Cost matters as much as correctness (the whole profile may add at most ~30% to a forward pass):
- work runs on chunks of whole windows of about `_CHUNK_ELEMENTS` values, in reused scratch buffers, so the
  few elementwise passes hit the last-level cache instead of streaming fresh full-batch temporaries;
- an all-finite, unmasked chunk takes a fast path: one `abs`, one column max that doubles as the non-finite
  check (NaN and inf propagate), four elementwise passes and five column sums for the moments, one numpy
  partition per window for the exact median (~10x faster than torch.median on CPU), the top-k search only
  when the chunk's max could enter the running top-k, the massive-activation count only in windows whose
  max exceeds `ma_abs`; per-group merging is float64 numpy on (C,)-sized arrays;
- masks are only built when a valid mask is given or non-finite values show up.

Per-channel moments merge with `stats.moments.merge_channel_moments` (the rule ChannelReducer uses too).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

from outlier_study.stats.selection import rank_value, use_numpy_select
from outlier_study.stats.tapstats import StatsByTap, TapState, TapStats, TopEntry, combine_groups

# The result types live in stats/tapstats.py (shared with the device reducer); imported from here too.
__all__ = ["StatsByTap", "TapReducer", "TapStats", "TopEntry", "release_scratch"]

# Above this |a| the float32 fourth powers used for the moments could overflow: such batches go float64.
_F32_MOMENT_LIMIT = 1e8
_INVALID = -1.0  # |a| is >= 0, so -1 marks excluded entries in the abs buffer (never a top-k or MA hit)
# Chunk size in elements (4 MiB of float32): the input slice, |a| and two moment buffers stay cache-sized.
_CHUNK_ELEMENTS = 1 << 20
_PROBE = np.random.default_rng(0)  # median probing only (thread-safe); results do not depend on it

_scratch_local = threading.local()


def _scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer per (slot, dtype, device) and thread, grown on demand.

    Allocating a fresh multi-MiB temporary per hook call costs page faults and cache misses; reusing one
    keeps it warm. The buffers hold only scratch values of the last chunk, never a reference to an input.
    """
    cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] | None = getattr(
        _scratch_local, "buffers", None
    )
    if cache is None:
        cache = _scratch_local.buffers = {}
    key = (slot, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor stays writable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers (e.g. after profiling, before a memory-hungry step)."""
    _scratch_local.buffers = {}


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


def _fill_excluded(t: torch.Tensor, keep: torch.Tensor, value: float) -> None:
    """t[~keep] = value in place; torch.where is 2-3x faster than masked_fill_ on CPU and needs no ~keep."""
    torch.where(keep, t, torch.full((), value, dtype=t.dtype, device=t.device), out=t)


def iter_chunks(x: torch.Tensor, chunk_elements: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first window, chunk) over whole windows of x (B, T, C), about `chunk_elements` values each. A chunk
    that is not float32/64 or not contiguous is upcast / compacted into a scratch buffer, one chunk at a
    time: no full-size float32 copy of the batch. Each chunk is only valid until the next is drawn."""
    B, T, C = x.shape
    step = max(1, chunk_elements // (T * C))
    for lo in range(0, B, step):
        xc = x[lo : lo + step]
        if xc.dtype not in (torch.float32, torch.float64) or not xc.is_contiguous():
            dtype = xc.dtype if xc.dtype == torch.float64 else torch.float32
            xc = _scratch("x", xc.numel(), dtype, xc.device).view(xc.shape).copy_(xc)
        yield lo, xc


def column_candidates(a: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window index, channel index and the (k, T) values of the chosen (window, channel) columns of
    a (B, T, C) (indices flat over B*C): the top-k elements lie in the k columns with the largest max, so
    only those k*T values are searched instead of a full-tensor topk (which copies everything on CPU)."""
    C = a.shape[2]
    b_idx = torch.div(cols, C, rounding_mode="floor")
    c_idx = cols % C
    return b_idx, c_idx, a[b_idx, :, c_idx]


def top_rows(
    xc: torch.Tensor,
    b_idx: torch.Tensor,
    c_idx: torch.Tensor,
    vals: torch.Tensor,
    flat: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """Rows (abs, value, window, token, channel), float64, of the candidates picked at `flat` (indices into
    the flattened (k, T) candidates of `column_candidates`) with their |a| `vals`."""
    T = xc.shape[1]
    j = torch.div(flat, T, rounding_mode="floor")
    t_idx = flat % T
    bb, cc = b_idx[j], c_idx[j]
    cols = (vals, xc[bb, t_idx, cc], bb + offset, t_idx, cc)
    return torch.stack([c.to(torch.float64) for c in cols], dim=1)


class TapReducer(TapState):
    """The reference reducer (torch and numpy passes over chunks of windows; arguments of `TapState`):
    streaming statistics of one tap; `update` never keeps a reference to the activation it is fed."""

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        """x: (B, T, C) activation of B windows (global indices window_offset..window_offset+B-1), any float
        dtype (float16/bfloat16 are upcast to float32). valid: optional bool tensor broadcastable to x; False
        entries (e.g. masked attention scores) are excluded from EVERY statistic and do not count as elements.
        Non-finite valid entries are counted in nan_count/inf_count and otherwise treated as invalid."""
        x = self._begin(x, window_offset)
        if x is None:
            return
        B, T, C = x.shape

        mask: torch.Tensor | None = None  # entries that enter the statistics; None = all of them
        if valid is not None:
            valid = valid.to(device=x.device, dtype=torch.bool)
            if not bool(valid.view(torch.uint8).min()):  # ~30x faster than valid.all() on CPU
                mask = valid.expand(B, T, C)
        groups: list[torch.Tensor] = []  # (6, C) moment sums per row block, see _block_moments
        absmax: list[torch.Tensor] = []  # (C,) per chunk
        tops: list[torch.Tensor] = []  # (m, 5) top-k candidates per chunk
        for lo, xc in iter_chunks(x, _CHUNK_ELEMENTS):
            chunk_mask = None if mask is None else mask[lo : lo + xc.shape[0]]
            self._update_chunk(xc, chunk_mask, window_offset + lo, groups, absmax, tops)
        if groups:
            self._merge_moments_and_channels(torch.stack(groups).cpu().numpy(), absmax)
        if tops:
            self._merge_top(torch.cat(tops).tolist())

    def _update_chunk(
        self,
        xc: torch.Tensor,
        mc: torch.Tensor | None,
        offset: int,
        groups: list[torch.Tensor],
        absmax: list[torch.Tensor],
        tops: list[torch.Tensor],
    ) -> None:
        bw, T, C = xc.shape
        a = _scratch("abs", xc.numel(), xc.dtype, xc.device).view(bw, T, C)
        torch.abs(xc, out=a)
        if mc is not None:
            _fill_excluded(a, mc, _INVALID)
        wc = a.amax(dim=1)  # (bw, C) column maxima
        wmax = wc.amax(dim=1).tolist()  # per window; NaN and inf propagate: this one sync is the
        if not all(map(math.isfinite, wmax)):  # fast path's non-finite check
            mc = self._exclude_nonfinite(xc, a, mc)
            wc = a.amax(dim=1)
            wmax = wc.amax(dim=1).tolist()
        top = max(wmax)
        if top >= 0.0:  # else: no valid finite element in the whole chunk
            self._max_abs = max(self._max_abs, top)
        if self.channel_stats:
            absmax.append(wc.amax(dim=0))
        if self.top_k and (len(self._top) < self.top_k or top >= self._top[-1].abs):
            tops.append(self._chunk_top(xc, a, wc, offset))  # else none can enter (ties: see top_order)
        if self.moments:
            rows = bw * T
            block = max(1, _CHUNK_ELEMENTS // C)
            x2 = xc.view(rows, C)
            m2 = None if mc is None else mc.reshape(rows, C)
            use64 = top > _F32_MOMENT_LIMIT
            for r in range(0, rows, block):
                mb = None if m2 is None else m2[r : r + block]
                groups.append(self._block_moments(x2[r : r + block], mb, use64))
        # Last: partitions `a` in place, which destroys the layout the steps above need.
        self._chunk_medians_and_ma(a, mc, wmax, offset)

    def _exclude_nonfinite(self, xc: torch.Tensor, a: torch.Tensor, mc: torch.Tensor | None) -> torch.Tensor:
        """Slow path: count nan/inf among valid entries, then drop them like invalid ones."""
        finite = torch.isfinite(xc)
        nan = torch.isnan(xc)
        nonfinite = ~finite
        if mc is not None:
            nan &= mc
            nonfinite &= mc
            finite &= mc
        n_nan = int(torch.count_nonzero(nan))
        self._nan += n_nan
        self._inf += int(torch.count_nonzero(nonfinite)) - n_nan
        _fill_excluded(a, finite, _INVALID)
        return finite

    def _chunk_top(self, xc: torch.Tensor, a: torch.Tensor, wc: torch.Tensor, offset: int) -> torch.Tensor:
        """Candidate rows of `top_rows`, from the k columns with the largest max (ties: any order)."""
        bw, _, C = a.shape
        _, col = wc.reshape(-1).topk(min(self.top_k, bw * C))
        b_idx, c_idx, cand = column_candidates(a, col)
        vals, flat = cand.reshape(-1).topk(min(self.top_k, cand.numel()))
        return top_rows(xc, b_idx, c_idx, vals, flat, offset)

    @staticmethod
    def _block_moments(
        xb: torch.Tensor, mb: torch.Tensor | None, use64: bool, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(count, shift, S1, S2, S3, S4) per channel, float64, where S_p = sum over valid rows of
        (a - shift)^p and shift is the block's float32 channel mean: centring first keeps float32 exact
        enough when a channel's mean dwarfs its spread (1e4 vs 1). Four elementwise passes in reused
        buffers and five column sums; everything else is (C,)-sized.
        `scale` (C,), powers of two, divides the block first and multiplies the sums back in float64: exact,
        and the float32 fourth powers of huge values cannot overflow (the device path's way, which cannot
        look at the data to choose float64)."""
        rows, C = xb.shape
        dtype = torch.float64 if use64 else xb.dtype  # fourth powers of |a| > 1e8 overflow float32
        dev = xb.device
        d = _scratch("d", xb.numel(), dtype, dev).view(rows, C)
        d2 = _scratch("d2", xb.numel(), dtype, dev).view(rows, C)
        if scale is not None:
            xb = torch.div(xb, scale, out=d2)
        elif dtype != xb.dtype:
            xb = d2.copy_(xb)
        if mb is None:
            count = torch.full((C,), rows, dtype=dtype, device=dev)
            shift = xb.sum(0).div_(rows)
            torch.sub(xb, shift, out=d)
        else:
            torch.where(mb, xb, torch.zeros((), dtype=dtype, device=dev), out=d)  # also drops nan/inf
            keep = d2.copy_(mb)  # 0/1 mask in the (now free) d2 buffer
            count = keep.sum(0)
            shift = d.sum(0).div_(count.clamp(min=1.0))
            d.sub_(shift).mul_(keep)  # values are finite now, so a multiply re-zeroes the excluded ones
        torch.mul(d, d, out=d2)
        s1 = d.sum(0)
        s2 = d2.sum(0)
        s3 = d.mul_(d2).sum(0)
        s4 = d2.square_().sum(0)
        sums = torch.stack([count, shift, s1, s2, s3, s4]).to(torch.float64)
        if scale is not None:
            s = scale.to(torch.float64)
            sq = s * s
            sums[1:] *= torch.stack([s, s, sq, sq * s, sq * sq])
        return sums

    def _merge_moments_and_channels(self, groups: np.ndarray, absmax: list[torch.Tensor]) -> None:
        """Merge the batch's (G, 6, C) block sums (see `combine_groups`) into the running state."""
        moments, channels = combine_groups(groups, self.channel_stats)
        if moments[0] > 0:
            self._merge_moments(moments)
        if channels is None:
            return
        # Channels without a valid element carry -1 (_INVALID) here; result() reports them as nan anyway.
        ch_max = (absmax[0] if len(absmax) == 1 else torch.stack(absmax).amax(dim=0)).cpu().numpy()
        self._merge_channels(*channels, ch_max)

    def _chunk_medians_and_ma(
        self, a: torch.Tensor, mc: torch.Tensor | None, wmax: list[float], offset: int
    ) -> None:
        """Exact lower median of each window's valid |a|, then the massive-activation count: the rule of
        `stats.massive.is_massive`, specialized to one comparison against a threshold rounded to the data's
        dtype (tests hold the two equal). Excluded entries
        are exactly the negative ones (-1): on CPU they are dropped by compaction, which is cheaper than
        selecting among them; on the device path they sort first, so the median is the element of rank
        n_invalid + (n_valid - 1) // 2."""
        bw = a.shape[0]
        rows = a.view(bw, -1)
        per_row = rows.shape[1]
        rows_np = rows.numpy() if use_numpy_select(rows) else None
        np_dtype = np.dtype(np.float64 if a.dtype == torch.float64 else np.float32)
        for b in range(bw):
            if rows_np is not None:
                row_np = rows_np[b] if mc is None else rows_np[b][rows_np[b] >= 0.0]
                nv = row_np.size
            else:
                nv = per_row if mc is None else int((rows[b] >= 0.0).sum())
            self._count += nv
            if nv == 0:
                self._medians[offset + b] = math.nan
                continue
            if rows_np is not None:
                med = rank_value(row_np, (nv - 1) // 2, _PROBE)  # may reorder: scratch or a copy
            else:
                rank = (per_row - nv) + (nv - 1) // 2
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
