"""Which channels to look at or edit: COs per (layer, tap), OTC rows, k-SD weight channels, random controls.

Pure functions of summaries and weights, so the experiments and interventions share one definition each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from outlier_study.errors import ConfigError, require
from outlier_study.measure.profiler import ChannelsByTap
from outlier_study.stats.channels import channel_outliers

# The activation each weight writes (its output channels), for OTC: row j of W_q makes channel j of x3.
OTC_OUTPUT_TAP: dict[str, str] = {"q": "attn.q", "k": "attn.k", "v": "attn.v"}
OTC_INPUT_TAP = "attn.norm"
STATISTICS: tuple[str, ...] = ("absmean", "mean", "absmax", "l2")

Selection = dict[tuple[int, str], np.ndarray]


def check_co_threshold(m: float, beta: float) -> None:
    require(m > 0, "threshold.m", f"must be > 0, got {m}")
    require(beta > 0, "threshold.beta", f"must be > 0, got {beta}")


def check_sd_levels(levels: Sequence[float]) -> list[float]:
    out = [float(k) for k in levels]
    require(bool(out), "threshold.sd", "needs at least one level, e.g. [6,4,2]")
    for k in out:
        require(k > 0, "threshold.sd", f"levels must be > 0, got {k}")
    return out


def cos_by_key(summaries: ChannelsByTap, m: float, beta: float) -> Selection:
    """CO channel indices of every profiled (layer, tap)."""
    check_co_threshold(m, beta)
    return {key: channel_outliers(s, m, beta) for key, s in summaries.items()}


def otc_rows(
    cos: Selection, layers: Sequence[int], matrices: Sequence[str], field_name: str = "experiment.matrices"
) -> Selection:
    """Rows j of W_q/W_k/W_v whose output channel j is a CO while input channel j of x2 is not (DESIGN §3).

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
    if statistic not in STATISTICS:
        raise ConfigError("experiment.statistic", f"unknown statistic '{statistic}'", allowed=STATISTICS)
    w = view.detach().float()
    if w.dim() == 1:
        w = w[:, None]
    elif axis == "in":
        w = w.t()
    if statistic == "absmean":
        s = w.abs().mean(dim=1)
    elif statistic == "mean":
        s = w.mean(dim=1)
    elif statistic == "absmax":
        s = w.abs().amax(dim=1)
    else:
        s = w.norm(dim=1)
    return s.double().cpu().numpy()


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
