"""Experiment `profile`: per-layer statistics at every tap, MA summary, Fig. 4/5- and Fig. 6-style plots."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from outlier_study.output import figures as plotting, stat_tables as report
from outlier_study.context import Context
from outlier_study.measure.profiler import Profile, capture_abs_slice, profile_windows
from outlier_study.output.files import markdown_table, write_csv, write_figure, write_npz, write_text


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text with whitespace made visible, for tables and plot labels."""
    return tokenizer.decode([token_id]).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def write_profile_tables(ctx: Context, prof: Profile) -> list[tuple[object, ...]]:
    """layer_stats.csv, topk.csv and channels.npz; returns the top-k rows for the summary."""
    th = ctx.cfg.threshold
    write_csv(ctx.job_dir / "layer_stats.csv", report.LAYER_STATS_HEADER, report.layer_stat_rows(prof.stats))
    rows = report.topk_rows(
        prof.stats,
        ctx.windows.input_ids.numpy(),
        lambda t: token_text(ctx.lm.tokenizer, t),
        th.ma_abs,
        th.ma_ratio,
    )
    write_csv(ctx.job_dir / "topk.csv", report.TOPK_HEADER, rows)
    write_npz(ctx.job_dir / "channels.npz", report.channel_arrays(prof.stats))
    return rows


def write_layer_figure(ctx: Context, prof: Profile) -> None:
    """Fig. 4/5-style per-layer top-k |a| for every profiled tap, one panel each."""
    k = ctx.cfg.threshold.top_k
    panels = {}
    for tap in prof.taps:
        tops = np.full((len(prof.layers), k), np.nan)
        for i, layer in enumerate(prof.layers):
            tops[i, : len(prof.stats[(layer, tap)].top)] = [e.abs for e in prof.stats[(layer, tap)].top]
        panels[tap] = (tops, [prof.stats[(layer, tap)].median_abs for layer in prof.layers])
    title = f"{ctx.cfg.model.name}: top-{k} |a| and median per layer"
    write_figure(ctx.figures_dir / "layer_tops.png", plotting.layer_tops_figure(prof.layers, panels, title))


def write_surface_figure(ctx: Context, prof: Profile) -> None:
    """Fig. 6-style 3-D |a| at the configured (or strongest) layer of the configured tap."""
    p3 = ctx.cfg.experiment.plot3d
    tap = ctx.lm.adapter.canonical(p3.tap)
    if tap not in prof.taps:
        return
    layer = p3.layer
    if layer is None:
        layer = max(prof.layers, key=lambda lay: np.nan_to_num(prof.stats[(lay, tap)].max_abs, nan=-1.0))
    window = ctx.windows.input_ids[min(p3.window, ctx.windows.input_ids.shape[0] - 1)]
    values = capture_abs_slice(ctx.lm, window, int(layer), tap, p3.max_tokens)
    labels = [token_text(ctx.lm.tokenizer, int(t)) for t in window[: values.shape[0]]]
    title = f"{ctx.cfg.model.name}: |{tap}| at layer {layer}"
    write_figure(
        ctx.figures_dir / f"surface_{tap}_layer{layer}.png",
        plotting.abs_surface_figure(values, labels, title),
    )


def ma_summary(rows: list[tuple[object, ...]], limit: int) -> tuple[list[str], list[list[object]]]:
    """Strongest MAs, one per (layer, tap): the top-1 entries that meet the MA rule."""
    header = ["layer", "tap", "value", "window", "token", "token_text", "channel"]
    named = [dict(zip(report.TOPK_HEADER, r, strict=True)) for r in rows]
    tops = sorted((r for r in named if r["rank"] == 1 and r["is_ma"]), key=lambda r: -float(r["abs"]))
    return header, [
        [r[h] if h != "value" else f"{float(r['value']):.2f}" for h in header] for r in tops[:limit]
    ]


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    th = cfg.threshold
    t0 = time.perf_counter()
    prof = profile_windows(
        ctx.lm,
        ctx.windows.input_ids,
        ctx.taps,
        ctx.layers,
        top_k=th.top_k,
        ma_abs=th.ma_abs,
        ma_ratio=th.ma_ratio,
        batch_size=cfg.dataset.batch_size,
        progress=cfg.progress,
    )
    seconds = time.perf_counter() - t0
    rows = write_profile_tables(ctx, prof)
    write_layer_figure(ctx, prof)
    write_surface_figure(ctx, prof)
    header, summary = ma_summary(rows, cfg.experiment.summary_top)
    write_text(ctx.tables_dir / "massive_activations.md", markdown_table(header, summary))
    write_csv(ctx.tables_dir / "massive_activations.csv", header, summary)

    print(
        f"\nStrongest massive activations (|a| > {th.ma_abs:g} and ≥ {th.ma_ratio:g}× median; layers from 0):"
    )
    print(markdown_table(header, summary) if summary else "  none found\n")
    overflow = report.nonfinite_summary(prof.stats)
    if overflow:
        print("WARNING: " + overflow)
    stats = prof.stats.values()
    finite_max = [s.max_abs for s in stats if np.isfinite(s.max_abs)]
    return {
        "profile_seconds": seconds,
        "tokens": prof.tokens,
        "tokens_per_second": prof.tokens / seconds if seconds > 0 else float("nan"),
        "ma_count_total": int(sum(s.ma_count for s in prof.stats.values())),
        "max_abs": max(finite_max) if finite_max else float("nan"),
        "nan_count_total": int(sum(s.nan_count for s in prof.stats.values())),
        "inf_count_total": int(sum(s.inf_count for s in prof.stats.values())),
        "n_taps": len(prof.taps),
        "n_layers": len(prof.layers),
    }
