"""Experiment `table2`: perplexity with the MAs at y6 / y7 of every layer set to the mean or zero
(paper Table 2)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from outlier_study.config.options import name_only
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, record_perplexity
from outlier_study.interventions.massive import replace_massive
from outlier_study.interventions.record import Unchanged
from outlier_study.output.tables import Table, write_table

# (column, tap, value, metrics key): the original model, then the MAs at y6 and y7 replaced.
COLUMNS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("original", None, None, "ppl_original"),
    ("y6 → mean", "mlp.hidden", "mean", "ppl_y6_mean"),
    ("y6 → zero", "mlp.hidden", "zero", "ppl_y6_zero"),
    ("y7 → mean", "mlp.out", "mean", "ppl_y7_mean"),
    ("y7 → zero", "mlp.out", "zero", "ppl_y7_zero"),
)


@experiment(
    "table2",
    name_only("table2", "perplexity with the MAs at y6 / y7 replaced by the mean or zero"),
    paper="Table 2",
    description="token-level perplexity of the original model and with the MAs at y6 (mlp.hidden) and y7 "
    "(mlp.out) of every layer replaced by the tensor mean or zero; one model load serves all five",
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    th = ctx.threshold
    results, metrics = {}, {}
    for column, tap, value, key in COLUMNS:
        edit = (
            replace_massive(ctx.lm, tap, None, value, float(th.ma_abs), float(th.ma_ratio))
            if tap is not None and value is not None
            else nullcontext(Unchanged())
        )
        with edit as change:
            result = evaluate(ctx, f"table2 {column}", change)
        results[column] = (result, change.total, {"tap": tap, "value": value})
        metrics[key] = result.ppl
    header = ["dataset", *results]
    rows = [
        [ctx.cfg.dataset.name, *(f"{r.ppl:.3f}" for r, _, _ in results.values())],
        ["replaced elements", *(changed for _, changed, _ in results.values())],
    ]
    text = write_table(ctx.tables_dir, Table.of("table2", header, rows))
    record_perplexity(ctx, results)
    print(f"\nTable 2 — token-level perplexity, {ctx.cfg.model.name}, {ctx.cfg.dataset.name}:")
    print(text)
    return metrics
