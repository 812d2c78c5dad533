"""Weight-channel ablations with random controls: `table3` (outlier-triggering rows of W_q/W_k/W_v → row
mean) and `table6` (k-SD channels of QKV, γ and MLP weights → channel mean)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from outlier_study.detect.rules import Selection, check_sd_levels, random_like
from outlier_study.context import Context
from outlier_study.errors import ConfigError, require
from outlier_study.experiments.perplexity_tables import evaluate, protocol
from outlier_study.interventions.channel_edits import (
    detect_otc,
    gamma_sizes,
    sd_gamma_channels,
    sd_weight_channels,
    weight_sizes,
)
from outlier_study.interventions.parameters import check_axis, edit_gamma, edit_weight_channels
from outlier_study.output.files import write_json, write_table

Edit = Callable[[Selection], AbstractContextManager[Any]]
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "mlp": ("gate", "up", "down"),
    "norm": ("attn", "mlp"),
}


def _seeds(ctx: Context) -> list[int]:
    n = int(ctx.cfg.experiment.random_seeds)
    require(n >= 1, "experiment.random_seeds", f"must be >= 1, got {n}")
    return [int(ctx.cfg.seed) + i for i in range(n)]


def _ablate(
    ctx: Context, label: str, selection: Selection, sizes: dict[Any, int], edit: Edit
) -> dict[str, Any]:
    """PPL with `selection` edited, and with as many random channels per key over several seeds.

    An empty selection edits nothing, so its perplexity is the original's: it is not evaluated again."""
    count = sum(len(v) for v in selection.values())
    if count == 0:
        return {"count": 0, "ppl": None, "random": []}
    with edit(selection):
        ppl = evaluate(ctx, f"{label}").ppl
    randoms = []
    for seed in _seeds(ctx):
        with edit(random_like(selection, sizes, seed)):
            randoms.append(evaluate(ctx, f"{label} random seed {seed}").ppl)
    return {"count": count, "ppl": ppl, "random": randoms}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def _fmt(ppl: float | None, original: float) -> str:
    return f"{(original if ppl is None else ppl):.3f}"


def run_table3(ctx: Context) -> dict[str, Any]:
    """OTC rows (CO in x3/x4/x5, not in x2) set to their row mean vs as many random rows (paper Table 3)."""
    cfg = ctx.cfg
    matrices = [ctx.lm.adapter.weight_name(str(m), "experiment.matrices") for m in cfg.experiment.matrices]
    layers = ctx.layers
    otc = detect_otc(
        ctx.lm,
        ctx.windows.input_ids,
        matrices,
        layers,
        cfg.threshold,
        bool(cfg.progress),
        "experiment.matrices",
    )
    sizes = weight_sizes(ctx.lm, list(otc), "out")
    original = evaluate(ctx, "table3 original").ppl
    result = _ablate(
        ctx, "table3 OTC", otc, sizes, lambda sel: edit_weight_channels(ctx.lm, sel, "out", "channel_mean")
    )
    n_seeds = len(_seeds(ctx))
    header = [
        "dataset",
        "original",
        "OTC rows → row mean",
        f"random rows → row mean ({n_seeds} seeds)",
        "rows",
    ]
    row = [
        cfg.dataset.name,
        f"{original:.3f}",
        _fmt(result["ppl"], original),
        _mean_std(result["random"]),
        result["count"],
    ]
    text = write_table(ctx.tables_dir, "table3", header, [row])
    frac_rows = []
    metrics: dict[str, Any] = {"ppl_original": original, "otc_rows": result["count"]}
    for name in matrices:
        n_otc = sum(len(otc[(layer, name)]) for layer in layers)
        total = sum(sizes[(layer, name)] for layer in layers)
        frac_rows.append([f"W_{name}", n_otc, total, f"{100 * n_otc / total:.3f}%"])
        metrics[f"otc_fraction.{name}"] = n_otc / total
    frac = write_table(ctx.tables_dir, "table3_otc", ["matrix", "OTC rows", "rows", "fraction"], frac_rows)
    per_layer = [[layer, *(len(otc[(layer, n)]) for n in matrices)] for layer in layers]
    write_table(ctx.tables_dir, "table3_otc_by_layer", ["layer", *(f"W_{n}" for n in matrices)], per_layer)
    write_json(
        ctx.job_dir / "perplexity.json",
        {**protocol(ctx), "original": original, **result, "seeds": _seeds(ctx)},
    )
    write_json(ctx.job_dir / "otc_rows.json", {f"{layer}.{n}": v.tolist() for (layer, n), v in otc.items()})
    print(f"\nTable 3 — token-level perplexity, {cfg.model.name}:\n{text}\nOTC fraction per matrix:\n{frac}")
    metrics["ppl_otc_mean"] = result["ppl"] if result["ppl"] is not None else original
    if result["random"]:
        metrics["ppl_random_mean"] = statistics.fmean(result["random"])
    return metrics


