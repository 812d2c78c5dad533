"""Experiments `perplexity` (any intervention) and `table2` (MAs at y6 / y7 → mean / zero, paper Table 2)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from outlier_study.context import Context
from outlier_study.interventions import intervention
from outlier_study.interventions.massive import InterventionLog, replace_massive
from outlier_study.measure.perplexity import Perplexity, evaluate_perplexity
from outlier_study.output.files import write_json, write_table
from outlier_study.sweep.resume import WindowCheckpoint, checkpoint_path, config_fingerprint


def evaluate(ctx: Context, desc: str, counters: dict[Any, int] | None = None) -> Perplexity:
    """One perplexity evaluation of the job, checkpointed under the job dir by `desc` (unique per job), so
    a preempted or requeued job resumes it; `counters`: an intervention's per-layer counts, kept with it."""
    bs = ctx.cfg.dataset.batch_size
    checkpoint = WindowCheckpoint(
        checkpoint_path(ctx.job_dir, desc), key=f"{config_fingerprint(ctx.cfg)}|{desc}"
    )
    return evaluate_perplexity(
        ctx.lm,
        ctx.windows.input_ids,
        batch_size=bs,
        progress=ctx.cfg.progress,
        desc=desc,
        checkpoint=checkpoint,
        counters=counters,
    )


def _counts(log: object) -> dict[Any, int] | None:
    """The per-layer counts an intervention's hooks add to during an evaluation (None: nothing counted)."""
    return log.changed if isinstance(log, InterventionLog) else None


def protocol(ctx: Context) -> dict[str, Any]:
    """Everything that defines the number: data protocol, dtype, what is averaged."""
    return {
        **ctx.windows.protocol,
        "dtype": str(ctx.cfg.dtype),
        "model": ctx.cfg.model.name,
        "metric": "token-level perplexity: exp(mean NLL over predicted tokens), not word perplexity",
    }


def run_perplexity(ctx: Context) -> dict[str, Any]:
    th = ctx.cfg.threshold
    ids, cfg = ctx.windows.input_ids, ctx.cfg
    with intervention(ctx.lm, cfg.intervention, th, ids, cfg.progress, cfg.seed) as log:
        result = evaluate(ctx, f"perplexity ({ctx.cfg.intervention.name})", _counts(log))
    changed = log.total if log is not None else 0
    write_json(
        ctx.job_dir / "perplexity.json",
        {
            **protocol(ctx),
            "intervention": ctx.cfg.intervention.name,
            "ppl": result.ppl,
            "n_tokens": result.n_tokens,
            "changed_elements": changed,
        },
    )
    print(
        f"\nperplexity ({ctx.cfg.intervention.name}): {result.ppl:.4f} ({result.n_tokens} predicted tokens)"
    )
    summary = log.summary() if log is not None else {"intervention.name": "none"}
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "n_tokens": result.n_tokens, **summary}


TABLE2_COLUMNS: tuple[tuple[str, str | None, str | None], ...] = (
    ("original", None, None),
    ("y6 → mean", "mlp.hidden", "mean"),
    ("y6 → zero", "mlp.hidden", "zero"),
    ("y7 → mean", "mlp.out", "mean"),
    ("y7 → zero", "mlp.out", "zero"),
)


def run_table2(ctx: Context) -> dict[str, Any]:
    """One loaded model, five evaluations: original, then TMAs at y6 and y7 replaced by mean or zero."""
    th = ctx.cfg.threshold
    layers = list(range(ctx.lm.n_layers))
    results: dict[str, float] = {}
    changed: dict[str, int] = {}
    for column, tap, value in TABLE2_COLUMNS:
        make: Callable[[], AbstractContextManager[Any]] = (
            (lambda t=tap, v=value: replace_massive(ctx.lm, t, layers, v, th.ma_abs, th.ma_ratio))
            if tap
            else nullcontext
        )
        with make() as log:
            results[column] = evaluate(ctx, f"table2 {column}", _counts(log)).ppl
        changed[column] = log.total if log is not None else 0
    header = ["dataset", *results]
    rows = [
        [ctx.cfg.dataset.name, *(f"{v:.3f}" for v in results.values())],
        ["replaced elements", *changed.values()],
    ]
    text = write_table(ctx.tables_dir, "table2", header, rows)
    write_json(
        ctx.job_dir / "perplexity.json", {**protocol(ctx), "ppl": results, "changed_elements": changed}
    )
    print(f"\nTable 2 — token-level perplexity, {ctx.cfg.model.name}, {ctx.cfg.dataset.name}:")
    print(text)
    slug = {
        "original": "ppl_original",
        "y6 → mean": "ppl_y6_mean",
        "y6 → zero": "ppl_y6_zero",
        "y7 → mean": "ppl_y7_mean",
        "y7 → zero": "ppl_y7_zero",
    }
    return {slug[k]: v for k, v in results.items()}
