"""Interventions chosen by the `intervention` config group; each is a context manager that leaves the model
exactly as it found it (DESIGN §3), also when the body raises."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from outlier_study.errors import ConfigError
from outlier_study.interventions.channel_edits import gamma_intervention, weight_channels_intervention
from outlier_study.interventions.massive import InterventionLog, editable_taps, replace_massive
from outlier_study.interventions.parameters import EditLog
from outlier_study.interventions.residual import remove_residual_mas

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

INTERVENTIONS: tuple[str, ...] = ("none", "massive", "residual", "gamma", "weight_channels")


@contextmanager
def intervention(
    lm: LoadedModel,
    cfg: Any,
    threshold: Any,
    input_ids: torch.Tensor | None = None,
    progress: bool = False,
    seed: int = 0,
) -> Iterator[InterventionLog | EditLog | None]:
    """Apply the intervention `cfg` (an InterventionConfig) with the thresholds of `threshold` for the block;
    yields its log, or None for `none`. Channel selections that need activations (COs, OTC rows) are
    detected on `input_ids`; random controls draw with `seed`."""
    name = str(cfg.name)
    if name == "none":
        yield None
        return
    layers = None if cfg.layers is None else [int(i) for i in cfg.layers]
    ma_abs, ma_ratio = float(threshold.ma_abs), float(threshold.ma_ratio)
    if name == "massive":
        with replace_massive(lm, str(cfg.tap), layers, str(cfg.value), ma_abs, ma_ratio) as log:
            yield log
    elif name == "residual":
        with remove_residual_mas(lm, layers, str(cfg.value), ma_abs, ma_ratio) as log:
            yield log
    elif name == "gamma":
        with gamma_intervention(lm, cfg, threshold, input_ids, progress, seed) as edit_log:
            yield edit_log
    elif name == "weight_channels":
        with weight_channels_intervention(lm, cfg, threshold, input_ids, progress, seed) as edit_log:
            yield edit_log
    else:
        raise ConfigError("intervention.name", f"unknown intervention '{name}'", allowed=INTERVENTIONS)


__all__ = [
    "INTERVENTIONS",
    "EditLog",
    "InterventionLog",
    "editable_taps",
    "intervention",
    "remove_residual_mas",
    "replace_massive",
]
