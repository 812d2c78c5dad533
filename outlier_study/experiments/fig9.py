"""Experiment `fig9`: CO counts per layer at the norm inputs and outputs, original vs the norms' γ at the
output COs set to the mean or zero, with the perplexity of each setting (paper Fig. 9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.base import Arch
from outlier_study.config.options import opt
from outlier_study.config.vocab import GammaValue
from outlier_study.context import Context
from outlier_study.detect.rules import cos_by_key
from outlier_study.detect.select import norm_output_cos
from outlier_study.errors import require
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import channel_profile, co_rule, evaluate, record_perplexity
from outlier_study.interventions.parameters import edit_gamma
from outlier_study.interventions.record import Change, Unchanged
from outlier_study.output.figures import co_counts_figure
from outlier_study.output.files import write_figure, write_json
from outlier_study.output.tables import Table, write_table


@dataclass
class Fig9Options:
    name: str = opt("fig9", "CO count per layer, original vs γ at the norm-output COs edited")
    norm: str = opt("both", "attn | mlp | both: whose γ is edited")
    gamma_values: list[GammaValue] = opt(
        [GammaValue.mean, GammaValue.zero], "γ edits compared with the original", min_items=1
    )


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    allowed = ["attn", "mlp", "both"]
    require(str(options.norm) in allowed, "experiment.norm", f"unknown norm '{options.norm}'", allowed)
    arch.adapter.norm_names(str(options.norm), "experiment.norm")


@experiment(
    "fig9",
    Fig9Options,
    paper="Fig. 9",
    description="CO count per layer at the norm inputs and outputs for the original model and with the "
    "norms' γ at the COs of their output set to the γ mean or zero; perplexity of each setting",
    check=_check,
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    """The γ entries are those at the COs of each norm's output in the original model (detected once), so the
    curves compare one model under several edits; perplexity shows what each edit costs."""
    cfg, th = ctx.cfg, ctx.threshold
    m, beta = float(th.m), float(th.beta)
    norms = ctx.lm.adapter.norm_names(str(cfg.experiment.norm), "experiment.norm")
    inputs = {side: triple[0] for side, triple in ctx.lm.adapter.norm_taps().items()}
    taps = list(dict.fromkeys(t for n in norms for t in (inputs[n], ctx.lm.adapter.norms[n].output_tap)))
    layers = ctx.layers
    selection = norm_output_cos(ctx.lm, ctx.windows.input_ids, norms, layers, th, bool(cfg.progress))
    series: dict[str, dict[str, list[int]]] = {}
    results = {}
    settings: list[tuple[str, str | None]] = [("original", None)]
    settings += [(f"γ → {v}", str(v)) for v in cfg.experiment.gamma_values]
    for label, value in settings:
        change: Change
        if value is None:
            change = Unchanged()
            summaries, result = channel_profile(ctx, taps, layers), evaluate(ctx, label)
        else:
            with edit_gamma(ctx.lm, selection, value) as change:
                summaries, result = channel_profile(ctx, taps, layers), evaluate(ctx, label)
        results[label] = (result, change.total, {"gamma": value})
        cos = cos_by_key(summaries, m, beta)
        series[label] = {tap: [len(cos[(layer, tap)]) for layer in layers] for tap in taps}
    title = f"{cfg.model.name}: CO count per layer, γ at the norm-output COs edited (m={m:g}, β={beta:.3g})"
    write_figure(ctx.figures_dir / "fig9.png", co_counts_figure(layers, series, title))
    header = ["layer", *(f"{tap} {label}" for tap in taps for label in series)]
    rows = [
        [layer, *(series[label][tap][i] for tap in taps for label in series)]
        for i, layer in enumerate(layers)
    ]
    write_table(ctx.tables_dir, Table.of("fig9_counts", header, rows))
    edited = sum(len(v) for v in selection.values())
    summary_rows = [
        [label, *(sum(series[label][tap]) for tap in taps), f"{results[label][0].ppl:.3f}"]
        for label in series
    ]
    text = write_table(
        ctx.tables_dir, Table.of("fig9", ["setting", *(f"COs {t}" for t in taps), "ppl"], summary_rows)
    )
    write_json(
        ctx.job_dir / "gamma_channels.json",
        {f"{layer}.{n}": v.tolist() for (layer, n), v in selection.items()},
    )
    record_perplexity(ctx, results, gamma_entries_edited=edited)
    print(f"\nFig. 9 — CO count summed over layers ({edited} γ entries edited):\n{text}")
    metrics: dict[str, Any] = {**co_rule(ctx), "gamma_entries_edited": edited}
    for label in series:
        slug = label.replace("γ → ", "gamma_")
        metrics[f"ppl.{slug}"] = results[label][0].ppl
        metrics.update({f"co_total.{slug}.{tap}": sum(series[label][tap]) for tap in taps})
    return metrics
