"""Pure plotting: data in, matplotlib Figure out (no I/O, no global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LAYER_NOTE = "layers numbered from 0"


def layer_tops_figure(
    layers: Sequence[int], panels: Mapping[str, tuple[np.ndarray, Sequence[float]]], title: str
) -> Figure:
    """Per-layer top-k |a| and median |a| on log axes, one panel per tap (the paper's Fig. 4/5 style).

    panels: tap -> (tops (n_layers, k) descending with nan for missing ranks, medians (n_layers,)).
    """
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.9 * nrows + 0.6), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=1 - 0.5 / (2.9 * nrows + 0.6), hspace=0.45)
    fig.suptitle(f"{title} ({LAYER_NOTE})", fontsize=11)
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
        ax.set_title(tap, fontsize=9)
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
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.7 * nrows + 0.6), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.09, top=1 - 0.55 / (2.7 * nrows + 0.6), hspace=0.5)
    fig.suptitle(f"{title} ({LAYER_NOTE}; red: channel-wise outliers)", fontsize=10)
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
    ncols = min(4, len(taps))
    nrows = -(-len(taps) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows + 0.6), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=1 - 0.55 / (2.8 * nrows + 0.6), hspace=0.5)
    fig.suptitle(f"{title} ({LAYER_NOTE})", fontsize=10)
    for i, tap in enumerate(taps):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for setting, by_tap in series.items():
            ax.plot(layers, by_tap[tap], marker="o", ms=3, lw=1, label=setting)
        ax.set_title(tap, fontsize=9)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("CO count", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    return fig
