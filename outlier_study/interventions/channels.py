"""The `gamma` and `weight_channels` interventions: pick channels (COs, OTC rows, k-SD channels or a random
control of the same size), then edit them with `parameters.edit_gamma` / `edit_weight_channels`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from outlier_study.config.options import opt
from outlier_study.config.vocab import Axis, ChannelSelect, GammaValue, Statistic, WeightValue
from outlier_study.detect.rules import OTC_OUTPUT_TAP, Selection, random_like
from outlier_study.detect.select import (
    detect_otc,
    gamma_sizes,
    norm_output_cos,
    sd_weight_channels,
    weight_sizes,
)
from outlier_study.errors import ConfigError, require
from outlier_study.interventions.parameters import edit_gamma, edit_weight_channels
from outlier_study.interventions.record import Edited
from outlier_study.interventions.treatment import Inputs, Treatment

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch

LAYERS_DOC = "layers (from 0, negative from the end); null: all"


@dataclass
class GammaOptions:
    name: str = opt("gamma", "set the norm's γ at the channel-wise outliers of its output (paper Fig. 9)")
    norm: str = opt("both", "attn | mlp | both (Gemma3 also attn_post | mlp_post)")
    value: GammaValue = opt(GammaValue.mean, "mean (of that γ over all channels) | zero")
    channels: list[int] | None = opt(
        None, "γ entries to edit; null: the COs of the norm output in each layer"
    )
    layers: list[int] | None = opt(None, LAYERS_DOC, min_items=1)
    random: bool = opt(False, "as many random γ entries per layer instead (control; the top-level seed)")


def _check_gamma(options: Any, cfg: Any, arch: Arch) -> None:
    arch.adapter.norm_names(str(options.norm), "intervention.norm")
    arch.layers(options.layers, "intervention.layers")
    width = int(arch.config.hidden_size)
    for c in options.channels or ():
        require(
            0 <= int(c) < width, "intervention.channels", f"channel {c} out of range", [f"0..{width - 1}"]
        )


@contextmanager
def _apply_gamma(inputs: Inputs) -> Iterator[Edited]:
    """γ at the COs of the norm output (detected on the windows) or at `channels`, to mean or zero."""
    lm, o = inputs.lm, inputs.options
    norms = lm.adapter.norm_names(str(o.norm), "intervention.norm")
    layers = lm.arch.layers(o.layers, "intervention.layers")
    if o.channels is not None:
        chosen = np.asarray([int(c) for c in o.channels], dtype=np.int64)
        selection: Selection = {(layer, n): chosen for layer in layers for n in norms}
    else:
        require(
            inputs.windows is not None, "intervention.channels", "null needs windows to detect the COs on"
        )
        assert inputs.windows is not None
        selection = norm_output_cos(lm, inputs.windows, norms, layers, inputs.threshold, inputs.progress)
    if o.random:
        selection = random_like(selection, gamma_sizes(lm, list(selection)), inputs.seed)
    with edit_gamma(lm, selection, str(o.value)) as log:
        yield log


@dataclass
class WeightChannelsOptions:
    name: str = opt("weight_channels", "set weight channels to their own mean or zero (paper Tables 3 and 6)")
    select: ChannelSelect = opt(
        ChannelSelect.otc,
        "otc: rows of q/k/v whose output channel is a CO while input channel j of x2 is not; "
        "sd: channels whose per-channel statistic is more than sd_level SD from the channel mean",
    )
    matrices: list[str] = opt(
        ["q", "k", "v"], "q k v o gate up down (GPT-2: q k v o gate down); otc: q k v only"
    )
    value: WeightValue = opt(WeightValue.channel_mean, "channel_mean | zero")
    sd_level: float = opt(4.0, "select=sd: k of the k-SD rule", gt=0)
    statistic: Statistic = opt(Statistic.absmean, "select=sd: absmean | mean | absmax | l2 of each channel")
    axis: Axis = opt(Axis.out, "select=sd: out (rows = output channels) | in (columns); otc is out")
    layers: list[int] | None = opt(None, LAYERS_DOC, min_items=1)
    random: bool = opt(False, "as many random channels per matrix instead (control; the top-level seed)")


def _check_weight_channels(options: Any, cfg: Any, arch: Arch) -> None:
    for m in options.matrices:
        arch.adapter.weight_name(str(m), "intervention.matrices")
        if str(options.select) == "otc" and str(m) not in OTC_OUTPUT_TAP:
            raise ConfigError(
                "intervention.matrices", f"no OTC rule for matrix '{m}'", allowed=OTC_OUTPUT_TAP
            )
    arch.layers(options.layers, "intervention.layers")


@contextmanager
def _apply_weight_channels(inputs: Inputs) -> Iterator[Edited]:
    """Weight channels chosen by the OTC rule or the k-SD rule (or as many random ones), to mean or zero."""
    lm, o = inputs.lm, inputs.options
    matrices = [lm.adapter.weight_name(str(m), "intervention.matrices") for m in o.matrices]
    layers = lm.arch.layers(o.layers, "intervention.layers")
    if str(o.select) == "otc":
        require(inputs.windows is not None, "intervention.select", "otc needs windows to detect the COs on")
        assert inputs.windows is not None
        axis = "out"
        selection = detect_otc(
            lm, inputs.windows, matrices, layers, inputs.threshold, inputs.progress, "intervention.matrices"
        )
    else:
        axis = str(o.axis)
        selection = sd_weight_channels(lm, matrices, layers, float(o.sd_level), str(o.statistic), axis)
    if o.random:
        selection = random_like(selection, weight_sizes(lm, list(selection), axis), inputs.seed)
    with edit_weight_channels(lm, selection, axis, str(o.value)) as log:
        yield log


GAMMA = Treatment(
    _apply_gamma,
    GammaOptions,
    "γ at the norm-output COs set to the γ mean or zero",
    _check_gamma,
    layerwise=True,  # COs come from a profile; γ is edited in each layer as it is read
)
WEIGHT_CHANNELS = Treatment(
    _apply_weight_channels,
    WeightChannelsOptions,
    "weight channels (OTC rows or k-SD channels) set to their own mean or zero",
    _check_weight_channels,
    layerwise=True,  # OTC rows come from a profile, k-SD channels from each layer read once
)
