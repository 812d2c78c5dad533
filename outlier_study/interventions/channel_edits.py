"""The `gamma` and `weight_channels` interventions: pick channels (COs, OTC rows, k-SD channels or a random
control of the same size), then edit them with `parameters.edit_gamma` / `edit_weight_channels`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from outlier_study.detect.rules import (
    OTC_INPUT_TAP,
    OTC_OUTPUT_TAP,
    Selection,
    channel_statistic,
    cos_by_key,
    otc_rows,
    random_like,
    sd_channels,
)
from outlier_study.errors import ConfigError, require
from outlier_study.interventions.massive import check_layers
from outlier_study.interventions.parameters import (
    EditLog,
    check_axis,
    edit_gamma,
    edit_weight_channels,
    gamma_param,
    weight_view,
)
from outlier_study.measure.profiler import profile_channels

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

# The activation a norm writes: its γ entries at that activation's COs are the ones the paper edits.
NORM_OUTPUT_TAP: dict[str, str] = {
    "attn": "attn.norm",
    "mlp": "mlp.norm",
    "attn_post": "attn.post_norm",
    "mlp_post": "mlp.post_norm",
}
SELECTS: tuple[str, ...] = ("otc", "sd")


def detect_cos(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    taps: list[str],
    layers: list[int],
    threshold: Any,
    progress: bool,
    desc: str = "CO detection",
    batch_size: int = 1,
) -> Selection:
    """(layer, tap) -> CO channels over the windows, by threshold.m / beta / abs_mean."""
    summaries = profile_channels(
        lm,
        input_ids,
        taps,
        layers,
        absolute=bool(threshold.abs_mean),
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return cos_by_key(summaries, float(threshold.m), float(threshold.beta))


def norm_output_cos(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    norms: list[str],
    layers: list[int],
    threshold: Any,
    progress: bool,
) -> Selection:
    """(layer, norm) -> CO channels of that norm's output over the windows."""
    cos = detect_cos(lm, input_ids, [NORM_OUTPUT_TAP[n] for n in norms], layers, threshold, progress)
    return {(layer, n): cos[(layer, NORM_OUTPUT_TAP[n])] for layer in layers for n in norms}


def detect_otc(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    matrices: list[str],
    layers: list[int],
    threshold: Any,
    progress: bool,
    field_name: str = "intervention.matrices",
) -> Selection:
    taps = [OTC_INPUT_TAP, *(OTC_OUTPUT_TAP[m] for m in matrices if m in OTC_OUTPUT_TAP)]
    cos = detect_cos(lm, input_ids, taps, layers, threshold, progress, "OTC detection")
    return otc_rows(cos, layers, matrices, field_name)


def weight_sizes(lm: LoadedModel, keys: list[tuple[int, str]], axis: str) -> dict[tuple[int, str], int]:
    blocks = lm.adapter.layers(lm.model)
    dim = 0 if axis == "out" else 1
    return {(layer, name): weight_view(lm.adapter, blocks[layer], name).shape[dim] for layer, name in keys}


def gamma_sizes(lm: LoadedModel, keys: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
    blocks = lm.adapter.layers(lm.model)
    return {(layer, norm): gamma_param(lm.adapter, blocks[layer], norm).shape[0] for layer, norm in keys}


def sd_weight_channels(
    lm: LoadedModel, matrices: list[str], layers: list[int], k: float, statistic: str, axis: str
) -> Selection:
    """(layer, matrix) -> channels whose per-channel statistic is more than k SD from the channel mean."""
    blocks = lm.adapter.layers(lm.model)
    return {
        (layer, name): sd_channels(
            channel_statistic(weight_view(lm.adapter, blocks[layer], name), statistic, axis), k
        )
        for layer in layers
        for name in matrices
    }


def sd_gamma_channels(
    lm: LoadedModel, norms: list[str], layers: list[int], k: float, statistic: str
) -> Selection:
    blocks = lm.adapter.layers(lm.model)
    offset = lm.adapter.gamma_offset
    return {
        (layer, n): sd_channels(
            channel_statistic(gamma_param(lm.adapter, blocks[layer], n) + offset, statistic, "out"), k
        )
        for layer in layers
        for n in norms
    }


@contextmanager
def gamma_intervention(
    lm: LoadedModel, cfg: Any, threshold: Any, input_ids: torch.Tensor | None, progress: bool, seed: int
) -> Iterator[EditLog]:
    """γ at the COs of the norm output (detected on `input_ids`) or at `cfg.channels`, to mean or zero."""
    norms = lm.adapter.norm_names(str(cfg.norm), "intervention.norm")
    layers = check_layers(lm, None if cfg.layers is None else list(cfg.layers))
    if cfg.channels is not None:
        chosen = np.asarray([int(c) for c in cfg.channels], dtype=np.int64)
        selection: Selection = {(layer, n): chosen for layer in layers for n in norms}
    else:
        require(input_ids is not None, "intervention.channels", "null needs windows to detect the COs on")
        assert input_ids is not None
        selection = norm_output_cos(lm, input_ids, norms, layers, threshold, progress)
    if cfg.random:
        selection = random_like(selection, gamma_sizes(lm, list(selection)), seed)
    with edit_gamma(lm, selection, str(cfg.value)) as log:
        yield log


@contextmanager
def weight_channels_intervention(
    lm: LoadedModel, cfg: Any, threshold: Any, input_ids: torch.Tensor | None, progress: bool, seed: int
) -> Iterator[EditLog]:
    """Weight channels chosen by the OTC rule or the k-SD rule (or as many random ones), to mean or zero."""
    select = str(cfg.select)
    if select not in SELECTS:
        raise ConfigError("intervention.select", f"unknown selection '{select}'", allowed=SELECTS)
    matrices = [lm.adapter.weight_name(str(m), "intervention.matrices") for m in cfg.matrices]
    layers = check_layers(lm, None if cfg.layers is None else list(cfg.layers))
    if select == "otc":
        require(input_ids is not None, "intervention.select", "otc needs windows to detect the COs on")
        assert input_ids is not None
        axis = "out"
        selection = detect_otc(lm, input_ids, matrices, layers, threshold, progress)
    else:
        axis = check_axis(str(cfg.axis))
        require(cfg.sd_level > 0, "intervention.sd_level", f"must be > 0, got {cfg.sd_level}")
        selection = sd_weight_channels(lm, matrices, layers, float(cfg.sd_level), str(cfg.statistic), axis)
    if cfg.random:
        selection = random_like(selection, weight_sizes(lm, list(selection), axis), seed)
    with edit_weight_channels(lm, selection, axis, str(cfg.value)) as log:
        yield log
