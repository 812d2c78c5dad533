"""The mixture-of-experts tables of a profile: which experts create massive activations, how the router
spreads the tokens, and every per-expert statistic with an `expert` column.

A MoE profile holds, beside the layer-level keys, per-expert keys `tap@expert` (an index, or "shared")
and the routing load `moe.routing` (see measure/experts/capture.py); the layer-level keys keep the tidy
tables of a dense model (layer_stats.csv, topk.csv) exactly as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from outlier_study.adapters.taps import CANONICAL_TAPS, ROUTING, SHARED_EXPERT, split_expert
from outlier_study.output.stat_tables import is_massive_entry, layer_stat_rows
from outlier_study.output.tables import Table
from outlier_study.stats.tapstats import StatsByTap

EXPERT_STATS_HEADER = ("layer", "tap", "expert", "statistic", "value")
EXPERT_MA_HEADER = (
    "layer",
    "expert",
    "tap",
    "ma_count",
    "top_value",
    "window",
    "token",
    "token_text",
    "channel",
    "is_ma",
)
ROUTER_LOAD_HEADER = ("layer", "expert", "tokens_routed", "token_share", "mean_weight")


def split_stats(stats: StatsByTap) -> tuple[StatsByTap, StatsByTap, StatsByTap]:
    """(layer-level keys, per-expert keys, routing load) of a profile's statistics."""
    layer_level, per_expert, routing = {}, {}, {}
    for key, s in stats.items():
        _, expert = split_expert(key[1])
        if key[1] == ROUTING:
            routing[key] = s
        elif expert is None:
            layer_level[key] = s
        else:
            per_expert[key] = s
    return layer_level, per_expert, routing


def _expert_order(expert: str) -> tuple[int, int]:
    return (1, 0) if expert == SHARED_EXPERT else (0, int(expert))


def _order(key: tuple[int, str]) -> tuple[int, int, tuple[int, int]]:
    tap, expert = split_expert(key[1])
    assert expert is not None
    return key[0], CANONICAL_TAPS.index(tap), _expert_order(expert)


def expert_stat_rows(per_expert: StatsByTap) -> list[tuple[int, str, str, str, float]]:
    """layer_stats.csv's rows for the per-expert keys, the expert in a column of its own."""
    rows = []
    for key in sorted(per_expert, key=_order):
        tap, expert = split_expert(key[1])
        rows += [
            (layer, tap, str(expert), name, v)
            for layer, _, name, v in layer_stat_rows({key: per_expert[key]})
        ]
    return rows


def expert_ma_table(
    per_expert: StatsByTap,
    input_ids: np.ndarray,
    decode: Callable[[int], str],
    ma_abs: float,
    ma_ratio: float,
) -> Table:
    """Which experts create massive activations: one row per (layer, expert, tap) with at least one MA
    (the reducers' count of the MA rule on the tokens routed to that expert), its top value and where."""
    rows = []
    for key in sorted(per_expert, key=_order):
        s = per_expert[key]
        if s.ma_count == 0:
            continue
        tap, expert = split_expert(key[1])
        top = s.top[0]
        token_id = int(input_ids[top.window, top.token])
        rows.append(
            (
                key[0],
                expert,
                tap,
                s.ma_count,
                f"{top.value:.2f}",
                top.window,
                top.token,
                decode(token_id),
                top.channel,
                int(is_massive_entry(top, s, ma_abs, ma_ratio)),
            )
        )
    return Table.of(
        "moe_expert_mas",
        EXPERT_MA_HEADER,
        rows,
        caption="Massive activations per expert (on the tokens routed to it; layers from 0)",
    )


def router_load_table(routing: StatsByTap, n_tokens: int) -> Table:
    """Tokens routed to each expert, their share of the layer's tokens (k routed experts per token: the
    shares sum to k) and the mean routing weight they got."""
    rows = []
    for (layer, _), s in sorted(routing.items()):
        if s.channel_count is None or s.channel_mean is None:
            continue
        for e, (count, mean) in enumerate(zip(s.channel_count, s.channel_mean, strict=True)):
            share = count / n_tokens if n_tokens else float("nan")
            mean_text = "" if count == 0 else f"{mean:.4f}"
            rows.append((layer, e, int(count), f"{share:.4f}", mean_text))
    return Table.of(
        "moe_router_load",
        ROUTER_LOAD_HEADER,
        rows,
        caption="Router load per expert: tokens routed, their share of all tokens, mean routing weight",
    )
