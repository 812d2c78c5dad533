"""Experiment `table45`: top-2 |a| at x1..x9 and y1..y7 of one layer and the next, with and without
MA removal at y6 of that layer (paper Tables 4 and 5)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from outlier_study.adapters.base import PAPER_ALIASES_GATED
from outlier_study.context import Context
from outlier_study.errors import require
from outlier_study.interventions.massive import replace_massive
from outlier_study.measure.profiler import Profile, profile_windows
from outlier_study.output.files import write_table

VALUES = ("zero", "mean")


def paper_taps(ctx: Context) -> list[tuple[str, str]]:
    """(paper name, canonical tap) for x1..x9, y1..y7 that this architecture has."""
    out = []
    for alias in PAPER_ALIASES_GATED:
        if alias in ctx.lm.adapter.aliases and ctx.lm.adapter.aliases[alias] in ctx.lm.adapter.taps:
            out.append((alias, ctx.lm.adapter.aliases[alias]))
    return out


def _cell(prof: Profile, layer: int, tap: str) -> str:
    top = prof.stats[(layer, tap)].top[:2]
    return " / ".join(f"{e.value:.2f}" for e in top) or "—"


def run(ctx: Context) -> dict[str, Any]:
    exp, th = ctx.cfg.experiment, ctx.cfg.threshold
    n = ctx.lm.n_layers
    require(0 <= exp.layer < n, "experiment.layer", f"layer {exp.layer} out of range", [f"0..{n - 1}"])
    require(exp.value in VALUES, "experiment.value", f"unknown value '{exp.value}'", VALUES)
    layers = sorted({exp.layer, min(exp.layer + 1, n - 1)})
    names = paper_taps(ctx)
    taps = sorted({tap for _, tap in names}, key=[t for _, t in names].index)
    profiles: dict[str, Profile] = {}
    for condition in ("original", f"y6 → {exp.value}"):
        ctxm = (
            nullcontext()
            if condition == "original"
            else replace_massive(ctx.lm, "mlp.hidden", [exp.layer], exp.value, th.ma_abs, th.ma_ratio)
        )
        with ctxm:
            profiles[condition] = profile_windows(
                ctx.lm,
                ctx.windows.input_ids,
                taps,
                layers,
                top_k=2,
                ma_abs=th.ma_abs,
                ma_ratio=th.ma_ratio,
                batch_size=ctx.cfg.dataset.batch_size,
                progress=ctx.cfg.progress,
                desc=f"table45 {condition}",
            )
    header = ["tap", "canonical"] + [f"layer {lay} {c} (top-1 / top-2)" for lay in layers for c in profiles]
    rows = [
        [alias, tap] + [_cell(p, lay, tap) for lay in layers for p in profiles.values()]
        for alias, tap in names
    ]
    text = write_table(ctx.tables_dir, "table45", header, rows)
    print(
        f"\nTables 4/5 — top-2 signed values at each tap, {ctx.cfg.model.name} (layers from 0; "
        f"MAs at y6 of layer {exp.layer} replaced by {exp.value}):"
    )
    print(text)
    removed = profiles[f"y6 → {exp.value}"]
    return {
        f"max_abs_y7_layer{exp.layer}_original": profiles["original"].stats[(exp.layer, "mlp.out")].max_abs,
        f"max_abs_y7_layer{exp.layer}_removed": removed.stats[(exp.layer, "mlp.out")].max_abs,
    }
