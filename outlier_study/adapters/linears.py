"""Linear layers in one orientation: transformers' GPT-2 `Conv1D` stores its weight as (in, out), every
reader of weights here sees the (out, in) orientation of `nn.Linear`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LinearLike = nn.Linear | Conv1D


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: LinearLike) -> torch.Tensor:
    """The weight as (out_features, in_features): a view for Conv1D's (in, out) storage."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def to_storage(module: LinearLike, w_out_in: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight in the module's own storage orientation."""
    return w_out_in if isinstance(module, nn.Linear) else w_out_in.t()
