"""FusedReducer: the statistics of `TapReducer` from one compiled pass over each window (`fused.cpp`).

The reference (`stats.reducers.TapReducer`) makes several torch/numpy passes and a numpy partition per
window; this one reads each tapped tensor once in the kernel, in float64 accumulators, and the kernel also
merges the update into the tap's running state (moments, per-channel (count, mean, M2, |a| max), counts,
the median hint, the running top-k) with the reference's merge rules, in buffers made once per reducer.
An update is one kernel call, which checks its own input, and a dict entry per window median: a profile
makes one per tap, layer and window, and Python work there costs as much as the statistics. `result`
hands the state to `TapState`'s assembly, shared with the reference.

Agreement with the reference (tests/test_fused.py): counts, max |a|, window medians, MA counts, channel
counts and |a| max and the top-k entries are equal; the moments agree to float32 precision (both sum
float32 blocks into float64: the kernel's blocks are at most 64 rows of one lane, see `block_sums`).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from outlier_study.stats.moments import EMPTY_MOMENTS
from outlier_study.stats.tapstats import TapState, TapStats, TopEntry

NATIVE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)  # read by the kernel as they are
# Slots of the kernel's running state (fused.cpp, `State`): n, mean, M2, M3, M4, then these (read in order
# by `result` up to the max |a|), then what the reducer sets once.
(NAN, INF, GOOD, MA, _MISSES, _MAX_ABS, _SPREAD, _FALLBACKS, _HINT, _TOP_COUNT, _CHANNELS) = range(5, 16)
_MA_ABS, _MA_RATIO, _TOP_K, _MOMENTS, _CHANNEL_STATS = range(16, 21)


def fresh_state(
    kernel: ModuleType, ma_abs: float, ma_ratio: float, top_k: int, moments: bool, channel_stats: bool
) -> torch.Tensor:
    """The kernel's running state of a tap before any update, with the statistics it asks for."""
    state = torch.zeros(int(kernel.STATE_SIZE), dtype=torch.float64)
    state[_MAX_ABS] = -1.0  # none yet
    state[_SPREAD] = 1.0 / 16.0  # the hinted median bracket's relative half-width, adapted there
    state[_HINT] = math.nan  # no median yet to bracket the next window's
    state[_MA_ABS], state[_MA_RATIO], state[_TOP_K] = ma_abs, ma_ratio, top_k
    state[_MOMENTS], state[_CHANNEL_STATS] = moments, channel_stats
    return state


def kernel_input(
    x: torch.Tensor, valid: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A checked (B, T, C) CPU tensor as the kernel reads it (other float types, e.g. float8, rare: one
    upcast copy) and its mask as a bool tensor of its shape; records C in the state."""
    if x.device.type != "cpu":
        raise ValueError(f"the fused reducer reads CPU tensors, got {x.device} (use reducer=reference)")
    if x.dtype not in NATIVE_DTYPES:
        x = x.float()
    state[_CHANNELS] = x.shape[-1]
    return x, None if valid is None else valid.to(device=x.device, dtype=torch.bool).expand(x.shape)


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
        self._state = fresh_state(kernel, self.ma_abs, self.ma_ratio, top_k, self.moments, self.channel_stats)
        self._state_np = self._state.numpy()
        self._top_buf = torch.zeros(max(top_k, 1), 5, dtype=torch.float64)  # the running top-k's rows
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
        """As `TapReducer.update`: x (B, T, C) on CPU, valid an optional bool mask broadcastable to x.

        A hook calls this for every tap of every layer, so the usual update is one kernel call, which
        checks its input itself; the first update of a tap, and any the kernel does not read as it is,
        take the checks and conversions here and go back to it."""
        medians = self._kernel.update(x, valid, window_offset, self._state, self._top_buf, self._ch)
        if medians is None:
            medians = self._prepared_update(x, window_offset, valid)
        else:
            self._n_windows += len(medians)
        for b, median in enumerate(medians):
            self._medians[window_offset + b] = median

    def _prepared_update(
        self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None
    ) -> list[float]:
        """An update through `TapState`'s checks (which count its windows and give an empty one nan
        medians): the window medians it adds."""
        x = self._begin(x, window_offset)
        if x is None:
            return []
        x, valid = kernel_input(x, valid, self._state)
        if self.channel_stats and not self._ch.numel():
            self._ch = torch.zeros(4, x.shape[2], dtype=torch.float64)
            self._ch[3] = -1.0  # |a| max: none yet
        medians = self._kernel.update(x, valid, window_offset, self._state, self._top_buf, self._ch)
        assert medians is not None, "the fused kernel refused a checked input"
        return medians

    def result(self) -> TapStats:
        """Snapshot of the statistics so far (the kernel's running state handed to `TapState`)."""
        n, mean, m2, m3, m4, nan, inf, good, ma, _, max_abs = self._state_np[: _MAX_ABS + 1].tolist()
        self._nan, self._inf, self._count, self._ma = int(nan), int(inf), int(good), int(ma)
        rows = self._top_buf[: int(self._state_np[_TOP_COUNT])].tolist()
        self._top = [TopEntry(value, absval, int(w), int(t), int(c)) for absval, value, w, t, c in rows]
        self._max_abs = max_abs if max_abs >= 0.0 else -math.inf
        self._moments = (n, mean, m2, m3, m4) if n > 0 else EMPTY_MOMENTS
        if self._ch.numel():
            ch = self._ch.numpy()
            self._ch_count, self._ch_mean, self._ch_m2, self._ch_absmax = (row.copy() for row in ch)
        return super().result()
