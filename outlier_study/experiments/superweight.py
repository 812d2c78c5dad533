"""Experiment `superweight`: from operator to weight (beyond the paper).

Per layer, where the spikes at the down projection's input (y6) and output (y7) sit; the candidate super
weights W[i, j] that join them, with their rank in row and column and the MA of the lifecycle each one
makes (or cancels); and perplexity with each candidate zeroed or scaled and its whole output row i or
input column j zeroed, each against as many random weights, rows or columns of the same matrix and layer
over several recorded seeds. Every edit is undone bit-exactly before the next evaluation.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from outlier_study.config.options import opt
from outlier_study.config.vocab import Ablation
from outlier_study.context import Context
from outlier_study.detect.attribution import MAEvent, sites
from outlier_study.detect.rules import Selection
from outlier_study.detect.superweight import (
    Y6,
    Y7,
    Peaks,
    SuperWeight,
    check_dense_down,
    dense_layers,
    detect_super_weights,
    down_views,
    peak_site,
    weight_rank,
)
from outlier_study.experiments.ablation import Edit, Evaluations, ablate, mean_std, seeds
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import evaluate, ma_events, record_perplexity, token_text
from outlier_study.interventions.weights import Target, edit_weights
from outlier_study.output import figures
from outlier_study.output.files import write_figure, write_json
from outlier_study.output.tables import Table, write_table


@dataclass
class SuperweightOptions:
    name: str = opt("superweight", "super weights: y6/y7 spikes, candidates W[i, j], ablations vs random")
    ablations: list[Ablation] = opt(
        list(Ablation), "per candidate: weight_zero weight_scale row_zero col_zero ([]: none)"
    )
    scale: float = opt(2.0, "weight_scale: the factor the candidate weight is multiplied by")
    random_seeds: int = opt(3, "random controls per ablation (seeds seed .. seed + n − 1)", ge=1)
    max_candidates: int | None = opt(
        None, "ablate the N candidates with the largest |y7| peak; null: every candidate", ge=1
    )


@dataclass(frozen=True)
class Unit:
    """What one index of an ablation's selection is: a weight (flat (out, in) index), a row or a column."""

    index: Callable[[SuperWeight, tuple[int, int]], int]  # the candidate's own index
    size: Callable[[tuple[int, int]], int]  # how many there are in the matrix
    target: Callable[[int, int, tuple[int, int]], Target]  # (layer, index, shape) -> what is edited


UNITS: dict[str, Unit] = {
    "weight": Unit(
        lambda sw, shape: sw.row * shape[1] + sw.col,
        lambda shape: shape[0] * shape[1],
        lambda layer, k, shape: Target(layer, "down", *divmod(k, shape[1])),
    ),
    "row": Unit(
        lambda sw, _: sw.row, lambda shape: shape[0], lambda layer, k, _: Target(layer, "down", row=k)
    ),
    "col": Unit(
        lambda sw, _: sw.col, lambda shape: shape[1], lambda layer, k, _: Target(layer, "down", col=k)
    ),
}


@dataclass(frozen=True)
class Kind:
    column: str  # its name in the ablation table
    unit: str  # a key of UNITS
    mode: str  # zero | scale


KINDS: dict[str, Kind] = {
    "weight_zero": Kind("W[i, j] → 0", "weight", "zero"),
    "weight_scale": Kind("W[i, j] × scale", "weight", "scale"),
    "row_zero": Kind("row i → 0", "row", "zero"),
    "col_zero": Kind("column j → 0", "col", "zero"),
}


LAYER_HEADER = [
    "layer",
    "y6 channel j",
    "y6 windows",
    "y6 peak (mean)",
    "y6 token",
    "y6 MA windows",
    "max |y6|",
    "y7 channel i",
    "y7 windows",
    "y7 peak (mean)",
    "y7 token",
    "y7 MA windows",
    "max |y7|",
    "candidate",
]


def layer_rows(
    peaks: Peaks, layers: list[int], candidates: dict[int, SuperWeight], ma: tuple[float, float]
) -> list[list[Any]]:
    """Per layer: the most common channel of the window peaks at y6 and y7, their token and strength."""
    rows = []
    for layer in layers:
        row: list[Any] = [layer]
        for tap in (Y6, Y7):
            site = peak_site(peaks[(layer, tap)], *ma)
            if site is None:
                row += ["—"] * 6
                continue
            n = len(peaks[(layer, tap)])
            token = f"{site.token} in {site.token_windows}/{site.windows}"
            row += [site.channel, f"{site.windows}/{n}", f"{site.value:.2f}", token, site.massive]
            row.append(f"{site.max_abs:.2f}")
        row.append(candidates[layer].label if layer in candidates else "—")
        rows.append(row)
    return rows


