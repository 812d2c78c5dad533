"""The largest |a| of each window with its position, streamed inside a hook.

A super weight shows as one spike per window at the down projection's input and output; which channel it
sits in, at which token, and in how many windows, needs each window's own peak (a top-k over all windows
would let one window fill it). Each window keeps four numbers and its median |a|, so the MA rule can be
applied to the peak afterwards; no activation is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from outlier_study.stats.massive import is_massive, window_medians
from outlier_study.stats.selection import rank_value, use_numpy_select


@dataclass(frozen=True)
class Peak:
    """The largest finite |a| of one window of one (layer, tap), and that window's lower median |a|."""

    window: int
    token: int
    channel: int
    value: float  # signed
    median: float

    def massive(self, ma_abs: float, ma_ratio: float) -> bool:
        return bool(is_massive(abs(self.value), self.median, ma_abs, ma_ratio))


class PeakReducer:
    """Per-window peaks of a (B, T, C) tap; `valid` False entries (and non-finite ones) never peak."""

    def __init__(self) -> None:
        self._peaks: dict[int, Peak] = {}
        self._rng = np.random.default_rng(0)  # median probing only; results do not depend on it

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None:
        a = x.detach().abs().float().reshape(x.shape[0], -1)
        keep = (
            torch.isfinite(a)
            if valid is None
            else torch.isfinite(a) & valid.to(a.device, torch.bool).reshape(a.shape)
        )
        best, where = a.masked_fill(~keep, -1.0).max(dim=1)
        channels = x.shape[-1]
        for b, (top, at) in enumerate(zip(best.tolist(), where.tolist(), strict=True)):
            if top < 0:  # no finite valid element in this window
                continue
            token, channel = divmod(int(at), channels)
            value = float(x[b].reshape(-1)[at])
            self._peaks[window_offset + b] = Peak(
                window_offset + b, token, channel, value, self._median(a[b])
            )

    def _median(self, row: torch.Tensor) -> float:
        """The MA rule's median: the lower median of |a| over the window's whole tensor (numpy's partition
        on CPU, ~10x faster than torch.median; the row is scratch)."""
        if not use_numpy_select(row):
            return float(window_medians(row[None]))
        return rank_value(row.numpy(), (row.numel() - 1) // 2, self._rng)

    def result(self) -> list[Peak]:
        return [self._peaks[w] for w in sorted(self._peaks)]
