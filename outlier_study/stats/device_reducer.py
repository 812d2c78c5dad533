"""TapReducer's statistics without a host synchronisation per hook, for models on a GPU.

On CUDA every `.item()`, `.tolist()`, numpy conversion, Python branch on a tensor's value or op with a
data-dependent shape (`nonzero`, boolean indexing) waits until the device has drained its queue; a profile
with hundreds of taps would stall the GPU hundreds of times per forward pass. `DeviceTapReducer.update`
uses only torch ops whose shapes follow from the input's shape, keeps its whole state in tensors on the
input's device, and `result()` brings that state to the host in one transfer. It reports what TapReducer
reports, by the same rules (the tests hold the two equal on CPU tensors):
- excluded entries (valid False, or non-finite) are NaN in the |a| buffer, so `torch.nanmedian` gives
  each window's exact lower median (NaN for a window without elements) and the MA comparison skips them;
  then they become -1, below every |a|, for the max, the column maxima and the top-k;
- top-k ties break by position (window, token, channel), as a stable sort of all windows would, so the
  entries depend neither on chunking nor on update order;
- per-channel moments are float64 sums (count, shift, S1..S4) about a fixed per-channel shift; each
  batch's block sums are re-centred onto it, and `result()` combines the channels as TapReducer combines
  its blocks (`stats.tapstats.combine_groups`);
- huge values: columns whose max |a| exceeds 1e8 are divided by a power of two before the float32 moment
  passes (exact), where TapReducer switches the batch to float64 after looking at its max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from outlier_study.stats.massive import ma_thresholds
from outlier_study.stats.moments import EMPTY_MOMENTS
from outlier_study.stats.reducers import (
    _F32_MOMENT_LIMIT,
    _INVALID,
    TapReducer,
    _fill_excluded,
    _scratch,
    column_candidates,
    iter_chunks,
    top_rows,
)
from outlier_study.stats.tapstats import TapStats, TopEntry, assemble_stats, check_tap_input, combine_groups

# Whole windows of about this many values per chunk: more than on CPU (fewer kernel launches), while the
# scratch buffers (|a|, two moment buffers, an upcast copy) stay at 64 MiB each in float32.
_CHUNK_ELEMENTS = 1 << 24


def _best_first(values: torch.Tensor, *ties: torch.Tensor) -> torch.Tensor:
    """The permutation that orders `values` descending, equal values by `ties` ascending (first key
    first): stable sorts from the least significant key, so the order is unique whatever the device."""
    order = torch.arange(values.numel(), device=values.device)
    for key in reversed(ties):
        order = order[torch.argsort(key[order], stable=True)]
    return order[torch.argsort(values[order], stable=True, descending=True)]


def _moment_scale(colmax: torch.Tensor) -> torch.Tensor:
    """Per column 1, or for a max |a| above 1e8 the power of two 2^(e-1) with colmax < 2^e, built from its
    bits (exact on every device): the scaled column stays below 2, its float32 fourth powers finite."""
    _, e = torch.frexp(colmax)
    if colmax.dtype == torch.float64:
        pow2 = ((e.to(torch.int64) + 1022) << 52).view(torch.float64)
    else:
        pow2 = ((e + 126) << 23).view(torch.float32)
    return torch.where(
        colmax > _F32_MOMENT_LIMIT, pow2, torch.ones((), dtype=colmax.dtype, device=colmax.device)
    )


@dataclass
class _State:
    """Everything a DeviceTapReducer has seen, on the device; normal (not inference) tensors, so they can be
    updated in place in and out of inference mode."""

    counts: torch.Tensor  # int64 (4,): elements, nan, inf, MA
    max_abs: torch.Tensor  # float64 (), -1 until an element
    top: torch.Tensor  # float64 (k, 5): abs (-1: none), value, window, token, channel
    medians: torch.Tensor  # float64 (capacity,), by global window
    sums: torch.Tensor  # float64 (6, C) per channel: count, shift, S1..S4 about the shift
    absmax: torch.Tensor  # float64 (C,)

    @classmethod
    def empty(cls, top_k: int, channels: int, device: torch.device) -> _State:
        f64 = {"dtype": torch.float64, "device": device}
        with torch.inference_mode(False):
            top = torch.zeros(top_k, 5, **f64)
            top[:, 0] = _INVALID
            return cls(
                counts=torch.zeros(4, dtype=torch.int64, device=device),
                max_abs=torch.full((), _INVALID, **f64),
                top=top,
                medians=torch.full((64,), math.nan, **f64),
                sums=torch.zeros(6, channels, **f64),
                absmax=torch.full((channels,), -math.inf, **f64),
            )

    def reserve(self, windows: int) -> None:
        """Room for the medians of windows 0..windows-1 (the capacity doubles: few reallocations)."""
        size = self.medians.numel()
        if windows > size:
            with torch.inference_mode(False):
                grown = torch.full(
                    (max(windows, 2 * size),), math.nan, dtype=torch.float64, device=self.medians.device
                )
                grown[:size] = self.medians
            self.medians = grown

    def absorb(self, groups: torch.Tensor) -> None:
        """Add (G, 6, C) block sums, re-centred onto the state's shift K: about K a group's sum of
        (a - K)^p is sum_q binom(p, q) f^(p-q) S_q with f = shift - K (S_0 = count), the expansion
        `combine_groups` uses. A channel without elements yet takes this batch's mean as its K."""
        n, shift = groups[:, 0], groups[:, 1]
        n_c = n.sum(0)
        batch_mean = (n * shift + groups[:, 2]).sum(0) / n_c.clamp(min=1.0)
        k = torch.where(self.sums[0] > 0, self.sums[1], batch_mean)
        f = shift - k
        powers = [torch.ones_like(f), f]
        for _ in range(3):
            powers.append(powers[-1] * f)
        sums = [n, *groups[:, 2:].unbind(1)]  # S_0..S_4, each (G, C)
        for p in range(1, 5):
            term = sum(math.comb(p, q) * powers[p - q] * sums[q] for q in range(p + 1))
            self.sums[p + 1] += term.sum(0)
        self.sums[0] += n_c
        self.sums[1] = k


