"""Turn streamed statistics into the tidy tables of the results layout, and the printed MA summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from outlier_study.adapters.taps import ATTENTION_TAPS
from outlier_study.stats.massive import is_massive
from outlier_study.stats.tapstats import StatsByTap, TapStats, TopEntry

LAYER_STATS_HEADER = ("layer", "tap", "statistic", "value", "layer_type")
TOPK_HEADER = (
    "layer",
    "tap",
    "rank",
    "value",
    "abs",
    "window",
    "token",
    "channel",
    "head",
    "token_id",
    "token_text",
    "is_ma",
)


def is_massive_entry(entry: TopEntry, stats: TapStats, ma_abs: float, ma_ratio: float) -> bool:
    """The MA rule against the median of the entry's own window."""
    median = stats.window_medians[entry.window] if entry.window < len(stats.window_medians) else float("nan")
    return bool(is_massive(entry.abs, median, ma_abs, ma_ratio))


def layer_stat_rows(
    stats: StatsByTap, layer_type: Callable[[int], str] | None = None
) -> list[tuple[Any, ...]]:
    """One row per layer × tap × statistic; with `layer_type`, the layer's type in a last column."""
    rows: list[tuple[Any, ...]] = []
    for (layer, tap), s in stats.items():
        values: dict[str, float] = {
            "max_abs": s.max_abs,
            "median_abs": s.median_abs,
            "ma_count": s.ma_count,
            "mean": s.mean,
            "std": s.std,
            "kurtosis": s.kurtosis,
            "n_elements": s.n_elements,
            "nan_count": s.nan_count,
            "inf_count": s.inf_count,
        }
        for rank, entry in enumerate(s.top, start=1):
            values[f"top{rank}_abs"] = entry.abs
            values[f"top{rank}_value"] = entry.value
        kind = (layer_type(layer),) if layer_type else ()
        rows += [(layer, tap, name, float(v), *kind) for name, v in values.items()]
    return rows


@dataclass
class Position:
    """Where a top entry sits, in the vocabulary of its tap."""

    token: int
    channel: int
    head: int | None


def position(tap: str, entry: TopEntry, seq_len: int) -> Position:
    """Attention taps were flattened to (query, head·key): split the channel back."""
    if tap in ATTENTION_TAPS:
        return Position(entry.token, entry.channel % seq_len, entry.channel // seq_len)
    return Position(entry.token, entry.channel, None)


def topk_rows(
    stats: StatsByTap,
    input_ids: np.ndarray,
    decode: Callable[[int], str],
    ma_abs: float,
    ma_ratio: float,
) -> list[tuple[object, ...]]:
    """Top-k |a| of every (layer, tap) with signed value, position and token text."""
    rows: list[tuple[object, ...]] = []
    seq_len = input_ids.shape[1]
    for (layer, tap), s in stats.items():
        for rank, e in enumerate(s.top, start=1):
            pos = position(tap, e, seq_len)
            token_id = int(input_ids[e.window, pos.token])
            rows.append(
                (
                    layer,
                    tap,
                    rank,
                    e.value,
                    e.abs,
                    e.window,
                    pos.token,
                    pos.channel,
                    "" if pos.head is None else pos.head,
                    token_id,
                    decode(token_id),
                    int(is_massive_entry(e, s, ma_abs, ma_ratio)),
                )
            )
    return rows


def channel_arrays(stats: StatsByTap) -> dict[str, np.ndarray]:
    """Per-channel mean/std/absmax keyed 'layer/tap/statistic' for channels.npz."""
    arrays: dict[str, np.ndarray] = {}
    for (layer, tap), s in stats.items():
        if s.channel_mean is None:
            continue
        arrays[f"{layer}/{tap}/mean"] = s.channel_mean
        arrays[f"{layer}/{tap}/std"] = s.channel_std  # type: ignore[assignment]
        arrays[f"{layer}/{tap}/absmax"] = s.channel_absmax  # type: ignore[assignment]
    return arrays
