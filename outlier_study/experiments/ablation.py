"""Ablations with random controls, shared by the weight-channel tables (Tables 3 and 6): perplexity with a
selection edited, and with as many random channels per key over several recorded seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from outlier_study.context import Context
from outlier_study.detect.rules import Selection, random_like
from outlier_study.experiments.common import evaluate
from outlier_study.measure.perplexity import Perplexity

Edit = Callable[[Selection], AbstractContextManager[Any]]
Evaluations = dict[str, tuple[Perplexity, int | None, dict[str, Any]]]


def seeds(ctx: Context) -> list[int]:
    """The random controls' seeds: seed .. seed + random_seeds − 1."""
    return [int(ctx.cfg.seed) + i for i in range(int(ctx.cfg.experiment.random_seeds))]


def ablate(
    ctx: Context,
    label: str,
    selection: Selection,
    sizes: dict[Any, int],
    edit: Edit,
    evaluations: Evaluations,
) -> dict[str, Any]:
    """PPL with `selection` edited, and with as many random channels per key for each seed; every evaluation
    is added to `evaluations` (label -> result, channels changed, setting) for perplexity.json.

    An empty selection edits nothing, so its perplexity is the original's: it is not evaluated again."""
    count = sum(len(v) for v in selection.values())
    if count == 0:
        return {"count": 0, "ppl": None, "random": []}
    with edit(selection):
        result = evaluate(ctx, f"{label}")
    evaluations[label] = (result, count, {"control": None})
    randoms = []
    for seed in seeds(ctx):
        control = random_like(selection, sizes, seed)
        with edit(control):
            random = evaluate(ctx, f"{label} random seed {seed}")
        drawn = sum(len(v) for v in control.values())
        evaluations[f"{label} random seed {seed}"] = (random, drawn, {"control": "random", "seed": seed})
        randoms.append(random.ppl)
    return {"count": count, "ppl": result.ppl, "random": randoms}


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def ppl_text(ppl: float | None, original: float) -> str:
    """An ablation's perplexity; an empty selection's is the original's."""
    return f"{(original if ppl is None else ppl):.3f}"
