"""Which full reducer a profile streams into: the config's `reducer` (auto | fused | reference).

- reference: `stats.reducers.TapReducer`, torch and numpy passes; runs on any device (on a GPU it waits
  for the device in every hook).
- fused: `stats.fused.FusedReducer`, one compiled pass per window; CPU tensors only.
- device: `stats.device_reducer.DeviceTapReducer`, torch ops that never wait for the device in a hook;
  any device.
- auto: fused when the model's inputs are on the CPU, else device.
When the kernel cannot be built, fused and auto say so in one warning line and use the reference: a
profile never fails for want of a compiler. Both give the same statistics (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from outlier_study.registry import Registry
from outlier_study.stats.device_reducer import DeviceTapReducer
from outlier_study.stats.fused import FusedReducer, load_kernel
from outlier_study.stats.reducers import TapReducer
from outlier_study.stats.tapstats import TapState

# (top_k, ma_abs, ma_ratio, channel_stats=..., moments=...) -> a reducer of one tap
TapReducerFactory = Callable[..., TapState | DeviceTapReducer]


def _fused(on_cpu: bool) -> TapReducerFactory:
    if not on_cpu:
        raise ValueError("reducer=fused reads CPU tensors; the model is not on the CPU (use auto)")
    return _fused_or_reference(on_cpu)


def _fused_or_reference(on_cpu: bool) -> TapReducerFactory:
    kernel = load_kernel() if on_cpu else None
    return TapReducer if kernel is None else partial(FusedReducer, kernel)


def _auto(on_cpu: bool) -> TapReducerFactory:
    return _fused_or_reference(on_cpu) if on_cpu else DeviceTapReducer


REDUCERS: Registry[Callable[[bool], TapReducerFactory]] = Registry("reducer", "reducer")
REDUCERS.add("auto", _auto)
REDUCERS.add("fused", _fused)
REDUCERS.add("reference", lambda _on_cpu: TapReducer)
REDUCERS.add("device", lambda _on_cpu: DeviceTapReducer)


def tap_reducer(kind: str, on_cpu: bool) -> TapReducerFactory:
    """The reducer class (or factory) for `kind` when the tapped tensors are (`on_cpu`) or are not on CPU."""
    return REDUCERS.get(kind)(on_cpu)
