"""The channel rules applied to a model: COs measured on windows, OTC rows, k-SD weight and γ channels,
and the channel counts a random control draws from. Shared by experiments, interventions and methods."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from outlier_study.detect.rules import (
    OTC_INPUT_TAP,
    OTC_OUTPUT_TAP,
    Selection,
    channel_statistic,
    cos_by_key,
    otc_rows,
    sd_channels,
)
from outlier_study.measure.profiler import profile_channels
from outlier_study.models.loader import LoadedModel

Key = tuple[int, str]


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
    """(layer, norm) -> CO channels of that norm's output over the windows: the γ entries the paper edits.
    A per-head norm (q_norm, k_norm) shares one γ of head_dim entries over all heads: a CO in channel c of
    its (heads · head_dim) output is γ entry c mod head_dim."""
    out_tap = {n: lm.adapter.norms[n].output_tap for n in norms}
    cos = detect_cos(lm, input_ids, list(out_tap.values()), layers, threshold, progress)
    sizes = gamma_sizes(lm, [(layer, n) for layer in layers for n in norms])
    return {
        (layer, n): _on_gamma(cos[(layer, out_tap[n])], sizes[(layer, n)]) for layer in layers for n in norms
    }


def _on_gamma(channels: np.ndarray, size: int) -> np.ndarray:
    """Output channels as γ entries (the same ones, unless γ is shared by heads)."""
    return channels if channels.size == 0 or channels.max() < size else np.unique(channels % size)


def detect_otc(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    matrices: list[str],
    layers: list[int],
    threshold: Any,
    progress: bool,
    field_name: str,
) -> Selection:
    taps = [OTC_INPUT_TAP, *(OTC_OUTPUT_TAP[m] for m in matrices if m in OTC_OUTPUT_TAP)]
    cos = detect_cos(lm, input_ids, taps, layers, threshold, progress, "OTC detection")
    return otc_rows(cos, layers, matrices, field_name)


def weight_sizes(lm: LoadedModel, keys: list[Key], axis: str) -> dict[Key, int]:
    blocks = lm.adapter.blocks(lm.model)
    dim = 0 if axis == "out" else 1
    return {(layer, name): lm.adapter.weight_view(blocks[layer], name).shape[dim] for layer, name in keys}


def gamma_sizes(lm: LoadedModel, keys: list[Key]) -> dict[Key, int]:
    blocks = lm.adapter.blocks(lm.model)
    return {(layer, norm): lm.adapter.gamma(blocks[layer], norm).shape[0] for layer, norm in keys}


def sd_weight_channels(
    lm: LoadedModel, matrices: list[str], layers: list[int], k: float, statistic: str, axis: str
) -> Selection:
    """(layer, matrix) -> channels whose per-channel statistic is more than k SD from the channel mean
    (a layerwise model's layers are read one at a time)."""
    adapter = lm.adapter
    return {
        (layer, name): sd_channels(channel_statistic(adapter.weight_view(block, name), statistic, axis), k)
        for layer, block in lm.blocks_with_weights(layers)
        for name in matrices
    }


def sd_gamma_channels(
    lm: LoadedModel, norms: list[str], layers: list[int], k: float, statistic: str
) -> Selection:
    """(layer, norm) -> γ entries (γ = weight + the family's offset) more than k SD from the γ mean."""
    adapter = lm.adapter
    return {
        (layer, n): sd_channels(
            channel_statistic(adapter.gamma(block, n) + adapter.gamma_offset, statistic, "out"), k
        )
        for layer, block in lm.blocks_with_weights(layers)
        for n in norms
    }