CANDIDATE_HEADER = [
    "layer",
    "i (y7 channel)",
    "j (y6 channel)",
    "W[i, j]",
    "rank in row i",
    "rank in column j",
    "token",
    "token text",
    "windows",
    "y6 spike",
    "y7 peak",
    "y7 MA windows",
    "W[i, j]·y6 / y7",
    "at its layer",
    "MA of channel i born at",
    "cancelled at",
]


def _ma_of(sw: SuperWeight, events: list[MAEvent]) -> list[Any]:
    """The MA of the lifecycle at the candidate's (token, channel i) in its windows: what happens to it at
    the candidate's layer (born as a TMA, or cancelled), where it is born and where it is cancelled."""
    windows = set(sw.windows)
    mine = [e for e in events if (e.channel, e.token) == (sw.row, sw.token) and e.window in windows]
    here = Counter(e.kind for e in mine if e.layer == sw.layer and e.kind != "FMA")
    at_layer = ", ".join(f"{kind} ×{n}" for kind, n in sorted(here.items())) or "—"
    return [at_layer, sites(mine, "TMA"), sites(mine, "cancelled")]


def candidate_rows(
    ctx: Context, candidates: Sequence[SuperWeight], views: dict[int, torch.Tensor], events: list[MAEvent]
) -> list[list[Any]]:
    ids = ctx.windows.input_ids
    rows = []
    for sw in candidates:
        rank = weight_rank(views[sw.layer], sw.row, sw.col)
        texts = Counter(token_text(ctx.lm.tokenizer, int(ids[w, sw.token])) for w in sw.windows)
        rows.append(
            [
                sw.layer,
                sw.row,
                sw.col,
                f"{rank.value:.4g}",
                rank.row_rank,
                rank.col_rank,
                sw.token,
                texts.most_common(1)[0][0],
                f"{len(sw.windows)}/{ids.shape[0]}",
                f"{sw.y6:.2f}",
                f"{sw.y7:.2f}",
                sw.y7_massive,
                f"{sw.share:.3f}",
                *_ma_of(sw, events),
            ]
        )
    return rows


def _edit(ctx: Context, kind: Kind, shape: tuple[int, int]) -> Edit:
    unit, scale = UNITS[kind.unit], float(ctx.cfg.experiment.scale)

    def edit(selection: Selection) -> Any:
        targets = [unit.target(layer, int(k), shape) for (layer, _), idx in selection.items() for k in idx]
        return edit_weights(ctx.lm, targets, kind.mode, scale, field="experiment.ablations")

    return edit


def ablations(
    ctx: Context, chosen: Sequence[SuperWeight], views: dict[int, torch.Tensor], evaluations: Evaluations
) -> dict[tuple[int, str], dict[str, Any]]:
    """(layer, ablation) -> {count, ppl, random}: each ablation of each chosen candidate and its controls."""
    results = {}
    for sw in chosen:
        shape = (int(views[sw.layer].shape[0]), int(views[sw.layer].shape[1]))
        for name in (str(a) for a in ctx.cfg.experiment.ablations):
            kind, unit = KINDS[name], UNITS[KINDS[name].unit]
            key = (sw.layer, "down")
            selection = {key: np.asarray([unit.index(sw, shape)], dtype=np.int64)}
            label = f"superweight {sw.label} {name}"
            sizes = {key: unit.size(shape)}
            results[(sw.layer, name)] = ablate(
                ctx, label, selection, sizes, _edit(ctx, kind, shape), evaluations
            )
    return results


def ablation_rows(
    ctx: Context,
    results: dict[tuple[int, str], dict[str, Any]],
    chosen: Sequence[SuperWeight],
    original: float,
) -> list[list[Any]]:
    scale = float(ctx.cfg.experiment.scale)
    rows = []
    for sw in chosen:
        for name in (str(a) for a in ctx.cfg.experiment.ablations):
            r = results[(sw.layer, name)]  # one weight, row or column each: never an empty selection
            column = KINDS[name].column.replace("scale", f"{scale:g}")
            control = statistics.fmean(r["random"]) / original
            rows.append(
                [
                    sw.label,
                    column,
                    f"{r['ppl']:.3f}",
                    f"{r['ppl'] / original:.3f}",
                    mean_std(r["random"]),
                    f"{control:.3f}",
                ]
            )
    return rows


def write_peak_figure(
    ctx: Context, peaks: Peaks, layers: list[int], candidates: Sequence[SuperWeight]
) -> None:
    y6 = [max((abs(p.value) for p in peaks[(layer, Y6)]), default=float("nan")) for layer in layers]
    y7 = [max((abs(p.value) for p in peaks[(layer, Y7)]), default=float("nan")) for layer in layers]
    marks = {sw.layer: f"W[{sw.row}, {sw.col}]" for sw in candidates}
    title = f"{ctx.cfg.model.name}: largest |a| at the down projection's input (y6) and output (y7)"
    write_figure(
        ctx.figures_dir / "superweight.png", figures.super_weight_figure(layers, y6, y7, marks, title)
    )