class DeviceTapReducer:
    """TapReducer's interface and results; `update` never synchronizes with the device (module doc)."""

    def __init__(
        self,
        top_k: int = 3,
        ma_abs: float = 100.0,
        ma_ratio: float = 1000.0,
        channel_stats: bool = True,
        moments: bool = True,
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = top_k
        self.ma_abs = float(ma_abs)
        self.ma_ratio = float(ma_ratio)
        self.moments = moments
        self.channel_stats = channel_stats and moments
        self._n_windows = 0
        self._channels: int | None = None
        self._windows: set[int] = set()  # global indices seen: their medians are in the state
        self._fed = False  # an update with elements came (TapReducer has channel arrays from then on)
        self._state: _State | None = None

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        """As TapReducer.update; the input's device holds the state (all updates on one device)."""
        self._channels = check_tap_input(x, self._channels)
        x = x.detach()
        B, T, C = x.shape
        if self._state is None:
            self._state = _State.empty(self.top_k, C, x.device)
        state = self._state
        self._n_windows += B
        self._windows.update(range(window_offset, window_offset + B))
        state.reserve(window_offset + B)
        if x.numel() == 0:
            state.medians[window_offset : window_offset + B] = math.nan
            return
        self._fed = True
        mask = None if valid is None else valid.to(device=x.device, dtype=torch.bool).expand(B, T, C)
        groups: list[torch.Tensor] = []
        for lo, xc in iter_chunks(x, _CHUNK_ELEMENTS):
            chunk_mask = None if mask is None else mask[lo : lo + xc.shape[0]]
            self._update_chunk(state, xc, chunk_mask, window_offset + lo, groups)
        if groups:
            state.absorb(torch.stack(groups))

    def _update_chunk(
        self,
        state: _State,
        xc: torch.Tensor,
        mc: torch.Tensor | None,
        offset: int,
        groups: list[torch.Tensor],
    ) -> None:
        bw, T, C = xc.shape
        a = _scratch("abs", xc.numel(), xc.dtype, xc.device).view(bw, T, C)
        torch.abs(xc, out=a)
        keep = torch.isfinite(a)  # entries that enter the statistics
        nan = torch.isnan(a)
        if mc is not None:
            keep &= mc
            nan &= mc
        n_keep, n_nan = keep.sum(), nan.sum()
        n_valid = xc.numel() if mc is None else mc.sum()

        _fill_excluded(a, keep, math.nan)
        rows = a.view(bw, -1)
        median = torch.nanmedian(rows, dim=1).values  # exact lower median of the kept |a|; NaN: none
        state.medians[offset : offset + bw] = median
        hits = (rows >= ma_thresholds(median, self.ma_abs, self.ma_ratio)[:, None]).sum()
        state.counts += torch.stack([n_keep, n_nan, n_valid - n_keep - n_nan, hits])

        _fill_excluded(a, keep, _INVALID)
        wc, first = a.max(dim=1)  # (bw, C) column maxima and the first token holding each
        colmax = wc.amax(dim=0)
        torch.maximum(state.max_abs, colmax.amax().to(torch.float64), out=state.max_abs)
        if self.channel_stats:
            torch.maximum(state.absmax, colmax.to(torch.float64), out=state.absmax)
        if self.top_k:
            self._merge_top(state, self._chunk_top(xc, a, wc, first, offset))
        if self.moments:
            x2, keep2 = xc.view(bw * T, C), keep.view(bw * T, C)
            groups.append(TapReducer._block_moments(x2, keep2, False, _moment_scale(colmax)))

    def _chunk_top(
        self, xc: torch.Tensor, a: torch.Tensor, wc: torch.Tensor, first: torch.Tensor, offset: int
    ) -> torch.Tensor:
        """Candidate rows of `top_rows`: the k best columns by (max desc, position of their first max),
        then the k best of their values by (|a| desc, position): the k best elements by (|a| desc, position)
        of the chunk, ties included."""
        bw, T, C = a.shape
        dev = a.device
        window = torch.arange(bw, device=dev).view(bw, 1)
        channel = torch.arange(C, device=dev)
        pos = (window * T + first) * C + channel  # flat position of each column's first max
        cols = _best_first(wc.reshape(-1), pos.reshape(-1))[: min(self.top_k, bw * C)]
        b_idx, c_idx, cand = column_candidates(a, cols)
        token = torch.arange(T, device=dev)
        cand_pos = (b_idx[:, None] * T + token) * C + c_idx[:, None]
        flat = _best_first(cand.reshape(-1), cand_pos.reshape(-1))[: min(self.top_k, cand.numel())]
        return top_rows(xc, b_idx, c_idx, cand.reshape(-1)[flat], flat, offset)

    def _merge_top(self, state: _State, rows: torch.Tensor) -> None:
        merged = torch.cat([state.top, rows])
        order = _best_first(merged[:, 0], merged[:, 2], merged[:, 3], merged[:, 4])
        state.top = merged[order[: self.top_k]]

    # ------------------------------------------------------------------ result

    def result(self) -> TapStats:
        """Snapshot of the statistics so far: the state comes to the host in one transfer."""
        s = self._state
        if s is None:
            return assemble_stats(
                n_windows=0,
                n_elements=0,
                nan_count=0,
                inf_count=0,
                max_abs=math.nan,
                top=[],
                medians={},
                ma_count=0,
                moments=EMPTY_MOMENTS,
                channels=None,
            )
        parts = (s.counts, s.max_abs, s.top, s.sums, s.absmax, s.medians)
        host = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).cpu().numpy()
        counts, max_abs, top, sums, absmax, medians = np.split(
            host, np.cumsum([p.numel() for p in parts])[:-1]
        )
        n_elements, nan_count, inf_count, ma_count = (int(c) for c in counts)
        moments, channels = EMPTY_MOMENTS, None
        if self.moments and self._fed:
            moments, per_channel = combine_groups(sums.reshape(1, 6, -1), self.channel_stats)
            if per_channel is not None:
                channels = (*per_channel, absmax)
        return assemble_stats(
            n_windows=self._n_windows,
            n_elements=n_elements,
            nan_count=nan_count,
            inf_count=inf_count,
            max_abs=float(max_abs[0]),
            top=[
                TopEntry(value=float(v), abs=float(m), window=int(w), token=int(t), channel=int(c))
                for m, v, w, t, c in top.reshape(-1, 5)
                if m >= 0.0  # -1: fewer than k elements so far
            ],
            medians={w: float(medians[w]) for w in self._windows},
            ma_count=ma_count,
            moments=moments,
            channels=channels,
        )
