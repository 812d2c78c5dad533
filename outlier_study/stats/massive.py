"""The massive-activation rule (Sun et al., 2024), shared by detection, attribution and interventions."""

from __future__ import annotations

import torch


def window_medians(absx: torch.Tensor) -> torch.Tensor:
    """Lower median of |a| per window: (B, ...) -> (B,), the 'median of its tensor' of the MA rule."""
    return absx.reshape(absx.shape[0], -1).median(dim=1).values


def ma_mask(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> torch.Tensor:
    """Elements with |a| > ma_abs and |a| >= ma_ratio × median |a| of their own window; x is (B, ...)."""
    absx = x.abs()
    med = window_medians(absx).float()
    bound = torch.clamp(med * ma_ratio, min=ma_abs).view(-1, *([1] * (x.dim() - 1)))
    return (absx > ma_abs) & (absx >= bound.to(absx.dtype))
