"""Experiment `perplexity`: token-level perplexity under any intervention of the `intervention` group."""

from __future__ import annotations

from typing import Any

from outlier_study.config.options import name_only
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, record_perplexity, zeroshot
from outlier_study.interventions import Inputs, intervene


@experiment(
    "perplexity",
    name_only("perplexity", "token-level perplexity under the configured intervention"),
    paper="",
    description="token-level perplexity (exp of the mean NLL over predicted tokens) under any intervention, "
    "e.g. intervention=massive intervention.tap=y6; zero-shot accuracy through lm-eval under it too when "
    "eval.tasks names tasks",
    uses=("intervention", "eval"),
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    name = str(cfg.intervention.name)
    inputs = Inputs(
        ctx.lm, cfg.intervention, ctx.threshold, ctx.windows.input_ids, progress=cfg.progress, seed=cfg.seed
    )
    accuracy = zeroshot(ctx)  # lm-eval's wrapper, built before the intervention applies
    with intervene(inputs) as change:
        result = evaluate(ctx, f"perplexity ({name})", change)
        summary, changed = change.summary("intervention"), change.total  # the perplexity windows' counts
        scores = accuracy(name)
    record_perplexity(ctx, {name: (result, changed, summary)})
    print(f"\nperplexity ({name}): {result.ppl:.4f} ({result.n_tokens} predicted tokens)")
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "n_tokens": result.n_tokens, **summary, **scores}
