"""Per-channel moments streamed inside hooks: all that the channel-wise outlier (CO) rule needs.

CO detection needs only each channel's count, mean and variance: the tensor's own mean and σ follow from
merging the channels, so a CO profile is two column sums per hooked tensor instead of the full reducer's
medians, top-k and higher moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from outlier_study.stats.moments import merge_channel_moments

DeviceMoments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (count, mean, M2) per channel, float64


@dataclass(frozen=True)
class ChannelSummary:
    """Per-channel moments of one (layer, tap) over every token seen, and the tensor-wide ones.

    With `absolute` every statistic is of |A| (channel means of |A|, their std, mean and σ of |A|)."""

    count: np.ndarray  # (C,) elements per channel
    mean: np.ndarray  # (C,) float64
    std: np.ndarray  # (C,) population std
    tensor_mean: float
    tensor_std: float
    absolute: bool

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


class ChannelReducer:
    """Streaming per-channel (count, mean, M2) with Chan's parallel merge; keeps no activation. The state
    stays float64 on the input's device and `update` never reads a value back: on a GPU it does not wait
    for the device; `result()` brings the state to the host once."""

    def __init__(self, absolute: bool = False) -> None:
        self.absolute = absolute
        self._state: DeviceMoments | None = None  # on the input's device

    @torch.no_grad()
    def update(self, x: torch.Tensor, window_offset: int = 0, valid: torch.Tensor | None = None) -> None:
        """x: (..., C); valid: optional bool mask broadcastable to x, False entries are left out. Windows
        are pooled, so `window_offset` (the reducer protocol's) does not matter here."""
        x = x.detach().reshape(-1, x.shape[-1])
        if valid is None:
            # Column sums as a matrix-vector product: on CPU ~10x faster than a reduction over dim 0
            # (torch.var_mean is slower still). Float64 makes sum(a^2) - sum(a)^2/n exact enough even for
            # a channel whose mean dwarfs its spread (1e4 vs 0.1) or that carries a 1e5 MA.
            xd = x.to(torch.float64, copy=True)
            if self.absolute:
                xd.abs_()
            rows = xd.shape[0]
            ones = torch.ones(1, rows, dtype=torch.float64, device=xd.device)
            s1 = (ones @ xd)[0]
            s2 = (ones @ xd.square_())[0]
            mean = s1 / rows
            n_b = torch.full_like(mean, float(rows))
            m2_b = (s2 - s1 * mean).clamp_(min=0.0)
        else:
            if self.absolute:
                x = x.abs()
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            keep = valid.to(x.device).expand(*valid.shape[:-1], x.shape[-1]).reshape(-1, x.shape[1])
            count = keep.sum(0)
            xz = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
            mean = xz.sum(0) / count.clamp(min=1)
            d = torch.where(keep, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
            n_b, mean, m2_b = count.double(), mean.double(), d.square().sum(0).double()
        self._merge((n_b, mean, m2_b))

    def _merge(self, batch: DeviceMoments) -> None:
        if self._state is None:
            self._state = batch
            return
        if batch[0].shape != self._state[0].shape:
            raise ValueError(f"channel count changed from {self._state[0].shape[0]} to {batch[0].shape[0]}")
        self._state = merge_channel_moments(self._state, batch)

    def result(self) -> ChannelSummary:
        if self._state is None:
            raise ValueError("no activation was fed to this reducer")
        n, mean, m2 = torch.stack(self._state).cpu().numpy()  # the one transfer to the host
        has = n > 0
        total = float(n.sum())
        tensor_mean = float((n * mean)[has].sum() / total) if total else float("nan")
        tensor_m2 = float((m2 + n * (mean - tensor_mean) ** 2)[has].sum())
        std = np.sqrt(np.divide(m2, n, out=np.full(n.shape, np.nan), where=has))
        return ChannelSummary(
            count=n.astype(np.int64),
            mean=np.where(has, mean, np.nan),
            std=std,
            tensor_mean=tensor_mean,
            tensor_std=float(np.sqrt(tensor_m2 / total)) if total else float("nan"),
            absolute=self.absolute,
        )
