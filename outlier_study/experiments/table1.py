"""Experiment `table1`: true vs fake MAs, where each first appears and where it is cancelled (Table 1)."""

from __future__ import annotations

from collections import Counter
from dataclasses import astuple, fields
from typing import Any

import numpy as np

from outlier_study.config.options import name_only
from outlier_study.context import Context
from outlier_study.detect.attribution import (
    LIFECYCLE_HEADER,
    MAEvent,
    first_appearance,
    lifecycle_rows,
    tma_by_layer,
)
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import ma_events
from outlier_study.output.files import write_csv
from outlier_study.output.tables import Table, write_table

HEADER = ["layer", "top-1 TMA", "top-1 (token, channel)", "top-2 TMA", "top-2 (token, channel)", "windows"]


def _rank_cell(per_window: dict[int, list[MAEvent]], rank: int) -> tuple[str, str]:
    """Mean value over the windows that have this rank, and the most common position with its count."""
    hits = [lst[rank] for lst in per_window.values() if len(lst) > rank]
    if not hits:
        return "—", "—"
    (pos, count) = Counter((e.token, e.channel) for e in hits).most_common(1)[0]
    return f"{np.mean([e.value for e in hits]):.2f}", f"{pos} in {count}/{len(hits)}"


def table1_rows(events: list[MAEvent], n_layers: int, n_windows: int) -> list[list[Any]]:
    """The first two layers that generate TMAs and the model's last two layers (paper layout)."""
    by_layer = tma_by_layer(events)
    chosen = sorted(by_layer)[:2] + [n_layers - 2, n_layers - 1]
    rows = []
    for layer in sorted(set(chosen)):
        per_window = by_layer.get(layer, {})
        top1, top2 = _rank_cell(per_window, 0), _rank_cell(per_window, 1)
        rows.append([layer, top1[0], top1[1], top2[0], top2[1], f"{len(per_window)}/{n_windows}"])
    return rows


@experiment(
    "table1",
    name_only("table1", "true vs fake massive activations in the residual stream"),
    paper="Table 1",
    description="true (generated here) vs fake (carried) MAs in the residual stream: the top TMAs of the "
    "first layers that generate them and of the last two layers; where each channel's MAs are born and "
    "cancelled",
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    events = ma_events(ctx, ctx.layers)
    write_csv(ctx.job_dir / "ma_events.csv", [f.name for f in fields(MAEvent)], [astuple(e) for e in events])
    n_windows = ctx.windows.input_ids.shape[0]
    rows = table1_rows(events, ctx.lm.n_layers, n_windows)
    text = write_table(ctx.tables_dir, Table.of("table1", HEADER, rows))
    print(
        f"\nTable 1 — top TMAs per layer (values averaged over windows; layers from 0), {ctx.cfg.model.name}:"
    )
    print(text)
    life = write_table(ctx.tables_dir, Table.of("ma_lifecycle", LIFECYCLE_HEADER, lifecycle_rows(events)))
    print("Where residual MAs are generated and cancelled, per channel (counts over windows):")
    print(life)
    kinds = Counter(e.kind for e in events)
    first = first_appearance(events)
    return {
        "tma_count": kinds["TMA"],
        "fma_count": kinds["FMA"],
        "cancelled_count": kinds["cancelled"],
        "faded_count": kinds["faded"],
        "first_tma_layer": min(first.values()) if first else -1,
    }
