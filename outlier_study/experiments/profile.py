"""Experiment `profile`: per-layer statistics at every tap, MA summary, Fig. 4/5- and Fig. 6-style plots."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from outlier_study.config.options import opt
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import Plot3DOptions, check_plot3d, profile, token_text
from outlier_study.measure.profiler import Profile, capture_abs_slice
from outlier_study.output import expert_tables as moe_report
from outlier_study.output import figures
from outlier_study.output import stat_tables as report
from outlier_study.output.files import write_csv, write_figure, write_npz
from outlier_study.output.summary import NONFINITE_HEADER, TRACK_HEADER, ma_tracks, nonfinite_rows
from outlier_study.output.tables import Table, to_markdown, write_table
from outlier_study.stats.tapstats import StatsByTap


@dataclass
class ProfileOptions:
    name: str = opt("profile", "per-layer statistics at every tap")
    summary_top: int = opt(10, "strongest MAs printed at the end", ge=1)
    figures: bool = opt(True, "draw the per-layer and 3-D plots (false: tables only, e.g. in a wide sweep)")
    plot3d: Plot3DOptions = opt(Plot3DOptions(), "the Fig. 6-style 3-D plot")


def write_profile_tables(ctx: Context, prof: Profile) -> list[tuple[object, ...]]:
    """layer_stats.csv, topk.csv and channels.npz of the layer-level keys; returns the top-k rows for the
    summary. MoE models add expert_stats.csv and the expert-MA and router-load tables."""
    th = ctx.threshold
    stats, per_expert, routing = moe_report.split_stats(prof.stats)
    write_csv(
        ctx.job_dir / "layer_stats.csv",
        report.LAYER_STATS_HEADER,
        report.layer_stat_rows(stats, ctx.lm.arch.layer_type),
    )
    rows = report.topk_rows(
        stats,
        ctx.windows.input_ids.numpy(),
        lambda t: token_text(ctx.lm.tokenizer, t),
        th.ma_abs,
        th.ma_ratio,
    )
    write_csv(ctx.job_dir / "topk.csv", report.TOPK_HEADER, rows)
    write_npz(ctx.job_dir / "channels.npz", report.channel_arrays(stats))
    if per_expert or routing:
        write_expert_tables(ctx, prof, per_expert, routing)
    return rows


def write_expert_tables(ctx: Context, prof: Profile, per_expert: StatsByTap, routing: StatsByTap) -> None:
    """expert_stats.csv (layer_stats.csv with an expert column), tables/moe_expert_mas and
    tables/moe_router_load; prints which experts create MAs."""
    th = ctx.threshold
    rows = moe_report.expert_stat_rows(per_expert)
    write_csv(ctx.job_dir / "expert_stats.csv", moe_report.EXPERT_STATS_HEADER, rows)
    mas = moe_report.expert_ma_table(
        per_expert,
        ctx.windows.input_ids.numpy(),
        lambda t: token_text(ctx.lm.tokenizer, t),
        th.ma_abs,
        th.ma_ratio,
    )
    write_table(ctx.tables_dir, mas)
    write_table(ctx.tables_dir, moe_report.router_load_table(routing, prof.tokens))
    print("\nExperts that create massive activations (on the tokens routed to each; layers from 0):")
    if mas.rows:
        limit = ctx.cfg.experiment.summary_top
        print(to_markdown(Table(mas.name, mas.header, mas.rows[:limit])))
    else:
        print("  none found\n")


def write_layer_figure(ctx: Context, prof: Profile) -> None:
    """Fig. 4/5-style per-layer top-k |a| for every profiled tap, one panel each."""
    k = ctx.threshold.top_k
    panels = {}
    for tap in prof.taps:
        tops = np.full((len(prof.layers), k), np.nan)
        for i, layer in enumerate(prof.layers):
            tops[i, : len(prof.stats[(layer, tap)].top)] = [e.abs for e in prof.stats[(layer, tap)].top]
        panels[tap] = (tops, [prof.stats[(layer, tap)].median_abs for layer in prof.layers])
    title = f"{ctx.cfg.model.name}: top-{k} |a| and median per layer"
    write_figure(ctx.figures_dir / "layer_tops.png", figures.layer_tops_figure(prof.layers, panels, title))


def write_surface_figure(ctx: Context, prof: Profile) -> None:
    """Fig. 6-style 3-D |a| at the configured (or strongest) layer of the configured tap."""
    p3 = ctx.cfg.experiment.plot3d
    tap = ctx.lm.adapter.canonical(p3.tap, "experiment.plot3d.tap")
    if tap not in prof.taps:
        return
    layer = ctx.lm.arch.layer(p3.layer, "experiment.plot3d.layer") if p3.layer is not None else None
    if layer is None:
        layer = max(prof.layers, key=lambda lay: np.nan_to_num(prof.stats[(lay, tap)].max_abs, nan=-1.0))
    window = ctx.windows.input_ids[int(p3.window)]
    values = capture_abs_slice(ctx.lm, window, int(layer), tap, p3.max_tokens)
    labels = [token_text(ctx.lm.tokenizer, int(t)) for t in window[: values.shape[0]]]
    title = f"{ctx.cfg.model.name}: |{tap}| at layer {layer}"
    write_figure(
        ctx.figures_dir / f"surface_{tap}_layer{layer}.png", figures.abs_surface_figure(values, labels, title)
    )


def ma_summary(rows: list[tuple[object, ...]], limit: int) -> tuple[list[str], list[list[object]]]:
    """Strongest MAs, one per (layer, tap): the top-1 entries that meet the MA rule."""
    header = ["layer", "tap", "value", "window", "token", "token_text", "channel"]
    named = [dict(zip(report.TOPK_HEADER, r, strict=True)) for r in rows]
    tops = sorted((r for r in named if r["rank"] == 1 and r["is_ma"]), key=lambda r: -float(r["abs"]))
    return header, [
        [r[h] if h != "value" else f"{float(r['value']):.2f}" for h in header] for r in tops[:limit]
    ]


@experiment(
    "profile",
    ProfileOptions,
    paper="",
    description="per-layer statistics at every tap: top-k |a| with positions, medians, MA counts, "
    "per-channel moments, kurtosis, inf/nan counts; Fig. 4/5- and Fig. 6-style plots",
    check=lambda o, cfg, arch: check_plot3d(o.plot3d, cfg, arch),
    layerwise=True,
)
def run(ctx: Context) -> dict[str, Any]:
    th = ctx.threshold
    t0 = time.perf_counter()
    prof = profile(ctx, ctx.taps)
    seconds = time.perf_counter() - t0
    rows = write_profile_tables(ctx, prof)
    if ctx.cfg.experiment.figures:
        write_layer_figure(ctx, prof)
        write_surface_figure(ctx, prof)
    header, summary = ma_summary(rows, ctx.cfg.experiment.summary_top)
    write_table(ctx.tables_dir, Table.of("massive_activations", header, summary))
    tracks = ma_tracks([dict(zip(report.TOPK_HEADER, r, strict=True)) for r in rows])
    track_rows = [t.row() for t in tracks]
    write_table(ctx.tables_dir, Table.of("ma_tracks", TRACK_HEADER, track_rows))
    print(
        f"\nMassive activations (|a| > {th.ma_abs:g} and ≥ {th.ma_ratio:g}× median; layers from 0), "
        "each followed through the layers that carry it:"
    )
    if tracks:
        print(to_markdown(Table.of("ma_tracks", TRACK_HEADER, track_rows[: ctx.cfg.experiment.summary_top])))
    else:
        print("  none found\n")
    layer_level, per_expert, _ = moe_report.split_stats(prof.stats)
    nonfinite = nonfinite_rows(layer_level)
    if nonfinite:  # written only when there is something to say, like the warning
        table = write_table(ctx.tables_dir, Table.of("nonfinite", NONFINITE_HEADER, nonfinite))
        inf, nan = sum(r[3] for r in nonfinite), sum(r[4] for r in nonfinite)
        print(
            f"warning: {inf} inf and {nan} nan activations at {len(nonfinite)} tap(s) (overflow of "
            f"{ctx.cfg.dtype}); the statistics leave them out: tables/nonfinite.md",
            file=sys.stderr,
        )
        print("Non-finite activations per tap (layers from 0):")
        print(table)
    stats = layer_level.values()
    finite_max = [s.max_abs for s in stats if np.isfinite(s.max_abs)]
    moe = {"expert_ma_count_total": int(sum(s.ma_count for s in per_expert.values()))} if per_expert else {}
    return {
        "profile_seconds": seconds,
        "tokens": prof.tokens,
        "tokens_per_second": prof.tokens / seconds if seconds > 0 else float("nan"),
        "ma_count_total": int(sum(s.ma_count for s in stats)),
        "max_abs": max(finite_max) if finite_max else float("nan"),
        "nan_count_total": int(sum(s.nan_count for s in stats)),
        "inf_count_total": int(sum(s.inf_count for s in stats)),
        "n_taps": len(prof.taps),
        "n_layers": len(prof.layers),
        **{f"nonfinite.{r[0]}.{kind}": r[i] for r in nonfinite for i, kind in ((3, "inf"), (4, "nan"))},
        **moe,
    }
