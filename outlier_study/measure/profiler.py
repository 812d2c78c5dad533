"""Run windows through a hooked model and stream every (layer, tap) into its reducers.

One profiler serves every statistic: it owns a reducer per (layer, key) and, for the taps that ask for it,
extra reducers fed a variant of the tensor (e.g. the same tap with its massive activations left out).
`profile_windows` (full statistics) and `profile_channels` (per-channel moments only) differ only in the
reducer they build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from outlier_study.adapters.taps import ATTENTION_TAPS, split_expert
from outlier_study.measure.forward import forward, forward_windows
from outlier_study.measure.hooks import tap_hooks
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.channels import ChannelSummary
from outlier_study.stats.choose import channel_reducer, tap_reducer
from outlier_study.stats.massive import ma_mask
from outlier_study.stats.tapstats import StatsByTap, TapStats

ChannelsByTap = dict[tuple[int, str], ChannelSummary]
NO_MA = "/no_ma"  # key suffix of a tap measured with its MAs left out (profile_channels' `without_ma`)


class Reducer(Protocol):
    def update(self, x: torch.Tensor, window_offset: int, valid: torch.Tensor | None = None) -> None: ...
    def result(self) -> Any: ...


def as_tokens_by_channels(
    tap: str, x: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring a tap's tensor to (B, T, C); attention maps become (B, query, head·key), and the routed pairs
    of a MoE layer's pooled expert tap, (B, k, T, C), become (B, k·T, C): token index = slot·T + token."""
    if tap not in ATTENTION_TAPS:
        if x.dim() != 4:
            return x, valid
        b, k, t, c = x.shape
        if valid is not None:
            valid = valid.expand(b, k, t, valid.shape[-1]).reshape(b, k * t, valid.shape[-1])
        return x.reshape(b, k * t, c), valid
    b, h, q, k = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(b, q, h * k)
    if valid is not None:
        valid = valid.expand(b, h, q, k).permute(0, 2, 1, 3).reshape(b, q, h * k)
    return flat, valid


class Profiler:
    """A reducer per (layer, tap), plus (layer, tap + suffix) for each variant of the taps in `variant_taps`;
    the hook sink feeds them and keeps nothing else. With `experts`, MoE layers also feed per-expert keys
    (`tap@expert`) and the routing load, whose reducers are made on first use."""

    def __init__(
        self,
        taps: list[str],
        layers: list[int],
        make: Callable[[str], Reducer],
        variants: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        variant_taps: tuple[str, ...] = (),
        experts: bool = False,
    ) -> None:
        self.make = make
        self.experts = experts
        self.folded: dict[tuple[int, str], int] = {}  # keys fed (B, k, T, C): their T
        self.variants = dict(variants or {})
        self.variant_taps = variant_taps
        self.reducers: dict[tuple[int, str], Reducer] = {
            (layer, tap): make(tap) for layer in layers for tap in taps
        }
        for suffix in self.variants:
            self.reducers |= {(layer, tap + suffix): make(tap) for layer in layers for tap in variant_taps}
        self.window_offset = 0

    def sink(self, layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        flat, mask = as_tokens_by_channels(tap, x, valid)
        if x.dim() == 4 and tap not in ATTENTION_TAPS:
            self.folded[(layer, tap)] = x.shape[2]
        reducer = self.reducers.get((layer, tap))
        if reducer is None and self.experts:
            reducer = self.reducers[(layer, tap)] = self.make(split_expert(tap)[0])
        assert reducer is not None, f"no reducer for layer {layer} {tap}"
        reducer.update(flat, self.window_offset, mask)
        if tap in self.variant_taps:
            for suffix, keep in self.variants.items():
                kept = keep(flat) if mask is None else keep(flat) & mask
                self.reducers[(layer, tap + suffix)].update(flat, self.window_offset, kept)

    def result(self) -> dict[tuple[int, str], Any]:
        out = {key: reducer.result() for key, reducer in self.reducers.items()}
        for key, tokens in self.folded.items():  # a pooled pair's token index back to the token
            stats = out[key]
            if isinstance(stats, TapStats):
                stats.top = [replace(e, token=e.token % tokens) for e in stats.top]
        return out


def run_profiler(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    taps: list[str],
    layers: list[int],
    profiler: Profiler,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[tuple[int, str], Any]:
    """Every window through the model with `taps` at `layers` hooked into `profiler`."""
    with tap_hooks(lm.model, lm.adapter, taps, layers, profiler.sink, experts=profiler.experts):
        forward_windows(lm, input_ids, batch_size, progress, desc, profiler)
    return profiler.result()


@dataclass
class Profile:
    """Streamed statistics of one pass over the windows."""

    stats: StatsByTap
    taps: list[str]
    layers: list[int]
    tokens: int


def profile_windows(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    taps: list[str],
    layers: list[int],
    *,
    top_k: int = 3,
    ma_abs: float = 100.0,
    ma_ratio: float = 1000.0,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "profile",
    moments: bool = True,
    reducer: str = "auto",
) -> Profile:
    """Full statistics of `taps` at `layers` over all windows (per-channel moments but for attention maps);
    `moments=False` leaves out every moment, for callers that read only max, top-k, medians and MA counts.
    `reducer` is auto | fused | reference (`stats.choose`): the same statistics, computed differently."""
    factory = tap_reducer(reducer, lm.input_device.type == "cpu")  # layerwise: the layers are on meta

    def make(tap: str) -> Reducer:
        return factory(top_k, ma_abs, ma_ratio, channel_stats=tap not in ATTENTION_TAPS, moments=moments)

    profiler = Profiler(taps, layers, make, experts=True)
    stats = run_profiler(lm, input_ids, taps, layers, profiler, batch_size, progress, desc)
    return Profile(stats, taps, layers, int(input_ids.numel()))


def profile_channels(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    taps: list[str],
    layers: list[int],
    *,
    absolute: bool = False,
    without_ma: tuple[str, ...] = (),
    ma_rule: tuple[float, float] = (100.0, 1000.0),
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "channels",
    reducer: str = "auto",
) -> ChannelsByTap:
    """Per-channel moments of `taps` at `layers`: all that CO detection needs. Taps in `without_ma` are
    also measured with their MAs left out, under the key tap + NO_MA. `reducer` as for `profile_windows`."""
    factory = channel_reducer(reducer, lm.input_device.type == "cpu")
    variants = {NO_MA: lambda flat: ~ma_mask(flat, *ma_rule)} if without_ma else {}
    profiler = Profiler(taps, layers, lambda _tap: factory(absolute), variants, without_ma)
    return run_profiler(lm, input_ids, taps, layers, profiler, batch_size, progress, desc)


def capture_abs_slice(
    lm: LoadedModel, window: torch.Tensor, layer: int, tap: str, max_tokens: int
) -> np.ndarray:
    """|a| (tokens × channels) of one window at one (layer, tap), for the Fig. 6-style 3-D plot only."""
    out: list[torch.Tensor] = []

    def sink(_layer: int, _tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        if _tap != tap:
            return
        flat, mask = as_tokens_by_channels(_tap, x, valid)
        a = flat[0].abs().float()
        out.append(a if mask is None else a.masked_fill(~mask[0], 0.0))

    with tap_hooks(lm.model, lm.adapter, [tap], [layer], sink):
        forward(lm, window[None, :max_tokens], through=layer)
    return out[0].cpu().numpy()
