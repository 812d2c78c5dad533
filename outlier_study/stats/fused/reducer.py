"""FusedReducer: the statistics of `TapReducer` from one compiled pass over each window (`fused.cpp`).

The reference (`stats.reducers.TapReducer`) makes several torch/numpy passes and a numpy partition per
window; this one reads each tapped tensor once in the kernel, in float64 accumulators, and only the small
summary of an update crosses back: its moments, per-channel (count, mean, M2, |a| max), window medians,
counts and up to k top candidates. What that summary does to the running state is `TapState`'s, shared
with the reference. Its outputs land in buffers made once per reducer, so an update allocates nothing of
the tensor's size and runs a fixed handful of Python statements.

Agreement with the reference (tests/test_fused.py): counts, max |a|, window medians, MA counts, channel
counts and |a| max and the top-k entries are equal; the moments agree to float32 precision (both sum
float32 blocks into float64: the kernel's blocks are at most 64 rows of one lane, see `block_sums`).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from outlier_study.stats.tapstats import TapState

_NATIVE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # read by the kernel as they are


class FusedReducer(TapState):
    """Streaming statistics of one tap on CPU tensors through the compiled kernel (arguments of
    `TapState`, plus the loaded kernel module)."""

    def __init__(
        self,
        kernel: ModuleType,
        top_k: int = 3,
        ma_abs: float = 100.0,
        ma_ratio: float = 1000.0,
        channel_stats: bool = True,
        moments: bool = True,
    ) -> None:
        super().__init__(top_k, ma_abs, ma_ratio, channel_stats, moments)
        self._kernel = kernel
        self._hint = math.nan  # the last window median: brackets the next window's median in the kernel
        self._spread = 1.0 / 16.0  # that bracket's relative half-width, adapted by the kernel
        self.misses = 0  # windows whose median fell outside that bracket (one more pass; diagnostics)
        self.fallbacks = 0  # ... and outside a sampled one too (two more passes)
        self._gm = torch.zeros(13, dtype=torch.float64)
        self._gm_np = self._gm.numpy()
        self._medians_buf = torch.zeros(1, dtype=torch.float64)
        self._top_buf = torch.zeros(max(top_k, 1), 5, dtype=torch.float64)
        self._ch = torch.zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        """As `TapReducer.update`: x (B, T, C) on CPU, valid an optional bool mask broadcastable to x."""
        x = self._begin(x, window_offset)
        if x is None:
            return
        if x.device.type != "cpu":
            raise ValueError(f"the fused reducer reads CPU tensors, got {x.device} (use reducer=reference)")
        if x.dtype not in _NATIVE:
            x = x.float()  # other float types (e.g. float8) are rare: one upcast copy
        B, T, C = x.shape
        mask = None if valid is None else valid.to(device=x.device, dtype=torch.bool).expand(B, T, C)
        if self._medians_buf.numel() < B:
            self._medians_buf = torch.zeros(B, dtype=torch.float64)
        if self.channel_stats and self._ch.numel() != 4 * C:
            self._ch = torch.zeros(4, C, dtype=torch.float64)
        floor = self._top[-1].abs if self.top_k and len(self._top) == self.top_k else -1.0
        n_top = self._kernel.update(
            x,
            mask,
            window_offset,
            self.ma_abs,
            self.ma_ratio,
            self.top_k,
            self.moments,
            self.channel_stats,
            self._hint,
            self._spread,
            floor,
            self._gm,
            self._medians_buf,
            self._top_buf,
            self._ch,
        )
        n, mean, m2, m3, m4, nan, inf, good, ma, misses, max_abs, spread, fallbacks = self._gm_np.tolist()
        self._nan += int(nan)
        self._inf += int(inf)
        self._count += int(good)
        self._ma += int(ma)
        self.misses += int(misses)
        self.fallbacks += int(fallbacks)
        self._spread = spread
        if max_abs >= 0.0:
            self._max_abs = max(self._max_abs, max_abs)
        medians = self._medians_buf[:B].tolist()
        for b, med in enumerate(medians):
            self._medians[window_offset + b] = med
            if not math.isnan(med):
                self._hint = med
        if n > 0:
            self._merge_moments((n, mean, m2, m3, m4))
        if self.channel_stats:
            ch = self._ch.numpy()
            self._merge_channels(ch[0], ch[1], ch[2], ch[3])
        if n_top:
            self._merge_top(self._top_buf[:n_top].tolist())
