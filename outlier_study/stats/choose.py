"""Which full reducer a profile streams into: the config's `reducer` (auto | fused | reference).

- reference: `stats.reducers.TapReducer`, torch and numpy passes; runs on any device.
- fused: `stats.fused.FusedReducer`, one compiled pass per window; CPU tensors only.
- auto: fused when every parameter of the model is on the CPU, else reference.
When the kernel cannot be built, fused and auto say so in one warning line and use the reference: a
profile never fails for want of a compiler. Both give the same statistics (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from outlier_study.registry import Registry
from outlier_study.stats.fused import FusedReducer, load_kernel
from outlier_study.stats.reducers import TapReducer
from outlier_study.stats.tapstats import TapState

# (top_k, ma_abs, ma_ratio, channel_stats=..., moments=...) -> a reducer of one tap
TapReducerFactory = Callable[..., TapState]


def _fused(on_cpu: bool) -> TapReducerFactory:
    if not on_cpu:
        raise ValueError("reducer=fused reads CPU tensors; the model is not on the CPU (use auto)")
    return _fused_or_reference(on_cpu)


def _fused_or_reference(on_cpu: bool) -> TapReducerFactory:
    kernel = load_kernel() if on_cpu else None
    return TapReducer if kernel is None else partial(FusedReducer, kernel)


REDUCERS: Registry[Callable[[bool], TapReducerFactory]] = Registry("reducer", "reducer")
REDUCERS.add("auto", _fused_or_reference)
REDUCERS.add("fused", _fused)
REDUCERS.add("reference", lambda _on_cpu: TapReducer)


def tap_reducer(kind: str, on_cpu: bool) -> TapReducerFactory:
    """The reducer class (or factory) for `kind` when the tapped tensors are (`on_cpu`) or are not on CPU."""
    return REDUCERS.get(kind)(on_cpu)
