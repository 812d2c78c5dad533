"""Experiments `fig4` (Fig. 4, and Fig. 5 for GPT-2) and `fig6` (Fig. 6): the residual stream with and
without the massive activations it carries (only the TMAs each layer generates left)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from outlier_study.adapters.base import Arch
from outlier_study.config.options import name_only, opt
from outlier_study.context import Context
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import Plot3DOptions, check_plot3d, profile, token_text
from outlier_study.interventions.residual import remove_residual_mas
from outlier_study.measure.profiler import Profile, capture_abs_slice
from outlier_study.output import figures
from outlier_study.output.files import write_figure
from outlier_study.output.tables import Table, write_table

CONDITIONS = ("original", "residual MAs removed")


@dataclass
class Fig6Options:
    name: str = opt("fig6", "3-D |a| over (token, channel), original vs residual MAs removed")
    plot_layers: list[int] | None = opt(
        None, "layers (from 0); null: the two with the largest |a| at plot3d.tap", min_items=1
    )
    plot3d: Plot3DOptions = opt(Plot3DOptions(tap="resid.pre"), "tap, window and tokens of the plots")


def _inputs_profile(ctx: Context) -> Profile:
    return profile(ctx, ["resid.pre"], moments=False)


def _residual_removed(ctx: Context) -> Any:
    th = ctx.threshold
    return remove_residual_mas(ctx.lm, None, "zero", float(th.ma_abs), float(th.ma_ratio))


def run_fig4(ctx: Context) -> dict[str, Any]:
    """Per-layer top-k |a| of the layer inputs, original (left) and with residual MAs removed (right)."""
    original = _inputs_profile(ctx)
    with _residual_removed(ctx):
        removed = _inputs_profile(ctx)
    k = ctx.threshold.top_k
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
        ctx.figures_dir / "fig4_layer_inputs.png", figures.layer_tops_figure(original.layers, panels, title)
    )
    header = ["condition", "layer", "rank", "value", "window", "token", "channel"]
    write_table(ctx.tables_dir, Table.of("fig4_tops", header, rows))
    peak = {c: float(np.nanmax(p[0][:, 0])) for c, p in panels.items()}
    print(
        f"\nFig. 4 — largest |a| at any layer input: original {peak[CONDITIONS[0]]:.2f}, "
        f"residual MAs removed {peak[CONDITIONS[1]]:.2f} (figure: figures/fig4_layer_inputs.png)"
    )
    return {"max_abs_original": peak[CONDITIONS[0]], "max_abs_residual_removed": peak[CONDITIONS[1]]}


# Fig. 5 is Fig. 4 for GPT-2; its own name keeps its results apart.
for _name, _item, _what in (
    ("fig4", "Fig. 4", "per-layer top-3 |a| of the layer inputs, original vs residual MAs removed"),
    ("fig5", "Fig. 5", "Fig. 4 for a GPT-2-family model (gpt2-xl from the hub)"),
):
    experiment(_name, name_only(_name, _what), _item, _what, layerwise=True)(run_fig4)


def _check_fig6(options: Any, cfg: Any, arch: Arch) -> None:
    check_plot3d(options.plot3d, cfg, arch)
    arch.layers(options.plot_layers, "experiment.plot_layers")


@experiment(
    "fig6",
    Fig6Options,
    paper="Fig. 6",
    description="3-D |a| over (token, channel) at chosen layers, original and with residual MAs removed",
    check=_check_fig6,
    layerwise=True,
)
def run_fig6(ctx: Context) -> dict[str, Any]:
    """3-D |a| over (token, channel) at chosen layers, original and with residual MAs removed."""
    p3 = ctx.cfg.experiment.plot3d
    tap = ctx.lm.adapter.canonical(p3.tap, "experiment.plot3d.tap")
    layers = ctx.cfg.experiment.plot_layers
    if layers is None:
        prof = profile(ctx, [tap], ids=ctx.windows.input_ids[:1], progress=False, moments=False)
        layers = sorted(
            sorted(ctx.layers, key=lambda lay: -np.nan_to_num(prof.stats[(lay, tap)].max_abs))[:2]
        )
    layers = ctx.lm.arch.layers(list(layers), "experiment.plot_layers")
    window = ctx.windows.input_ids[int(p3.window)]
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
            fig = figures.abs_surface_figure(values, labels, title)
            write_figure(ctx.figures_dir / f"fig6_{tap}_layer{layer}_{slug}.png", fig)
            peaks[f"max_abs_layer{layer}_{slug}"] = float(values.max())
    print(f"\nFig. 6 — {tap} at layers {layers}: " + ", ".join(f"{k}={v:.2f}" for k, v in peaks.items()))
    return peaks
