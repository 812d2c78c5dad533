"""Channel-wise outlier experiments that measure activations: `co` (COs at any tap), `fig7` (norm input vs
output at layer 0 for several m), `fig8` (the four stages of one norm) and `fig9` (CO counts per layer with
the norms' γ at the COs set to the mean or zero)."""

from __future__ import annotations

from typing import Any

import numpy as np

from outlier_study.detect.rules import Selection, check_co_threshold, cos_by_key
from outlier_study.context import Context
from outlier_study.experiments.perplexity_tables import evaluate
from outlier_study.interventions.channel_edits import NORM_OUTPUT_TAP, norm_output_cos
from outlier_study.interventions.parameters import edit_gamma
from outlier_study.output.figures import channel_means_figure, co_counts_figure
from outlier_study.measure.profiler import NO_MA, ChannelsByTap, profile_channels
from outlier_study.output.files import write_figure, write_json, write_table

# Input and output of each pre-norm, in forward order: x1 -> x2 and y1 -> y2 in the paper.
NORM_TAPS: dict[str, tuple[str, str, str]] = {
    "attn": ("resid.pre", "attn.norm_std", "attn.norm"),
    "mlp": ("resid.mid", "mlp.norm_std", "mlp.norm"),
}


def _profile(
    ctx: Context, taps: list[str], layers: list[int], without_ma: tuple[str, ...] = ()
) -> ChannelsByTap:
    cfg = ctx.cfg
    return profile_channels(
        ctx.lm,
        ctx.windows.input_ids,
        taps,
        layers,
        absolute=bool(cfg.threshold.abs_mean),
        without_ma=without_ma,
        ma_rule=(float(cfg.threshold.ma_abs), float(cfg.threshold.ma_ratio)),
        batch_size=int(cfg.dataset.batch_size),
        progress=bool(cfg.progress),
        desc=f"{cfg.experiment.name} channels",
    )


def _threshold(ctx: Context) -> tuple[float, float]:
    m, beta = float(ctx.cfg.threshold.m), float(ctx.cfg.threshold.beta)
    check_co_threshold(m, beta)
    return m, beta


def _rule(ctx: Context) -> dict[str, Any]:
    th = ctx.cfg.threshold
    return {"co.m": float(th.m), "co.beta": float(th.beta), "co.abs_mean": bool(th.abs_mean)}


def _channel_list(idx: np.ndarray, limit: int | None = None) -> str:
    shown = " ".join(str(i) for i in idx[:limit].tolist())
    return shown + (" …" if limit is not None and len(idx) > limit else "")


def _write_co_tables(ctx: Context, name: str, cos: Selection, layers: list[int], taps: list[str]) -> None:
    """Counts per layer × tap in the paper's layout, and the channel indices (all in CSV, 12 in Markdown)."""
    write_table(
        ctx.tables_dir,
        f"{name}_counts",
        ["layer", *taps],
        [[layer, *(len(cos[(layer, t)]) for t in taps)] for layer in layers],
    )
    rows = [(layer, t, len(cos[(layer, t)])) for layer in layers for t in taps]
    write_table(
        ctx.tables_dir,
        f"{name}_channels",
        ["layer", "tap", "count", "channels"],
        [[layer, t, n, _channel_list(cos[(layer, t)])] for layer, t, n in rows],
    )


def run_co(ctx: Context) -> dict[str, Any]:
    """COs (DESIGN §3) of every configured tap and layer, from streamed per-channel moments."""
    m, beta = _threshold(ctx)
    summaries = _profile(ctx, ctx.taps, ctx.layers)
    cos = cos_by_key(summaries, m, beta)
    _write_co_tables(ctx, "channel_outliers", cos, ctx.layers, ctx.taps)
    counts = {tap: [len(cos[(layer, tap)]) for layer in ctx.layers] for tap in ctx.taps}
    fig = co_counts_figure(
        ctx.layers, {"COs": counts}, f"{ctx.cfg.model.name}: CO count per layer (m={m:g}, β={beta:.3g})"
    )
    write_figure(ctx.figures_dir / "co_counts.png", fig)
    print(f"\nCO count per tap (summed over layers), m={m:g}, β={beta:.3g}:")
    for tap, c in counts.items():
        print(f"  {tap:14s} {sum(c)}")
    return {**_rule(ctx), **{f"co_total.{tap}": sum(c) for tap, c in counts.items()}}


def run_fig7(ctx: Context) -> dict[str, Any]:
    """Channel means of each norm's input and output at one layer (default 0), COs marked for each m."""
    _, beta = _threshold(ctx)
    layer = ctx.experiment_layer()
    m_values = [float(v) for v in ctx.cfg.experiment.m_values]
    for v in m_values:
        check_co_threshold(v, beta)
    pairs = {norm: (taps[0], taps[2]) for norm, taps in NORM_TAPS.items()}
    summaries = _profile(ctx, [t for pair in pairs.values() for t in pair], [layer])
    metrics: dict[str, Any] = {**_rule(ctx), "layer": layer}
    rows = []
    for norm, pair in pairs.items():
        panels = []
        for tap in pair:
            s = summaries[(layer, tap)]
            for m in m_values:
                cos = cos_by_key({(layer, tap): s}, m, beta)[(layer, tap)]
                panels.append((f"{tap} (layer {layer}), m={m:g}", s.mean, cos))
                rows.append([tap, f"{m:g}", len(cos), _channel_list(cos, 12)])
                metrics[f"co.{tap}.m{m:g}"] = len(cos)
        title = f"{ctx.cfg.model.name}: {norm} norm input vs output channel means"
        write_figure(ctx.figures_dir / f"fig7_{norm}.png", channel_means_figure(panels, len(m_values), title))
    text = write_table(ctx.tables_dir, "fig7", ["tap", "m", "COs", "channels"], rows)
    print(f"\nFig. 7 — channel-wise outliers at layer {layer} (β={beta:.3g}):\n{text}")
    return metrics


