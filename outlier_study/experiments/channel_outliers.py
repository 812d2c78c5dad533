"""Channel-wise outlier experiments that measure activations: `co` (COs at any tap), `fig7` (norm input vs
output at one layer for several m) and `fig8` (the four stages of one norm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from outlier_study.adapters.base import Arch
from outlier_study.config.options import name_only, opt
from outlier_study.context import Context
from outlier_study.detect.rules import Selection, cos_by_key
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import channel_profile, check_experiment_layer, co_rule
from outlier_study.measure.profiler import NO_MA
from outlier_study.output.figures import channel_means_figure, co_counts_figure
from outlier_study.output.files import write_figure
from outlier_study.output.tables import Table, write_table


def _check_norm_layer(options: Any, cfg: Any, arch: Arch) -> None:
    """The layer exists and the family has a norm before attention or the MLP (the figures show them)."""
    check_experiment_layer(options, cfg, arch)
    arch.adapter.norm_names("both", "experiment.name")


def channel_list(idx: np.ndarray, limit: int | None = None) -> str:
    shown = " ".join(str(i) for i in idx[:limit].tolist())
    return shown + (" …" if limit is not None and len(idx) > limit else "")


def write_co_tables(ctx: Context, name: str, cos: Selection, layers: list[int], taps: list[str]) -> None:
    """Counts per layer × tap in the paper's layout, and the channel indices (all of them)."""
    counts = [[layer, *(len(cos[(layer, t)]) for t in taps)] for layer in layers]
    write_table(ctx.tables_dir, Table.of(f"{name}_counts", ["layer", *taps], counts))
    rows = [[layer, t, len(cos[(layer, t)]), channel_list(cos[(layer, t)])] for layer in layers for t in taps]
    write_table(ctx.tables_dir, Table.of(f"{name}_channels", ["layer", "tap", "count", "channels"], rows))


@experiment(
    "co",
    name_only("co", "channel-wise outliers at every configured tap and layer"),
    paper="",
    description="channel-wise outliers at every configured tap and layer, from streamed per-channel moments: "
    "counts and channel indices per layer, a count-per-layer plot",
    layerwise=True,
)
def run_co(ctx: Context) -> dict[str, Any]:
    th = ctx.threshold
    m, beta = float(th.m), float(th.beta)
    cos = cos_by_key(channel_profile(ctx, ctx.taps, ctx.layers), m, beta)
    write_co_tables(ctx, "channel_outliers", cos, ctx.layers, ctx.taps)
    counts = {tap: [len(cos[(layer, tap)]) for layer in ctx.layers] for tap in ctx.taps}
    fig = co_counts_figure(
        ctx.layers, {"COs": counts}, f"{ctx.cfg.model.name}: CO count per layer (m={m:g}, β={beta:.3g})"
    )
    write_figure(ctx.figures_dir / "co_counts.png", fig)
    print(f"\nCO count per tap (summed over layers), m={m:g}, β={beta:.3g}:")
    for tap, c in counts.items():
        print(f"  {tap:14s} {sum(c)}")
    return {**co_rule(ctx), **{f"co_total.{tap}": sum(c) for tap, c in counts.items()}}


@dataclass
class Fig7Options:
    name: str = opt("fig7", "norm input vs output channel means at one layer, COs for each m")
    layer: int = opt(0, "layer (from 0, negative from the end): the paper uses the first one")
    m_values: list[float] = opt(
        [6.0, 4.0, 2.0], "CO thresholds m drawn (β = threshold.beta)", min_items=1, items_gt=0
    )


@experiment(
    "fig7",
    Fig7Options,
    paper="Fig. 7",
    description="channel means of each norm's input and output (x1 vs x2, y1 vs y2) at one layer, with the "
    "channel-wise outliers in red for every m in m_values",
    check=_check_norm_layer,
    layerwise=True,
)
def run_fig7(ctx: Context) -> dict[str, Any]:
    beta = float(ctx.threshold.beta)
    layer = ctx.experiment_layer()
    m_values = [float(v) for v in ctx.cfg.experiment.m_values]
    pairs = {norm: (taps[0], taps[2]) for norm, taps in ctx.lm.adapter.norm_taps().items()}
    summaries = channel_profile(ctx, [t for pair in pairs.values() for t in pair], [layer])
    metrics: dict[str, Any] = {**co_rule(ctx), "layer": layer}
    rows = []
    for norm, pair in pairs.items():
        panels = []
        for tap in pair:
            s = summaries[(layer, tap)]
            for m in m_values:
                cos = cos_by_key({(layer, tap): s}, m, beta)[(layer, tap)]
                panels.append((f"{tap} (layer {layer}), m={m:g}", s.mean, cos))
                rows.append([tap, f"{m:g}", len(cos), channel_list(cos, 12)])
                metrics[f"co.{tap}.m{m:g}"] = len(cos)
        title = f"{ctx.cfg.model.name}: {norm} norm input vs output channel means"
        write_figure(ctx.figures_dir / f"fig7_{norm}.png", channel_means_figure(panels, len(m_values), title))
    text = write_table(ctx.tables_dir, Table.of("fig7", ["tap", "m", "COs", "channels"], rows))
    print(f"\nFig. 7 — channel-wise outliers at layer {layer} (β={beta:.3g}):\n{text}")
    return metrics


@dataclass
class Fig8Options:
    name: str = opt("fig8", "one layer's norms in four stages")
    layer: int = opt(1, "layer (from 0, negative from the end)")


@experiment(
    "fig8",
    Fig8Options,
    paper="Fig. 8",
    description="one layer's norms in four stages: input (x1 / y1), input with its MAs left out, the "
    "standardized input before γ, the output after γ; COs in red",
    check=_check_norm_layer,
    layerwise=True,
)
def run_fig8(ctx: Context) -> dict[str, Any]:
    th = ctx.threshold
    m, beta = float(th.m), float(th.beta)
    layer = ctx.experiment_layer()
    norm_taps = ctx.lm.adapter.norm_taps()
    taps = list(dict.fromkeys(t for triple in norm_taps.values() for t in triple))
    inputs = tuple(dict.fromkeys(triple[0] for triple in norm_taps.values()))
    summaries = channel_profile(ctx, taps, [layer], without_ma=inputs)
    cos = cos_by_key(summaries, m, beta)
    panels, rows, counts = [], [], {}
    for src, std, out in norm_taps.values():
        for key, label in (
            (src, src),
            (src + NO_MA, f"{src} without MAs"),
            (std, f"{std} (no γ)"),
            (out, out),
        ):
            idx = cos[(layer, key)]
            panels.append((f"{label} (layer {layer})", summaries[(layer, key)].mean, idx))
            rows.append([label, len(idx), channel_list(idx, 12)])
            counts[f"co.{key}"] = len(idx)
    title = f"{ctx.cfg.model.name}: inside the norms, m={m:g}, β={beta:.3g}"
    write_figure(ctx.figures_dir / "fig8.png", channel_means_figure(panels, 4, title))
    text = write_table(ctx.tables_dir, Table.of("fig8", ["stage", "COs", "channels"], rows))
    print(f"\nFig. 8 — channel-wise outliers through the norms of layer {layer}:\n{text}")
    return {**co_rule(ctx), "layer": layer, **counts}
