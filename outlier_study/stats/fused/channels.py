"""FusedChannelReducer: `ChannelReducer`'s per-channel moments from one compiled read of each update.

The reference `stats.channels.ChannelReducer` copies an update to float64 and takes two column sums and a
merge in torch ops, each a pass over the tensor or a dispatch; the kernel (`fused.cpp`,
`channel_update`) reads the tensor once, sums (a - shift) and its square per channel in float64 with the
channel's running mean as the shift, and merges into the state with the same rule. The state is the
reference's (count, mean, M2), so `result` is the reference's. CPU tensors only.
"""

from __future__ import annotations

from types import ModuleType

import torch

from outlier_study.stats.channels import ChannelReducer
from outlier_study.stats.fused.reducer import NATIVE_DTYPES


class FusedChannelReducer(ChannelReducer):
    """Streaming per-channel (count, mean, M2) of CPU tensors through the compiled kernel."""

    def __init__(self, kernel: ModuleType, absolute: bool = False) -> None:
        super().__init__(absolute)
        self._kernel = kernel
        self._buf = torch.zeros(0, dtype=torch.float64)  # (3, C): the state, made on the first update

    def update(self, x: torch.Tensor, window_offset: int = 0, valid: torch.Tensor | None = None) -> None:
        """As `ChannelReducer.update`: x (..., C) on CPU; valid an optional bool mask broadcastable to x."""
        if x.device.type != "cpu":
            raise ValueError(f"the fused reducer reads CPU tensors, got {x.device} (use reducer=reference)")
        x = x.detach()
        if x.dtype not in NATIVE_DTYPES:
            x = x.float()
        mask = None if valid is None else valid.to(dtype=torch.bool).expand(x.shape)
        if x.dim() != 3:
            x = x.reshape(1, -1, x.shape[-1])
            mask = None if mask is None else mask.reshape(x.shape)
        C = x.shape[-1]
        if not self._buf.numel():
            self._buf = torch.zeros(3, C, dtype=torch.float64)
            self._state = (self._buf[0], self._buf[1], self._buf[2])  # views: `result` reads the live state
        elif self._buf.shape[1] != C:
            raise ValueError(f"channel count changed from {self._buf.shape[1]} to {C}")
        self._kernel.channel_update(x, mask, self.absolute, self._buf)