def coordinates(candidates: Sequence[SuperWeight]) -> str:
    """The candidates as the value of `intervention.weights`, to test or sweep them one by one."""
    return (
        "[" + ",".join(f"{{layer:{c.layer},matrix:down,row:{c.row},col:{c.col}}}" for c in candidates) + "]"
    )


@experiment(
    "superweight",
    SuperweightOptions,
    paper="",
    description="per layer, the spikes at the down projection's input (y6) and output (y7); the candidate "
    "super weights W[i, j] joining them, their rank in row and column and the MA each makes; perplexity "
    "with each zeroed or scaled and its row i or column j zeroed, vs as many random ones (several seeds)",
    check=lambda options, cfg, arch: check_dense_down(arch, "experiment.name"),
)
def run(ctx: Context) -> dict[str, Any]:
    cfg, lm, th = ctx.cfg, ctx.lm, ctx.threshold
    ma = (float(th.ma_abs), float(th.ma_ratio))
    original = evaluate(ctx, "superweight original")
    evaluations: Evaluations = {"superweight original": (original, None, {})}
    bs, progress = int(cfg.dataset.batch_size), bool(cfg.progress)
    layers = dense_layers(lm.adapter, ctx.layers)
    candidates, peaks = detect_super_weights(lm, ctx.windows.input_ids, layers, th, bs, progress)
    events = ma_events(ctx, ctx.layers)
    views = down_views(lm, layers)
    by_layer = {sw.layer: sw for sw in candidates}

    layer_table = write_table(
        ctx.tables_dir,
        Table.of("superweight_layers", LAYER_HEADER, layer_rows(peaks, layers, by_layer, ma)),
    )
    table = write_table(
        ctx.tables_dir,
        Table.of("superweight", CANDIDATE_HEADER, candidate_rows(ctx, candidates, views, events)),
    )
    limit = cfg.experiment.max_candidates
    chosen = sorted(candidates, key=lambda sw: -abs(sw.y7))[: None if limit is None else int(limit)]
    results = ablations(ctx, chosen, views, evaluations)
    header = ["candidate", "ablation", "ppl", "ppl / original"]
    header += [f"random ({len(seeds(ctx))} seeds) mean ± std", "random / original"]
    ablation = write_table(
        ctx.tables_dir,
        Table.of("superweight_ablation", header, ablation_rows(ctx, results, chosen, original.ppl)),
    )
    write_peak_figure(ctx, peaks, layers, candidates)
    found = [asdict(sw) for sw in candidates]
    write_json(
        ctx.job_dir / "super_weights.json",
        {"candidates": found, "intervention.weights": coordinates(candidates)},
    )
    record_perplexity(ctx, evaluations, seeds=seeds(ctx), scale=float(cfg.experiment.scale), candidates=found)

    skipped = sorted(set(ctx.layers) - set(layers))
    print(f"\nPeaks at y6 (down_proj input) and y7 (its output) per layer, {cfg.model.name} (layers from 0):")
    if skipped:
        print(f"(mixture-of-experts layers {skipped} have no dense down_proj and are left out)")
    print(layer_table)
    print("Candidate super weights W[i, j] of down_proj ((out, in) orientation):")
    print(table if candidates else "  none found\n")
    if chosen:
        print(f"Ablations, token-level perplexity (original {original.ppl:.3f}):")
        print(ablation)
        command = f"experiment=perplexity intervention=weights 'intervention.weights={coordinates(chosen)}'"
        print(f"test them one by one, or on another model: {command}")

    metrics: dict[str, Any] = {"ppl_original": original.ppl, "n_candidates": len(candidates)}
    for sw in candidates:
        prefix, weight = f"layer{sw.layer}", float(views[sw.layer][sw.row, sw.col].detach())
        metrics |= {f"{prefix}.row": sw.row, f"{prefix}.col": sw.col, f"{prefix}.weight": weight}
        metrics |= {f"{prefix}.y6": sw.y6, f"{prefix}.y7": sw.y7, f"{prefix}.windows": len(sw.windows)}
    for (layer, name), r in results.items():
        prefix = f"layer{layer}.{name}"
        metrics[f"{prefix}.ppl"] = r["ppl"]
        metrics[f"{prefix}.random_mean"] = statistics.fmean(r["random"])
        metrics[f"{prefix}.random_std"] = statistics.pstdev(r["random"])
    return metrics
