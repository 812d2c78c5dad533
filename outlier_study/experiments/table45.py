"""Experiment `table45`: top-2 |a| at x1..x9 and y1..y7 of one layer and the next, with and without
MA removal at y6 of that layer (paper Tables 4 and 5)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from outlier_study.config.options import opt
from outlier_study.config.vocab import MAValue
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import check_experiment_layer, profile
from outlier_study.interventions.massive import replace_massive
from outlier_study.measure.profiler import Profile
from outlier_study.output.tables import Table, write_table


@dataclass
class Table45Options:
    name: str = opt("table45", "top-2 values at x1..y7 of one layer and the next, before/after y6 MA removal")
    layer: int = opt(
        1, "layer (from 0, negative from the end) whose taps are tabulated; the next is shown too"
    )
    value: MAValue = opt(MAValue.mean, "zero | mean: what the MAs at y6 of that layer are replaced with")


def _cell(prof: Profile, layer: int, tap: str) -> str:
    top = prof.stats[(layer, tap)].top[:2]
    return " / ".join(f"{e.value:.2f}" for e in top) or "—"


@experiment(
    "table45",
    Table45Options,
    paper="Tables 4, 5",
    description="top-2 signed values at x1..x9 and y1..y7 of experiment.layer and the next layer, original "
    "and with the MAs at y6 of that layer replaced by experiment.value",
    check=check_experiment_layer,
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    exp, th = ctx.cfg.experiment, ctx.threshold
    layer = ctx.experiment_layer()
    layers = sorted({layer, min(layer + 1, ctx.lm.n_layers - 1)})
    names = ctx.lm.adapter.paper_taps()
    taps = list(dict.fromkeys(tap for _, tap in names))
    removed = f"y6 → {exp.value}"
    profiles: dict[str, Profile] = {}
    for condition in ("original", removed):
        edit = (
            nullcontext()
            if condition == "original"
            else replace_massive(
                ctx.lm, "mlp.hidden", [layer], exp.value, float(th.ma_abs), float(th.ma_ratio)
            )
        )
        with edit:
            profiles[condition] = profile(
                ctx, taps, layers, top_k=2, desc=f"table45 {condition}", moments=False
            )
    header = ["tap", "canonical"] + [f"layer {lay} {c} (top-1 / top-2)" for lay in layers for c in profiles]
    rows = [
        [alias, tap] + [_cell(p, lay, tap) for lay in layers for p in profiles.values()]
        for alias, tap in names
    ]
    text = write_table(ctx.tables_dir, Table.of("table45", header, rows))
    print(
        f"\nTables 4/5 — top-2 signed values at each tap, {ctx.cfg.model.name} (layers from 0; "
        f"MAs at y6 of layer {layer} replaced by {exp.value}):"
    )
    print(text)
    return {
        f"max_abs_y7_layer{layer}_original": profiles["original"].stats[(layer, "mlp.out")].max_abs,
        f"max_abs_y7_layer{layer}_removed": profiles[removed].stats[(layer, "mlp.out")].max_abs,
    }
