"""Super weights (Yu et al., 2024): the down-projection weight W[i, j] that turns the spike of input channel
j at y6 (mlp.hidden, the down projection's input) into the spike of output channel i at y7 (mlp.out).

Found from each window's peak at y6 and y7, streamed in hooks: a layer has a candidate when its y6 peak
meets the MA rule and the y7 peak of the same window sits at the same token; j and i are the channels of
the most common such pair. Shared by the `superweight` experiment and the `superweight_keep` method.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import TYPE_CHECKING, Any

import torch

from outlier_study.errors import require
from outlier_study.measure.profiler import Profiler, run_profiler
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.peaks import Peak, PeakReducer

if TYPE_CHECKING:
    from outlier_study.adapters.base import Adapter, Arch

Y6, Y7 = "mlp.hidden", "mlp.out"
Peaks = dict[tuple[int, str], list[Peak]]  # (layer, tap) -> one peak per window


@dataclass(frozen=True)
class PeakSite:
    """Where the window peaks of one (layer, tap) sit: their most common channel and token."""

    channel: int
    windows: int  # windows whose peak is in `channel`
    value: float  # mean signed peak over those windows
    token: int  # most common token position among them
    token_windows: int
    massive: int  # windows whose peak (in any channel) meets the MA rule
    max_abs: float  # largest |peak| over all windows


def peak_site(peaks: Sequence[Peak], ma_abs: float, ma_ratio: float) -> PeakSite | None:
    """The most common channel of the peaks (None: no window had a finite element)."""
    if not peaks:
        return None
    channel, windows = Counter(p.channel for p in peaks).most_common(1)[0]
    hits = [p for p in peaks if p.channel == channel]
    token, token_windows = Counter(p.token for p in hits).most_common(1)[0]
    return PeakSite(
        channel,
        windows,
        fmean(p.value for p in hits),
        token,
        token_windows,
        sum(p.massive(ma_abs, ma_ratio) for p in peaks),
        max(abs(p.value) for p in peaks),
    )


@dataclass(frozen=True)
class SuperWeight:
    """A candidate W[row, col] of one layer's down projection, (out, in) orientation."""

    layer: int
    row: int  # i: the output channel of the y7 spike
    col: int  # j: the input channel of the y6 spike
    token: int  # most common token position of the spike
    windows: tuple[int, ...]  # windows with a massive y6 peak at col and the y7 peak at row, same token
    y6: float  # mean y6 spike over those windows
    y7: float  # mean y7 peak over those windows
    y7_massive: int  # of those windows, how many have a y7 peak that meets the MA rule too
    share: float  # mean of W[i, j]·y6 / y7 over those windows: how much of the y7 peak this weight makes

    @property
    def label(self) -> str:
        return f"layer {self.layer} W[{self.row}, {self.col}]"


def find_super_weights(
    peaks: Mapping[tuple[int, str], Sequence[Peak]],
    views: Mapping[int, torch.Tensor],
    ma_abs: float,
    ma_ratio: float,
) -> list[SuperWeight]:
    """The candidate of every layer in `views` (layer -> its down projection, (out, in)), layer order."""
    found = []
    for layer, view in sorted(views.items()):
        y7 = {p.window: p for p in peaks[(layer, Y7)]}
        pairs = [
            (p, y7[p.window])
            for p in peaks[(layer, Y6)]
            if p.massive(ma_abs, ma_ratio) and p.window in y7 and y7[p.window].token == p.token
        ]
        if not pairs:
            continue
        (col, row), _ = Counter((a.channel, b.channel) for a, b in pairs).most_common(1)[0]
        hits = [(a, b) for a, b in pairs if (a.channel, b.channel) == (col, row)]
        weight = float(view[row, col].detach())
        found.append(
            SuperWeight(
                layer=layer,
                row=row,
                col=col,
                token=Counter(a.token for a, _ in hits).most_common(1)[0][0],
                windows=tuple(a.window for a, _ in hits),
                y6=fmean(a.value for a, _ in hits),
                y7=fmean(b.value for _, b in hits),
                y7_massive=sum(b.massive(ma_abs, ma_ratio) for _, b in hits),
                share=fmean(weight * a.value / b.value if b.value else math.nan for a, b in hits),
            )
        )
    return found


def dense_layers(adapter: Adapter, layers: list[int]) -> list[int]:
    """The layers with a dense down projection (input y6, output y7): the ones that are not MoE layers."""
    return [layer for layer in layers if layer not in adapter.moe] if "down" in adapter.weights else []


def check_dense_down(arch: Arch, field: str) -> None:
    """Super weights are searched in dense down projections; a model with none is refused before the load."""
    require(
        bool(dense_layers(arch.adapter, list(range(arch.n_layers)))),
        field,
        f"super weights are searched in dense down projections; every MLP of this {arch.adapter.family} "
        "model is a mixture of experts",
    )


def measure_peaks(
    lm: LoadedModel, ids: torch.Tensor, layers: list[int], batch_size: int, progress: bool, desc: str
) -> Peaks:
    """Each window's peak at y6 and y7 of `layers`."""
    profiler = Profiler([Y6, Y7], layers, lambda _tap: PeakReducer())
    return run_profiler(lm, ids, [Y6, Y7], layers, profiler, batch_size, progress, desc)


def down_views(lm: LoadedModel, layers: list[int]) -> dict[int, torch.Tensor]:
    blocks = lm.adapter.blocks(lm.model)
    return {layer: lm.adapter.weight_view(blocks[layer], "down") for layer in layers}


def detect_super_weights(
    lm: LoadedModel,
    ids: torch.Tensor,
    layers: list[int],
    threshold: Any,
    batch_size: int = 1,
    progress: bool = False,
) -> tuple[list[SuperWeight], Peaks]:
    """The candidates over the windows `ids` by the MA rule of `threshold`, and the peaks they come from, in
    the dense layers among `layers`."""
    layers = dense_layers(lm.adapter, layers)
    peaks = measure_peaks(lm, ids, layers, batch_size, progress, "super weights")
    views = down_views(lm, layers)
    return find_super_weights(peaks, views, float(threshold.ma_abs), float(threshold.ma_ratio)), peaks


@dataclass(frozen=True)
class WeightRank:
    value: float
    row_rank: int  # 1: the largest |w| of its row
    col_rank: int  # 1: the largest |w| of its column


def weight_rank(view: torch.Tensor, row: int, col: int) -> WeightRank:
    """W[row, col] and its rank by |w| within its row and its column (ties share the better rank)."""
    w = view.detach().float()
    size = w[row, col].abs()
    return WeightRank(
        float(w[row, col]),
        int((w[row].abs() > size).sum()) + 1,
        int((w[:, col].abs() > size).sum()) + 1,
    )
