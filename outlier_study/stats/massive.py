"""The massive-activation rule (Sun et al., 2024), shared by detection, attribution and interventions.

An element is massive when |a| > ma_abs and |a| ≥ ma_ratio × the median |a| of its own window's tensor.
`is_massive` is the one body of the rule; the reducers' streaming count is a specialization of it that the
tests hold equal to it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from outlier_study.stats.fused.scan import fused_ma_scan
from outlier_study.stats.selection import rank_value, use_numpy_select

_RNG = np.random.default_rng(0)  # rank_value's tie probe only; medians do not depend on it


def is_massive(abs_a: Any, median: Any, ma_abs: float, ma_ratio: float) -> Any:
    """The rule on floats, numpy arrays or tensors (broadcasting); a nan median makes nothing massive."""
    return (abs_a > ma_abs) & (abs_a >= ma_ratio * median)


def window_medians(absx: torch.Tensor) -> torch.Tensor:
    """Lower median of |a| per window: (B, ...) -> (B,), the 'median of its tensor' of the MA rule; nan for a
    window holding a nan, as torch.median. On CPU numpy's partition selects it (several times faster than
    torch.median, which an intervention hook would otherwise pay per layer and window)."""
    rows = absx.reshape(absx.shape[0], -1)
    if not use_numpy_select(rows) or rows.shape[1] == 0 or rows.dtype not in (torch.float32, torch.float64):
        return rows.median(dim=1).values
    rank = (rows.shape[1] - 1) // 2
    medians = [
        np.nan if np.isnan(row.max()) else rank_value(row.copy(), rank, _RNG) for row in rows.detach().numpy()
    ]
    return torch.tensor(medians, dtype=rows.dtype)


def may_hold_ma(x: torch.Tensor, ma_abs: float) -> bool:
    """One cheap reduction that rules out most tensors: no |a| above ma_abs means no MA (nan never is)."""
    lo, hi = torch.aminmax(x)
    return bool(hi > ma_abs) or bool(lo < -ma_abs)


def ma_thresholds(medians: torch.Tensor, ma_abs: float, ma_ratio: float) -> torch.Tensor:
    """Per window the t with `|a| >= t` <=> `is_massive(|a|, median)` for every |a| of the medians' dtype:
    ma_ratio × median in float64 rounded up to float32 (float64 for float64 medians), at least the smallest
    such number above ma_abs. The rule is exact in real arithmetic, as on floats; a product rounded to the
    data's dtype could admit an element an ulp below it. A nan median (no element) stays nan: none is."""
    wide = torch.float64 if medians.dtype == torch.float64 else torch.float32
    ratio = medians.to(torch.float64) * ma_ratio
    thr = ratio.to(wide)
    thr = torch.where(
        thr.to(torch.float64) < ratio, torch.nextafter(thr, torch.full_like(thr, math.inf)), thr
    )
    above = (np.float64 if wide == torch.float64 else np.float32)(ma_abs)  # host arithmetic: no device read
    if float(above) <= ma_abs:
        above = np.nextafter(above, above.dtype.type(np.inf))
    return thr.clamp(min=float(above))


def ma_mask(
    x: torch.Tensor, ma_abs: float, ma_ratio: float, medians: torch.Tensor | None = None
) -> torch.Tensor:
    """The MAs of x (B, ...), each window against its own median (`window_medians` unless given)."""
    absx = x.abs()
    med = window_medians(absx) if medians is None else medians
    return absx >= ma_thresholds(med.to(absx.device), ma_abs, ma_ratio).view(-1, *([1] * (x.dim() - 1)))


def ma_positions(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> dict[tuple[int, ...], float]:
    """Sparse MAs of x: index tuple -> signed value (empty without touching the median when none can be)."""
    mask = masked(x, ma_abs, ma_ratio)
    if mask is None:
        return {}
    return dict(zip(map(tuple, mask.nonzero().tolist()), x[mask].float().tolist(), strict=True))


def fill_value(x: torch.Tensor, value: str) -> torch.Tensor:
    """The replacement: 0, or each window's mean of the whole tensor x (MAs included), shaped to broadcast."""
    if value == "zero":
        return x.new_zeros(())
    mean = x.reshape(x.shape[0], -1).mean(dim=1, dtype=torch.float32)
    return mean.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def masked(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> torch.Tensor | None:
    """The MA mask of x, or None when it holds no MA: one min/max reduction rules out most hooked tensors;
    on CPU the fused kernel's one pass (`fused_ma_scan`) gives the rest their medians and MA count, so only
    a tensor that holds an MA is copied for its mask."""
    if not may_hold_ma(x, ma_abs):
        return None
    scan = fused_ma_scan(x, ma_abs, ma_ratio)
    if scan is None:
        return ma_mask(x, ma_abs, ma_ratio)
    return ma_mask(x, ma_abs, ma_ratio, scan.medians) if scan.ma_count else None
