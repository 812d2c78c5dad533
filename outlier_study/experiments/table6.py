"""Experiment `table6`: channels whose per-channel statistic lies more than k SD from the mean over
channels, of the QKV weights, the norms' γ and the MLP weights, set to the channel mean, against as many
random channels (paper Table 6)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.base import Arch
from outlier_study.config.options import opt
from outlier_study.config.vocab import Axis, Statistic, WeightGroup
from outlier_study.context import Context
from outlier_study.detect.rules import Selection
from outlier_study.detect.select import gamma_sizes, sd_gamma_channels, sd_weight_channels, weight_sizes
from outlier_study.experiments.ablation import Edit, Evaluations, ablate, mean_std, ppl_text, seeds
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, record_perplexity
from outlier_study.interventions.parameters import edit_gamma, edit_weight_channels
from outlier_study.output.tables import Table, write_table

# The weights (or norms, for γ) of each target group.
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "mlp": ("gate", "up", "down"),
}


@dataclass
class Table6Options:
    name: str = opt("table6", "k-SD channels of QKV / γ / MLP weights → channel mean vs random")
    targets: list[WeightGroup] = opt(
        [WeightGroup.qkv, WeightGroup.norm, WeightGroup.mlp], "weight groups", min_items=1
    )
    statistic: Statistic = opt(
        Statistic.absmean, "absmean | mean | absmax | l2 of each channel's weights (γ: the entry)"
    )
    axis: Axis = opt(Axis.out, "out: rows (output channels) | in: columns (input channels) of each weight")
    random_seeds: int = opt(3, "random controls per level and target (seeds seed .. seed + n − 1)", ge=1)


def _selection(ctx: Context, target: str, k: float) -> tuple[Selection, dict[Any, int], Edit]:
    exp, lm, layers = ctx.cfg.experiment, ctx.lm, ctx.layers
    if target == "norm":
        norms = lm.adapter.norm_names("both", "experiment.targets")
        sel = sd_gamma_channels(lm, norms, layers, k, str(exp.statistic))
        return sel, gamma_sizes(lm, list(sel)), lambda s: edit_gamma(lm, s, "mean")
    axis = str(exp.axis)
    names = [n for n in TARGETS[target] if n in lm.adapter.weights]
    if target == "mlp":  # the dense MLPs: a MoE layer's experts are not channel-edited here
        layers = [layer for layer in layers if layer not in lm.adapter.moe]
    sel = sd_weight_channels(lm, names, layers, k, str(exp.statistic), axis)
    return sel, weight_sizes(lm, list(sel), axis), lambda s: edit_weight_channels(lm, s, axis, "channel_mean")


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    if "norm" in [str(t) for t in options.targets]:
        arch.adapter.norm_names("both", "experiment.targets")


@experiment(
    "table6",
    Table6Options,
    paper="Table 6",
    description="channels more than k SD (threshold.sd) from the mean over channels, of the QKV weights, the "
    "norms' γ and the MLP weights, set to the channel mean, vs as many random channels",
    check=_check,
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    levels = [float(k) for k in ctx.threshold.sd]
    targets = [str(t) for t in cfg.experiment.targets]
    original = evaluate(ctx, "table6 original")
    evaluations: Evaluations = {"table6 original": (original, None, {})}
    results: dict[str, dict[str, Any]] = {}
    for k in levels:
        for target in targets:
            sel, sizes, edit = _selection(ctx, target, k)
            results[f"{k:g}/{target}"] = ablate(
                ctx, f"table6 {target} {k:g}SD", sel, sizes, edit, evaluations
            )
    header = ["k (SD)"]
    for t in targets:
        header += [f"{t} channels", f"{t} → mean", f"{t} random → mean"]
    rows = []
    for k in levels:
        row: list[Any] = [f"{k:g}"]
        for t in targets:
            r = results[f"{k:g}/{t}"]
            row += [r["count"], ppl_text(r["ppl"], original.ppl), mean_std(r["random"])]
        rows.append(row)
    text = write_table(ctx.tables_dir, Table.of("table6", header, rows))
    record_perplexity(
        ctx,
        evaluations,
        ablations=results,
        statistic=str(cfg.experiment.statistic),
        axis=str(cfg.experiment.axis),
        seeds=seeds(ctx),
    )
    print(
        f"\nTable 6 — token-level perplexity, {cfg.model.name} (original {original.ppl:.3f}, "
        f"statistic {cfg.experiment.statistic}, axis {cfg.experiment.axis}):\n{text}"
    )
    metrics: dict[str, Any] = {"ppl_original": original.ppl}
    for key, r in results.items():
        slug = key.replace("/", ".")
        metrics[f"channels.{slug}"] = r["count"]
        metrics[f"ppl.{slug}"] = original.ppl if r["ppl"] is None else r["ppl"]
        if r["random"]:
            metrics[f"ppl_random.{slug}"] = statistics.fmean(r["random"])
    return metrics
