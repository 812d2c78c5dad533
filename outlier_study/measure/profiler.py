"""Run windows through a hooked model and stream every (layer, tap) into its reducer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from outlier_study.adapters.base import ATTENTION_TAPS
from outlier_study.measure.hooks import tap_hooks
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.channels import ChannelReducer, ChannelSummary
from outlier_study.stats.massive import ma_mask
from outlier_study.stats.reducers import TapReducer, TapStats

StatsByTap = dict[tuple[int, str], TapStats]


def as_tokens_by_channels(
    tap: str, x: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring a tap's tensor to (B, T, C); attention maps become (B, query, head·key)."""
    if tap not in ATTENTION_TAPS:
        return x, valid
    b, h, q, k = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(b, q, h * k)
    if valid is not None:
        valid = valid.expand(b, h, q, k).permute(0, 2, 1, 3).reshape(b, q, h * k)
    return flat, valid


@dataclass
class Profile:
    """Streamed statistics of one pass over the windows."""

    stats: StatsByTap
    taps: list[str]
    layers: list[int]
    tokens: int


class Profiler:
    """Owns one reducer per (layer, tap); the hook sink feeds them and keeps nothing else."""

    def __init__(
        self, taps: list[str], layers: list[int], top_k: int, ma_abs: float, ma_ratio: float
    ) -> None:
        self.taps, self.layers = taps, layers
        self.reducers = {
            (layer, tap): TapReducer(top_k, ma_abs, ma_ratio, channel_stats=tap not in ATTENTION_TAPS)
            for layer in layers
            for tap in taps
        }
        self.window_offset = 0

    def sink(self, layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        flat, mask = as_tokens_by_channels(tap, x, valid)
        self.reducers[(layer, tap)].update(flat, self.window_offset, mask)

    def result(self) -> StatsByTap:
        return {key: reducer.result() for key, reducer in self.reducers.items()}


def batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, input_ids.shape[0], batch_size):
        yield start, input_ids[start : start + batch_size]


@torch.inference_mode()
def forward(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """One forward without KV cache, logits for the last position only (profiling needs no logits)."""
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False, logits_to_keep=1).logits


def forward_windows(
    lm: LoadedModel, input_ids: torch.Tensor, batch_size: int, progress: bool, desc: str, owner: object = None
) -> None:
    """Run every window through the model; `owner.window_offset` tracks the global index of a batch."""
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="win", disable=not progress)
    for start, ids in batches(input_ids, batch_size):
        if owner is not None:
            owner.window_offset = start  # type: ignore[attr-defined]
        forward(lm, ids)
        bar.update(ids.shape[0])
    bar.close()


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
) -> Profile:
    """Stream statistics of `taps` at `layers` over all windows."""
    profiler = Profiler(taps, layers, top_k, ma_abs, ma_ratio)
    with tap_hooks(lm.model, lm.adapter, taps, layers, profiler.sink):
        forward_windows(lm, input_ids, batch_size, progress, desc, profiler)
    return Profile(profiler.result(), taps, layers, int(input_ids.numel()))


@contextmanager
def _capture_one(lm: LoadedModel, layer: int, tap: str, out: list[torch.Tensor]) -> Iterator[None]:
    def sink(_layer: int, _tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        flat, mask = as_tokens_by_channels(_tap, x, valid)
        a = flat[0].abs().float()
        out.append(a if mask is None else a.masked_fill(~mask[0], 0.0))

    with tap_hooks(lm.model, lm.adapter, [tap], [layer], sink):
        yield


def capture_abs_slice(
    lm: LoadedModel, window: torch.Tensor, layer: int, tap: str, max_tokens: int
) -> np.ndarray:
    """|a| (tokens × channels) of one window at one (layer, tap), for the Fig. 6-style 3-D plot only."""
    out: list[torch.Tensor] = []
    with _capture_one(lm, layer, tap, out):
        forward(lm, window[None, :max_tokens])
    return out[0].cpu().numpy()


ChannelsByTap = dict[tuple[int, str], ChannelSummary]
NO_MA = "/no_ma"  # suffix of the extra keys profile_channels adds for taps measured with their MAs left out


class ChannelProfiler:
    """One ChannelReducer per (layer, tap), plus (layer, tap + NO_MA) for the taps in `without_ma`."""

    def __init__(
        self,
        taps: list[str],
        layers: list[int],
        absolute: bool,
        without_ma: tuple[str, ...] = (),
        ma_rule: tuple[float, float] = (100.0, 1000.0),
    ) -> None:
        self.reducers = {(layer, tap): ChannelReducer(absolute) for layer in layers for tap in taps}
        self.reducers |= {
            (layer, tap + NO_MA): ChannelReducer(absolute) for layer in layers for tap in without_ma
        }
        self.without_ma, self.ma_rule = without_ma, ma_rule

    def sink(self, layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        flat, mask = as_tokens_by_channels(tap, x, valid)
        self.reducers[(layer, tap)].update(flat, mask)
        if tap in self.without_ma:
            self.reducers[(layer, tap + NO_MA)].update(flat, ~ma_mask(flat, *self.ma_rule))

    def result(self) -> ChannelsByTap:
        return {key: reducer.result() for key, reducer in self.reducers.items()}


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
) -> ChannelsByTap:
    """Per-channel moments of `taps` at `layers` over all windows: all that CO detection needs."""
    profiler = ChannelProfiler(taps, layers, absolute, without_ma, ma_rule)
    with tap_hooks(lm.model, lm.adapter, taps, layers, profiler.sink):
        forward_windows(lm, input_ids, batch_size, progress, desc)
    return profiler.result()
