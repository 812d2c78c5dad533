"""FusedReducer: the statistics of `TapReducer` from one compiled pass over each window (`fused.cpp`).

The reference (`stats.reducers.TapReducer`) makes several torch/numpy passes and a numpy partition per
window; this one reads each tapped tensor once in the kernel, in float64 accumulators, and the kernel also
merges the update into the tap's running state (moments, per-channel (count, mean, M2, |a| max), counts,
the median hint) with the reference's merge rules, in buffers made once per reducer. An update is one
kernel call and a handful of Python statements (window medians and the running top-k stay here);
`result` hands the state to `TapState`'s assembly, shared with the reference.

Agreement with the reference (tests/test_fused.py): counts, max |a|, window medians, MA counts, channel
counts and |a| max and the top-k entries are equal; the moments agree to float32 precision (both sum
float32 blocks into float64: the kernel's blocks are at most 64 rows of one lane, see `block_sums`).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from outlier_study.stats.moments import EMPTY_MOMENTS
from outlier_study.stats.tapstats import TapState, TapStats

NATIVE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)  # read by the kernel as they are
# Slots of the kernel's running state (fused.cpp, `State`): n, mean, M2, M3, M4, then these (read in order
# by `result` up to the max |a|).
NAN, INF, GOOD, MA, _MISSES, _MAX_ABS, _SPREAD, _FALLBACKS, _HINT = range(5, 14)


def fresh_state(kernel: ModuleType) -> torch.Tensor:
    """The kernel's running state before any update."""
    state = torch.zeros(int(kernel.STATE_SIZE), dtype=torch.float64)
    state[_MAX_ABS] = -1.0  # none yet
    state[_SPREAD] = 1.0 / 16.0  # the hinted median bracket's relative half-width, adapted there
    state[_HINT] = math.nan  # no median yet to bracket the next window's
    return state


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
        self._state = fresh_state(kernel)
        self._state_np = self._state.numpy()
        self._medians_buf = torch.zeros(1, dtype=torch.float64)
        self._top_buf = torch.zeros(max(top_k, 1), 5, dtype=torch.float64)
        self._ch = torch.zeros(0, dtype=torch.float64)  # (4, C) running channel state, made on first update

    @property
    def misses(self) -> int:
        """Windows whose median fell outside the hinted bracket (one more pass; diagnostics)."""
        return int(self._state_np[_MISSES])

    @property
    def fallbacks(self) -> int:
        """... and outside a sampled one too (two more passes)."""
        return int(self._state_np[_FALLBACKS])

    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        """As `TapReducer.update`: x (B, T, C) on CPU, valid an optional bool mask broadcastable to x."""
        x = self._begin(x, window_offset)
        if x is None:
            return
        if x.device.type != "cpu":
            raise ValueError(f"the fused reducer reads CPU tensors, got {x.device} (use reducer=reference)")
        if x.dtype not in NATIVE_DTYPES:
            x = x.float()  # other float types (e.g. float8) are rare: one upcast copy
        B, T, C = x.shape
        mask = None if valid is None else valid.to(device=x.device, dtype=torch.bool).expand(B, T, C)
        if self._medians_buf.numel() < B:
            self._medians_buf = torch.zeros(B, dtype=torch.float64)
        if self.channel_stats and not self._ch.numel():
            self._ch = torch.zeros(4, C, dtype=torch.float64)
            self._ch[3] = -1.0  # |a| max: none yet
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
            floor,
            self._state,
            self._medians_buf,
            self._top_buf,
            self._ch,
        )
        for b, med in enumerate(self._medians_buf[:B].tolist()):
            self._medians[window_offset + b] = med
        if n_top:
            self._merge_top(self._top_buf[:n_top].tolist())

    def result(self) -> TapStats:
        """Snapshot of the statistics so far (the kernel's running state handed to `TapState`)."""
        n, mean, m2, m3, m4, nan, inf, good, ma, _, max_abs = self._state_np[: _MAX_ABS + 1].tolist()
        self._nan, self._inf, self._count, self._ma = int(nan), int(inf), int(good), int(ma)
        self._max_abs = max_abs if max_abs >= 0.0 else -math.inf
        self._moments = (n, mean, m2, m3, m4) if n > 0 else EMPTY_MOMENTS
        if self._ch.numel():
            ch = self._ch.numpy()
            self._ch_count, self._ch_mean, self._ch_m2, self._ch_absmax = (row.copy() for row in ch)
        return super().result()
