"""The channel rules: channel-wise outliers (CO), outlier-triggering rows (OTC), k-SD channels, and the
random control of a selection. Pure functions of summaries and weights, one body each, shared by the
experiments, interventions and quantization methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from outlier_study.errors import ConfigError
from outlier_study.stats.channels import ChannelSummary

# The activation each weight writes (its output channels), for OTC: row j of W_q makes channel j of x3.
OTC_OUTPUT_TAP: dict[str, str] = {"q": "attn.q", "k": "attn.k", "v": "attn.v"}
OTC_INPUT_TAP = "attn.norm"

Selection = dict[tuple[int, str], np.ndarray]

# One number per channel of a (channels, n) matrix: the per-channel statistics of the k-SD rule.
STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "absmean": lambda w: w.abs().mean(dim=1),
    "mean": lambda w: w.mean(dim=1),
    "absmax": lambda w: w.abs().amax(dim=1),
    "l2": lambda w: w.norm(dim=1),
}


def channel_outliers(summary: ChannelSummary, m: float, beta: float) -> np.ndarray:
    """Channels j with mean_j − mean(A) > m·σ(A) and std_j < β: a shifted, steady channel.

    The rule is one-sided as the paper writes it; with signed means a channel shifted downwards is not a
    CO, with `absolute` summaries it is (its |A| mean is high). Returns sorted channel indices."""
    with np.errstate(invalid="ignore"):
        hit = (summary.mean - summary.tensor_mean > m * summary.tensor_std) & (summary.std < beta)
    return np.flatnonzero(hit)


def cos_by_key(summaries: Mapping[tuple[int, str], ChannelSummary], m: float, beta: float) -> Selection:
    """CO channel indices of every profiled (layer, tap)."""
    return {key: channel_outliers(s, m, beta) for key, s in summaries.items()}


def otc_rows(cos: Selection, layers: Sequence[int], matrices: Sequence[str], field_name: str) -> Selection:
    """Rows j of W_q/W_k/W_v whose output channel j is a CO while input channel j of x2 is not.

    Output channels past the width of x2 (wide q projections, e.g. Gemma3) have no input channel j, which
    counts as "not a CO"."""
    out: Selection = {}
    for layer in layers:
        inputs = set(cos[(layer, OTC_INPUT_TAP)].tolist())
        for name in matrices:
            if name not in OTC_OUTPUT_TAP:
                raise ConfigError(field_name, f"no OTC rule for matrix '{name}'", allowed=OTC_OUTPUT_TAP)
            rows = [j for j in cos[(layer, OTC_OUTPUT_TAP[name])].tolist() if j not in inputs]
            out[(layer, name)] = np.asarray(rows, dtype=np.int64)
    return out


def channel_statistic(view: torch.Tensor, statistic: str, axis: str) -> np.ndarray:
    """One number per channel of an (out, in) weight view (axis out: per row; in: per column) or of a
    1-D γ (its entries)."""
    w = view.detach().float()
    if w.dim() == 1:
        w = w[:, None]
    elif axis == "in":
        w = w.t()
    return STATISTICS[str(statistic)](w).double().cpu().numpy()


def sd_channels(values: np.ndarray, k: float) -> np.ndarray:
    """Channels whose statistic lies more than k standard deviations from the mean over channels."""
    return np.flatnonzero(np.abs(values - values.mean()) > k * values.std())


def random_like(
    selection: Mapping[tuple[int, str], np.ndarray], sizes: Mapping[tuple[int, str], int], seed: int
) -> Selection:
    """The random control: per key as many channels as `selection` has, drawn (seeded) from the channels
    it did not select, so the control never overlaps the treatment."""
    rng = np.random.default_rng(seed)
    out: Selection = {}
    for key in sorted(selection):
        chosen = np.asarray(selection[key])
        pool = np.setdiff1d(np.arange(sizes[key]), chosen)
        out[key] = np.sort(rng.choice(pool, size=min(len(chosen), len(pool)), replace=False))
    return out