def _table6_selection(ctx: Context, target: str, k: float) -> tuple[Selection, dict[Any, int], Edit]:
    cfg = ctx.cfg.experiment
    lm, layers = ctx.lm, ctx.layers
    if target == "norm":
        norms = list(TARGETS["norm"])
        sel = sd_gamma_channels(lm, norms, layers, k, str(cfg.statistic))
        return sel, gamma_sizes(lm, list(sel)), lambda s: edit_gamma(lm, s, "mean")
    axis = check_axis(str(cfg.axis), "experiment.axis")
    names = [n for n in TARGETS[target] if n in lm.adapter.weights]
    sel = sd_weight_channels(lm, names, layers, k, str(cfg.statistic), axis)
    return sel, weight_sizes(lm, list(sel), axis), lambda s: edit_weight_channels(lm, s, axis, "channel_mean")


def run_table6(ctx: Context) -> dict[str, Any]:
    """k-SD channels (per-channel statistic vs the mean over channels) → channel mean, vs random (Table 6)."""
    cfg = ctx.cfg
    levels = check_sd_levels(cfg.threshold.sd)
    targets = [str(t) for t in cfg.experiment.targets]
    for t in targets:
        if t not in TARGETS:
            raise ConfigError("experiment.targets", f"unknown target '{t}'", allowed=TARGETS)
    check_axis(str(cfg.experiment.axis), "experiment.axis")
    original = evaluate(ctx, "table6 original").ppl
    results: dict[str, dict[str, Any]] = {}
    for k in levels:
        for target in targets:
            sel, sizes, edit = _table6_selection(ctx, target, k)
            results[f"{k:g}/{target}"] = _ablate(ctx, f"table6 {target} {k:g}SD", sel, sizes, edit)
    header = ["k (SD)"]
    for t in targets:
        header += [f"{t} channels", f"{t} → mean", f"{t} random → mean"]
    rows = []
    for k in levels:
        row: list[Any] = [f"{k:g}"]
        for t in targets:
            r = results[f"{k:g}/{t}"]
            row += [r["count"], _fmt(r["ppl"], original), _mean_std(r["random"])]
        rows.append(row)
    text = write_table(ctx.tables_dir, "table6", header, rows)
    write_json(
        ctx.job_dir / "perplexity.json",
        {
            **protocol(ctx),
            "original": original,
            "results": results,
            "statistic": str(cfg.experiment.statistic),
            "axis": str(cfg.experiment.axis),
            "seeds": _seeds(ctx),
        },
    )
    print(
        f"\nTable 6 — token-level perplexity, {cfg.model.name} (original {original:.3f}, "
        f"statistic {cfg.experiment.statistic}, axis {cfg.experiment.axis}):\n{text}"
    )
    metrics: dict[str, Any] = {"ppl_original": original}
    for key, r in results.items():
        slug = key.replace("/", ".")
        metrics[f"channels.{slug}"] = r["count"]
        metrics[f"ppl.{slug}"] = original if r["ppl"] is None else r["ppl"]
        if r["random"]:
            metrics[f"ppl_random.{slug}"] = statistics.fmean(r["random"])
    return metrics
