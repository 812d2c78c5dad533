"""The massive-activation rule (Sun et al., 2024), shared by detection, attribution and interventions."""

from __future__ import annotations

import torch


def window_medians(absx: torch.Tensor) -> torch.Tensor:
    """Lower median of |a| per window: (B, ...) -> (B,), the 'median of its tensor' of the MA rule."""
    return absx.reshape(absx.shape[0], -1).median(dim=1).values


def may_hold_ma(x: torch.Tensor, ma_abs: float) -> bool:
    """One cheap reduction that rules out most tensors: no |a| above ma_abs means no MA (nan never is)."""
    lo, hi = torch.aminmax(x)
    return bool(hi > ma_abs) or bool(lo < -ma_abs)


def is_massive_value(abs_value: float, median: float, ma_abs: float, ma_ratio: float) -> bool:
    """The rule for one value against its window's median |a| (a nan median: no MA)."""
    return abs_value > ma_abs and abs_value >= ma_ratio * median


def ma_mask(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> torch.Tensor:
    """Elements with |a| > ma_abs and |a| >= ma_ratio × median |a| of their own window; x is (B, ...)."""
    absx = x.abs()
    med = window_medians(absx).float()
    bound = torch.clamp(med * ma_ratio, min=ma_abs).view(-1, *([1] * (x.dim() - 1)))
    return (absx > ma_abs) & (absx >= bound)  # float32 bound: half inputs are not rounded at the boundary


def ma_positions(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> dict[tuple[int, ...], float]:
    """Sparse MAs of x: index tuple -> signed value (empty without touching the median when none can be)."""
    if not may_hold_ma(x, ma_abs):
        return {}
    mask = ma_mask(x, ma_abs, ma_ratio)
    return dict(zip(map(tuple, mask.nonzero().tolist()), x[mask].float().tolist(), strict=True))
