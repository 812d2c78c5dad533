"""Pure plotting: data in, matplotlib Figure out (no I/O, no global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

LAYER_NOTE = "layers numbered from 0"


def _panel_grid(
    n_panels: int, panel_height: float, title: str, fontsize: int = 11, ncols: int | None = None
) -> tuple[Figure, int, int]:
    """A figure for `n_panels` panels (`ncols`, default at most 4, a row) whose title has a band of its own.

    Margins and gaps are fixed in inches (room for the title, panel titles and tick labels): a layout
    engine measuring every tick label costs more than the plot itself once there are dozens of panels."""
    ncols = ncols or min(4, n_panels)
    nrows = -(-n_panels // ncols)
    width, height = 4.2 * ncols, panel_height * nrows + 0.6
    fig = Figure(figsize=(width, height), dpi=100)
    left, right, bottom, top, gap_w, gap_h = 0.95, 0.2, 0.45, 0.6, 1.0, 0.7
    axis_w = (width - left - right - gap_w * (ncols - 1)) / ncols
    axis_h = (height - bottom - top - gap_h * (nrows - 1)) / nrows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap_w / axis_w,
        hspace=gap_h / axis_h,
    )
    fig.suptitle(title, fontsize=fontsize, y=1 - 0.15 / height, va="top")
    return fig, nrows, ncols


def _count_axis(ax: Axes, counts: Sequence[Sequence[int]]) -> None:
    """Counts get integer ticks, and an all-zero panel shows 0..1 instead of ±0.04."""
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not any(c for series in counts for c in series):
        ax.set_ylim(-0.05, 1.05)
    else:
        ax.set_ylim(bottom=-0.05 * max(c for series in counts for c in series))


def layer_tops_figure(
    layers: Sequence[int], panels: Mapping[str, tuple[np.ndarray, Sequence[float]]], title: str
) -> Figure:
    """Per-layer top-k |a| and median |a| on log axes, one panel per tap (the paper's Fig. 4/5 style).

    panels: tap -> (tops (n_layers, k) descending with nan for missing ranks, medians (n_layers,)).
    """
    fig, nrows, ncols = _panel_grid(len(panels), 2.9, f"{title} ({LAYER_NOTE})")
    markers = ("o", "s", "^", "v", "D")
    for i, (tap, (tops, medians)) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for rank in range(tops.shape[1]):
            ax.plot(
                layers,
                tops[:, rank],
                marker=markers[rank % len(markers)],
                ms=3,
                lw=1,
                label=f"top-{rank + 1}",
            )
        ax.plot(layers, medians, color="gray", ls="--", lw=1, label="median")
        ax.set_yscale("log")
        ax.set_title(tap, fontsize=9, y=1.0)  # a fixed y: no per-draw search for the tick labels
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, ncol=2)
    return fig


def abs_surface_figure(values: np.ndarray, token_labels: Sequence[str], title: str) -> Figure:
    """3-D |a| over (token, channel) of one layer and tap (the paper's Fig. 6 style), tokens labelled."""
    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.add_subplot(projection="3d")
    n_tokens, n_channels = values.shape
    tok, ch = np.meshgrid(np.arange(n_tokens), np.arange(n_channels), indexing="ij")
    ax.plot_surface(
        ch, tok, values, cmap="coolwarm", linewidth=0, antialiased=False, rcount=n_tokens, ccount=200
    )
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_zlabel("|activation|")
    step = max(1, n_tokens // 16)
    ax.set_yticks(range(0, n_tokens, step))
    ax.set_yticklabels([token_labels[i] for i in range(0, n_tokens, step)], fontsize=6)
    ax.set_title(f"{title} ({LAYER_NOTE})", fontsize=10)
    ax.view_init(elev=25, azim=-60)
    return fig


def channel_means_figure(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]], ncols: int, title: str
) -> Figure:
    """Channel means per panel with the channel-wise outliers in red (the paper's Fig. 7/8 style).

    panels: (subtitle, channel means (C,), CO channel indices), filled row by row into `ncols` columns."""
    title = f"{title} ({LAYER_NOTE}; red: channel-wise outliers)"
    fig, nrows, ncols = _panel_grid(len(panels), 2.7, title, fontsize=10, ncols=ncols)
    for i, (subtitle, means, cos) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        channels = np.arange(means.shape[0])
        ax.scatter(channels, means, s=2, color="tab:blue", linewidths=0)
        if len(cos):
            ax.scatter(cos, means[cos], s=10, color="red", zorder=3, label=f"{len(cos)} COs")
            ax.legend(fontsize=6, loc="best")
        ax.set_title(subtitle, fontsize=8)
        ax.set_xlabel("channel", fontsize=7)
        ax.set_ylabel("channel mean", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    return fig


def co_counts_figure(
    layers: Sequence[int], series: Mapping[str, Mapping[str, Sequence[int]]], title: str
) -> Figure:
    """CO count per layer, one panel per tap, one line per setting (the paper's Fig. 9 style).

    series: setting (e.g. "original", "γ → mean") -> tap -> counts per layer."""
    taps = list(next(iter(series.values())))
    fig, nrows, ncols = _panel_grid(len(taps), 2.8, f"{title} ({LAYER_NOTE})", fontsize=10)
    for i, tap in enumerate(taps):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for setting, by_tap in series.items():
            ax.plot(layers, by_tap[tap], marker="o", ms=3, lw=1, label=setting)
        ax.set_title(tap, fontsize=9)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("CO count", fontsize=7)
        _count_axis(ax, [by_tap[tap] for by_tap in series.values()])
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    return fig


def quant_error_figure(
    series: Mapping[str, Mapping[int, float]],
    marks: Mapping[str, Sequence[int]],
    title: str,
) -> Figure:
    """Relative quantization error ‖Q(X)Q(W) − XW‖/‖XW‖ per layer, one line per linear over the layers
    that have it (a dense MLP and a MoE block's experts may alternate), log y axis.

    marks: label -> layers to flag (e.g. the layers holding massive activations), drawn as triangles on top.
    """
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot()
    markers = ("o", "s", "^", "v", "D", "P", "X")
    for i, (name, by_layer) in enumerate(series.items()):
        values = np.asarray(list(by_layer.values()), dtype=float)
        ax.plot(list(by_layer), values, marker=markers[i % len(markers)], ms=3, lw=1, label=name)
    # One row of triangles per mark set above the plot area: CO sites can be in nearly every layer, and
    # full-height lines there would hide the error curves.
    colors = ("tab:red", "tab:purple", "tab:brown")
    strip = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (label, where) in enumerate(marks.items()):
        y = [1.025 + 0.045 * i] * len(where)
        ax.plot(
            list(where),
            y,
            ls="none",
            marker="v",
            ms=6,
            color=colors[i % len(colors)],
            transform=strip,
            clip_on=False,
            label=label,
        )
    # all zero (16 bits): keep a linear axis
    if any(v > 0 for by_layer in series.values() for v in by_layer.values()):
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("‖Q(X)Q(W) − XW‖ / ‖XW‖")
    ax.set_title(f"{title} ({LAYER_NOTE})", fontsize=10, pad=6 + 14 * len(marks))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def super_weight_figure(
    layers: Sequence[int],
    y6_max: Sequence[float],
    y7_max: Sequence[float],
    candidates: Mapping[int, str],
    title: str,
) -> Figure:
    """Per layer the largest |a| at the down projection's input (y6) and output (y7), log y axis; the layers
    holding a candidate super weight are marked on both curves and labelled with its W[i, j]."""
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot()
    for values, label, marker in (
        (y6_max, "max |y6| (down_proj input)", "o"),
        (y7_max, "max |y7| (output)", "s"),
    ):
        ax.plot(layers, np.asarray(values, dtype=float), marker=marker, ms=3, lw=1, label=label)
    at = {layer: i for i, layer in enumerate(layers)}
    marked = [layer for layer in candidates if layer in at]
    if marked:
        for values in (y6_max, y7_max):
            ax.plot(
                marked,
                [values[at[layer]] for layer in marked],
                ls="none",
                marker="*",
                ms=12,
                color="tab:red",
                zorder=3,
                label="candidate super weight" if values is y6_max else None,
            )
        for layer in marked:
            ax.annotate(
                candidates[layer],
                (layer, y7_max[at[layer]]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=7,
                color="tab:red",
            )
    positive = [v for v in (*y6_max, *y7_max) if v > 0]
    if positive:
        ax.set_yscale("log")
        ax.set_ylim(top=max(positive) * 4)  # room above the highest point for its label
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("largest |a| over the windows")
    ax.set_title(f"{title} ({LAYER_NOTE})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
