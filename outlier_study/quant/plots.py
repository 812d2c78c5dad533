"""Pure plotting for the quantization experiment: data in, matplotlib Figure out (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from outlier_study.output.figures import LAYER_NOTE  # noqa: E402


def quant_error_figure(
    layers: Sequence[int],
    series: Mapping[str, Sequence[float]],
    marks: Mapping[str, Sequence[int]],
    title: str,
) -> Figure:
    """Relative quantization error ‖Q(X)Q(W) − XW‖/‖XW‖ per layer, one line per linear, log y axis.

    marks: label -> layers to flag (e.g. the layers holding massive activations), drawn as triangles on top.
    """
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot()
    markers = ("o", "s", "^", "v", "D", "P", "X")
    for i, (name, values) in enumerate(series.items()):
        ax.plot(
            layers, np.asarray(values, dtype=float), marker=markers[i % len(markers)], ms=3, lw=1, label=name
        )
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
    if any(v > 0 for values in series.values() for v in values):  # all zero (16 bits): keep a linear axis
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("‖Q(X)Q(W) − XW‖ / ‖XW‖")
    ax.set_title(f"{title} ({LAYER_NOTE})", fontsize=10, pad=6 + 14 * len(marks))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
