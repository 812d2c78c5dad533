"""Experiment `table3`: outlier-triggering rows of W_q/W_k/W_v set to their row mean, against as many random
rows (paper Table 3), and the OTC fraction of each matrix."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.base import Arch
from outlier_study.config.options import opt
from outlier_study.context import Context
from outlier_study.detect.rules import OTC_INPUT_TAP, OTC_OUTPUT_TAP
from outlier_study.detect.select import detect_otc, weight_sizes
from outlier_study.errors import ConfigError
from outlier_study.experiments.ablation import Evaluations, ablate, mean_std, ppl_text, seeds
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, record_perplexity
from outlier_study.interventions.parameters import edit_weight_channels
from outlier_study.output.files import write_json
from outlier_study.output.tables import Table, write_table


@dataclass
class Table3Options:
    name: str = opt("table3", "OTC rows → row mean vs random rows")
    matrices: list[str] = opt(["q", "k", "v"], "weights searched for OTC rows (q, k, v)", min_items=1)
    random_seeds: int = opt(3, "random controls per row (seeds seed .. seed + n − 1)", ge=1)


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    arch.adapter.canonical(OTC_INPUT_TAP, "experiment.name")  # the OTC rule compares against x2
    for m in options.matrices:
        arch.adapter.weight_name(str(m), "experiment.matrices")
        if str(m) not in OTC_OUTPUT_TAP:
            raise ConfigError("experiment.matrices", f"no OTC rule for matrix '{m}'", allowed=OTC_OUTPUT_TAP)


@experiment(
    "table3",
    Table3Options,
    paper="Table 3",
    description="perplexity with the outlier-triggering rows (row j of W_q/W_k/W_v whose output channel j "
    "is a CO while input channel j of x2 is not) set to their row mean, vs as many random rows; OTC fraction",
    check=_check,
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    matrices = [str(m) for m in cfg.experiment.matrices]
    layers = ctx.layers
    otc = detect_otc(
        ctx.lm,
        ctx.windows.input_ids,
        matrices,
        layers,
        ctx.threshold,
        bool(cfg.progress),
        "experiment.matrices",
    )
    sizes = weight_sizes(ctx.lm, list(otc), "out")
    original = evaluate(ctx, "table3 original")
    evaluations: Evaluations = {"table3 original": (original, None, {})}
    result = ablate(
        ctx,
        "table3 OTC",
        otc,
        sizes,
        lambda sel: edit_weight_channels(ctx.lm, sel, "out", "channel_mean"),
        evaluations,
    )
    n_seeds = len(seeds(ctx))
    header = [
        "dataset",
        "original",
        "OTC rows → row mean",
        f"random rows → row mean ({n_seeds} seeds)",
        "rows",
    ]
    row = [
        cfg.dataset.name,
        f"{original.ppl:.3f}",
        ppl_text(result["ppl"], original.ppl),
        mean_std(result["random"]),
        result["count"],
    ]
    text = write_table(ctx.tables_dir, Table.of("table3", header, [row]))
    frac_rows = []
    metrics: dict[str, Any] = {"ppl_original": original.ppl, "otc_rows": result["count"]}
    for name in matrices:
        n_otc = sum(len(otc[(layer, name)]) for layer in layers)
        total = sum(sizes[(layer, name)] for layer in layers)
        frac_rows.append([f"W_{name}", n_otc, total, f"{100 * n_otc / total:.3f}%"])
        metrics[f"otc_fraction.{name}"] = n_otc / total
    frac = write_table(
        ctx.tables_dir, Table.of("table3_otc", ["matrix", "OTC rows", "rows", "fraction"], frac_rows)
    )
    per_layer = [[layer, *(len(otc[(layer, n)]) for n in matrices)] for layer in layers]
    write_table(
        ctx.tables_dir, Table.of("table3_otc_by_layer", ["layer", *(f"W_{n}" for n in matrices)], per_layer)
    )
    record_perplexity(ctx, evaluations, seeds=seeds(ctx), otc_rows=result["count"])
    write_json(ctx.job_dir / "otc_rows.json", {f"{layer}.{n}": v.tolist() for (layer, n), v in otc.items()})
    print(f"\nTable 3 — token-level perplexity, {cfg.model.name}:\n{text}\nOTC fraction per matrix:\n{frac}")
    metrics["ppl_otc_mean"] = result["ppl"] if result["ppl"] is not None else original.ppl
    if result["random"]:
        metrics["ppl_random_mean"] = statistics.fmean(result["random"])
    return metrics