def run_fig8(ctx: Context) -> dict[str, Any]:
    """One layer's norm in four panels: input, input without MAs, standardized (no γ), output (after γ)."""
    m, beta = _threshold(ctx)
    layer = ctx.experiment_layer()
    taps = [t for triple in NORM_TAPS.values() for t in triple]
    inputs = tuple(triple[0] for triple in NORM_TAPS.values())
    summaries = _profile(ctx, taps, [layer], without_ma=inputs)
    cos = cos_by_key(summaries, m, beta)
    panels, rows, counts = [], [], {}
    for src, std, out in NORM_TAPS.values():
        for key, label in (
            (src, src),
            (src + NO_MA, f"{src} without MAs"),
            (std, f"{std} (no γ)"),
            (out, out),
        ):
            idx = cos[(layer, key)]
            panels.append((f"{label} (layer {layer})", summaries[(layer, key)].mean, idx))
            rows.append([label, len(idx), _channel_list(idx, 12)])
            counts[f"co.{key}"] = len(idx)
    title = f"{ctx.cfg.model.name}: inside the norms, m={m:g}, β={beta:.3g}"
    write_figure(ctx.figures_dir / "fig8.png", channel_means_figure(panels, 4, title))
    text = write_table(ctx.tables_dir, "fig8", ["stage", "COs", "channels"], rows)
    print(f"\nFig. 8 — channel-wise outliers through the norms of layer {layer}:\n{text}")
    return {**_rule(ctx), "layer": layer, **counts}


def run_fig9(ctx: Context) -> dict[str, Any]:
    """CO counts per layer at the norm inputs/outputs, original vs γ at the output COs → mean / zero.

    The γ entries are those at the COs of each norm's output in the original model (detected once), so the
    three curves compare one model under three edits; perplexity shows what each edit costs."""
    m, beta = _threshold(ctx)
    cfg = ctx.cfg
    norms = ctx.lm.adapter.norm_names(str(cfg.experiment.norm), "experiment.norm")
    taps = [t for n in norms for t in (NORM_TAPS[n][0], NORM_OUTPUT_TAP[n])]
    values = [str(v) for v in cfg.experiment.gamma_values]
    layers = ctx.layers
    selection = norm_output_cos(
        ctx.lm, ctx.windows.input_ids, norms, layers, cfg.threshold, bool(cfg.progress)
    )
    series: dict[str, dict[str, list[int]]] = {}
    ppl: dict[str, float] = {}
    settings: list[tuple[str, str | None]] = [("original", None), *((f"γ → {v}", v) for v in values)]
    for label, value in settings:
        if value is None:
            summaries, ppl[label] = _profile(ctx, taps, layers), evaluate(ctx, label).ppl
        else:
            with edit_gamma(ctx.lm, selection, value):
                summaries, ppl[label] = _profile(ctx, taps, layers), evaluate(ctx, label).ppl
        cos = cos_by_key(summaries, m, beta)
        series[label] = {tap: [len(cos[(layer, tap)]) for layer in layers] for tap in taps}
    title = f"{cfg.model.name}: CO count per layer, γ at the norm-output COs edited (m={m:g}, β={beta:.3g})"
    write_figure(ctx.figures_dir / "fig9.png", co_counts_figure(layers, series, title))
    header = ["layer", *(f"{tap} {label}" for tap in taps for label in series)]
    rows = [
        [layer, *(series[label][tap][i] for tap in taps for label in series)]
        for i, layer in enumerate(layers)
    ]
    write_table(ctx.tables_dir, "fig9_counts", header, rows)
    edited = sum(len(v) for v in selection.values())
    summary_rows = [
        [label, *(sum(series[label][tap]) for tap in taps), f"{ppl[label]:.3f}"] for label in series
    ]
    text = write_table(ctx.tables_dir, "fig9", ["setting", *(f"COs {t}" for t in taps), "ppl"], summary_rows)
    write_json(
        ctx.job_dir / "gamma_channels.json",
        {f"{layer}.{n}": v.tolist() for (layer, n), v in selection.items()},
    )
    print(f"\nFig. 9 — CO count summed over layers ({edited} γ entries edited):\n{text}")
    metrics: dict[str, Any] = {**_rule(ctx), "gamma_entries_edited": edited}
    for label in series:
        slug = label.replace("γ → ", "gamma_")
        metrics[f"ppl.{slug}"] = ppl[label]
        metrics.update({f"co_total.{slug}.{tap}": sum(series[label][tap]) for tap in taps})
    return metrics
