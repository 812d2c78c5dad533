"""Which reducers a profile streams into: the config's `reducer` (auto | fused | reference | device), for
full statistics (`tap_reducer`) and for per-channel moments alone (`channel_reducer`, CO profiles).

- reference: `stats.reducers.TapReducer` / `stats.channels.ChannelReducer`, torch and numpy passes; runs
  on any device (on a GPU the full one waits for the device in every hook).
- fused: `stats.fused.FusedReducer` / `FusedChannelReducer`, one compiled pass per update; CPU tensors only.
- device: `stats.device_reducer.DeviceTapReducer` / `ChannelReducer`, torch ops that never wait for the
  device in a hook; any device.
- auto: fused when the model's inputs are on the CPU, else device.
When the kernel cannot be built, fused and auto say so in one warning line and use the reference: a
profile never fails for want of a compiler. Both give the same statistics (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from outlier_study.registry import Registry
from outlier_study.stats.channels import ChannelReducer
from outlier_study.stats.device_reducer import DeviceTapReducer
from outlier_study.stats.fused import FusedChannelReducer, FusedReducer, load_kernel
from outlier_study.stats.reducers import TapReducer
from outlier_study.stats.tapstats import TapState

# (top_k, ma_abs, ma_ratio, channel_stats=..., moments=...) -> a reducer of one tap
TapReducerFactory = Callable[..., TapState | DeviceTapReducer]
# (absolute) -> a per-channel moments reducer of one tap
ChannelReducerFactory = Callable[[bool], ChannelReducer]


@dataclass(frozen=True)
class Reducers:
    tap: TapReducerFactory
    channels: ChannelReducerFactory


REFERENCE = Reducers(TapReducer, ChannelReducer)
DEVICE = Reducers(DeviceTapReducer, ChannelReducer)


def _fused(on_cpu: bool) -> Reducers:
    if not on_cpu:
        raise ValueError("reducer=fused reads CPU tensors; the model is not on the CPU (use auto)")
    return _fused_or_reference(on_cpu)


def _fused_or_reference(on_cpu: bool) -> Reducers:
    kernel = load_kernel() if on_cpu else None
    if kernel is None:
        return REFERENCE
    return Reducers(partial(FusedReducer, kernel), partial(FusedChannelReducer, kernel))


def _auto(on_cpu: bool) -> Reducers:
    return _fused_or_reference(on_cpu) if on_cpu else DEVICE


REDUCERS: Registry[Callable[[bool], Reducers]] = Registry("reducer", "reducer")
REDUCERS.add("auto", _auto)
REDUCERS.add("fused", _fused)
REDUCERS.add("reference", lambda _on_cpu: REFERENCE)
REDUCERS.add("device", lambda _on_cpu: DEVICE)


def tap_reducer(kind: str, on_cpu: bool) -> TapReducerFactory:
    """The reducer class (or factory) for `kind` when the tapped tensors are (`on_cpu`) or are not on CPU."""
    return REDUCERS.get(kind)(on_cpu).tap


def channel_reducer(kind: str, on_cpu: bool) -> ChannelReducerFactory:
    """The per-channel moments reducer for `kind` (CO profiles), as `tap_reducer`."""
    return REDUCERS.get(kind)(on_cpu).channels
