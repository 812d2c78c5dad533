"""Experiment `perplexity`: token-level perplexity under any intervention of the `intervention` group."""

from __future__ import annotations

from typing import Any

from outlier_study.config.options import name_only
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, record_perplexity
from outlier_study.interventions import Inputs, intervene


@experiment(
    "perplexity",
    name_only("perplexity", "token-level perplexity under the configured intervention"),
    paper="",
    description="token-level perplexity (exp of the mean NLL over predicted tokens) under any intervention, "
    "e.g. intervention=massive intervention.tap=y6",
    uses=("intervention",),
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    name = str(cfg.intervention.name)
    inputs = Inputs(
        ctx.lm, cfg.intervention, ctx.threshold, ctx.windows.input_ids, progress=cfg.progress, seed=cfg.seed
    )
    with intervene(inputs) as change:
        result = evaluate(ctx, f"perplexity ({name})", change)
    summary = change.summary("intervention")
    record_perplexity(ctx, {name: (result, change.total, summary)})
    print(f"\nperplexity ({name}): {result.ppl:.4f} ({result.n_tokens} predicted tokens)")
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "n_tokens": result.n_tokens, **summary}
