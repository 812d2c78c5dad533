"""Pure plotting: data in, matplotlib Figure out (no I/O, no global state)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LAYER_NOTE = "layers numbered from 0"


def layer_tops_figure(
    layers: Sequence[int], tops: np.ndarray, medians: Sequence[float], title: str
) -> Figure:
    """Per-layer top-1/2/3 |a| and median |a| on a log axis (the paper's Fig. 4/5 style).

    tops: (n_layers, k) largest |a| per layer, descending; missing ranks are nan.
    """
    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.add_subplot()
    markers = ("o", "s", "^", "v", "D")
    for rank in range(tops.shape[1]):
        ax.plot(layers, tops[:, rank], marker=markers[rank % len(markers)], ms=3.5, lw=1.2, label=f"top-{rank + 1}")
    ax.plot(layers, medians, color="gray", ls="--", lw=1.2, label="median")
    ax.set_yscale("log")
    ax.set_xlabel(f"layer ({LAYER_NOTE})")
    ax.set_ylabel("|activation|")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    return fig


def abs_surface_figure(values: np.ndarray, token_labels: Sequence[str], title: str) -> Figure:
    """3-D |a| over (token, channel) of one layer and tap (the paper's Fig. 6 style), tokens labelled."""
    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.add_subplot(projection="3d")
    n_tokens, n_channels = values.shape
    tok, ch = np.meshgrid(np.arange(n_tokens), np.arange(n_channels), indexing="ij")
    ax.plot_surface(ch, tok, values, cmap="coolwarm", linewidth=0, antialiased=False, rcount=n_tokens, ccount=200)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_zlabel("|activation|")
    step = max(1, n_tokens // 16)
    ax.set_yticks(range(0, n_tokens, step))
    ax.set_yticklabels([token_labels[i] for i in range(0, n_tokens, step)], fontsize=6)
    ax.set_title(f"{title} ({LAYER_NOTE})", fontsize=10)
    ax.view_init(elev=25, azim=-60)
    return fig
