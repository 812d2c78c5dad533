"""Experiments `fig4` (Fig. 4/5) and `fig6` (Fig. 6): the residual stream with and without carried MAs."""

from __future__ import annotations

from typing import Any

import numpy as np

from outlier_study.output import figures as plotting
from outlier_study.context import Context
from outlier_study.experiments.profile import token_text
from outlier_study.interventions.residual import remove_residual_mas
from outlier_study.measure.profiler import Profile, capture_abs_slice, profile_windows
from outlier_study.output.files import write_figure, write_table

CONDITIONS = ("original", "residual MAs removed")


def _inputs_profile(ctx: Context) -> Profile:
    th = ctx.cfg.threshold
    return profile_windows(
        ctx.lm,
        ctx.windows.input_ids,
        ["resid.pre"],
        ctx.layers,
        top_k=th.top_k,
        ma_abs=th.ma_abs,
        ma_ratio=th.ma_ratio,
        batch_size=ctx.cfg.dataset.batch_size,
        progress=ctx.cfg.progress,
    )


def _residual_removed(ctx: Context) -> Any:
    th = ctx.cfg.threshold
    return remove_residual_mas(ctx.lm, list(range(ctx.lm.n_layers)), "zero", th.ma_abs, th.ma_ratio)


def run_fig4(ctx: Context) -> dict[str, Any]:
    """Per-layer top-k |a| of the layer inputs, original (left) and with residual MAs removed (right)."""
    original = _inputs_profile(ctx)
    with _residual_removed(ctx):
        removed = _inputs_profile(ctx)
    k = ctx.cfg.threshold.top_k
    panels, rows = {}, []
    for condition, prof in zip(CONDITIONS, (original, removed), strict=True):
        tops = np.full((len(prof.layers), k), np.nan)
        for i, layer in enumerate(prof.layers):
            top = prof.stats[(layer, "resid.pre")].top
            tops[i, : len(top)] = [e.abs for e in top]
            rows += [
                [condition, layer, r + 1, f"{e.value:.2f}", e.window, e.token, e.channel]
                for r, e in enumerate(top)
            ]
        medians = [prof.stats[(layer, "resid.pre")].median_abs for layer in prof.layers]
        panels[condition] = (tops, medians)
    title = f"{ctx.cfg.model.name}: top-{k} |a| of layer inputs"
    write_figure(
        ctx.figures_dir / "fig4_layer_inputs.png", plotting.layer_tops_figure(original.layers, panels, title)
    )
    header = ["condition", "layer", "rank", "value", "window", "token", "channel"]
    write_table(ctx.tables_dir, "fig4_tops", header, rows)
    peak = {c: float(np.nanmax(p[0][:, 0])) for c, p in panels.items()}
    print(
        f"\nFig. 4 — largest |a| at any layer input: original {peak[CONDITIONS[0]]:.2f}, "
        f"residual MAs removed {peak[CONDITIONS[1]]:.2f} (figure: figures/fig4_layer_inputs.png)"
    )
    return {"max_abs_original": peak[CONDITIONS[0]], "max_abs_residual_removed": peak[CONDITIONS[1]]}


def run_fig6(ctx: Context) -> dict[str, Any]:
    """3-D |a| over (token, channel) at chosen layers, original and with residual MAs removed."""
    p3 = ctx.cfg.experiment.plot3d
    tap = ctx.lm.adapter.canonical(p3.tap)
    layers = ctx.cfg.experiment.plot_layers
    if layers is None:
        prof = profile_windows(ctx.lm, ctx.windows.input_ids[:1], [tap], ctx.layers, progress=False)
        layers = sorted(
            sorted(ctx.layers, key=lambda lay: -np.nan_to_num(prof.stats[(lay, tap)].max_abs))[:2]
        )
    from outlier_study.adapters import resolve_layers

    layers = resolve_layers(ctx.lm.n_layers, list(layers), "experiment.plot_layers")
    window = ctx.windows.input_ids[min(p3.window, ctx.windows.input_ids.shape[0] - 1)]
    labels = [token_text(ctx.lm.tokenizer, int(t)) for t in window[: p3.max_tokens]]
    peaks: dict[str, float] = {}
    for condition in CONDITIONS:
        for layer in layers:
            if condition == CONDITIONS[0]:
                values = capture_abs_slice(ctx.lm, window, layer, tap, p3.max_tokens)
            else:
                with _residual_removed(ctx):
                    values = capture_abs_slice(ctx.lm, window, layer, tap, p3.max_tokens)
            slug = "original" if condition == CONDITIONS[0] else "residual_removed"
            title = f"{ctx.cfg.model.name}: |{tap}| at layer {layer}, {condition}"
            fig = plotting.abs_surface_figure(values, labels, title)
            write_figure(ctx.figures_dir / f"fig6_{tap}_layer{layer}_{slug}.png", fig)
            peaks[f"max_abs_layer{layer}_{slug}"] = float(values.max())
    print(f"\nFig. 6 — {tap} at layers {layers}: " + ", ".join(f"{k}={v:.2f}" for k, v in peaks.items()))
    return peaks
