"""Edits of weight entries (γ entries, weight rows or columns) that are undone bit-exactly.

Only the touched entries are saved (an index_select copy), not whole matrices: editing q/k/v rows of every
layer of an 8B model must not double its memory. Everything is validated before the first write, and the
saved entries are copied back in `finally`, so an exception inside the block still restores the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.base import Adapter
from outlier_study.errors import ConfigError

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

GAMMA_VALUES: tuple[str, ...] = ("mean", "zero")
WEIGHT_VALUES: tuple[str, ...] = ("channel_mean", "zero")
AXES: tuple[str, ...] = ("out", "in")

Key = tuple[int, str]  # (layer, norm key or weight name)


@dataclass
class EditLog:
    """What an edit touched: channel indices per (layer, name); small enough for metrics.json."""

    name: str
    value: str
    edited: dict[Key, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.edited.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"intervention.name": self.name, "intervention.value": self.value}
        out["intervention.changed_total"] = self.total
        by_name: dict[str, int] = {}
        for (_, name), idx in self.edited.items():
            by_name[name] = by_name.get(name, 0) + len(idx)
        out.update({f"intervention.changed.{k}": v for k, v in sorted(by_name.items())})
        return out


def weight_view(adapter: Adapter, block: nn.Module, name: str) -> torch.Tensor:
    """(out, in) view of a layer's weight `name`, sharing storage with the parameter (Conv1D is (in, out))."""
    spec = adapter.weights[name]
    module = block.get_submodule(spec.module)
    weight = module.weight
    view = weight if isinstance(module, nn.Linear) else weight.t()
    rows = view.shape[0] // spec.parts
    return view[spec.part * rows : (spec.part + 1) * rows]


def gamma_param(adapter: Adapter, block: nn.Module, norm: str) -> torch.Tensor:
    """The weight of a layer's norm `norm`; the norm scales by weight + adapter.gamma_offset."""
    return block.get_submodule(adapter.norms[norm]).weight


def check_value(value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError("intervention.value", f"unknown value '{value}'", allowed=allowed)
    return value


def check_axis(axis: str, field_name: str = "intervention.axis") -> str:
    if axis not in AXES:
        raise ConfigError(field_name, f"unknown axis '{axis}'", allowed=AXES)
    return axis


def _index(idx: Sequence[int], size: int, key: Key) -> torch.Tensor:
    index = torch.as_tensor(sorted({int(i) for i in idx}), dtype=torch.long)
    if index.numel() and not (0 <= int(index[0]) and int(index[-1]) < size):
        raise ConfigError(
            "intervention.channels", f"channel out of range for {key}", allowed=[f"0..{size - 1}"]
        )
    return index


@contextmanager
def _restoring(edits: list[tuple[torch.Tensor, int, torch.Tensor]]) -> Iterator[None]:
    """Save the entries of every (2-D view, dim, index), yield, then copy them back whatever happened."""
    saved = [(view, dim, index, view.index_select(dim, index).clone()) for view, dim, index in edits]
    try:
        yield
    finally:
        with torch.no_grad():
            for view, dim, index, values in saved:
                view.index_copy_(dim, index, values)


@contextmanager
def edit_gamma(lm: LoadedModel, channels: Mapping[Key, Sequence[int]], value: str) -> Iterator[EditLog]:
    """Set γ entries (layer, norm) -> channels to the mean of that γ over all channels, or to zero.

    For Gemma3 γ = 1 + weight, so the weight is set to (target − 1)."""
    value = check_value(value, GAMMA_VALUES)
    adapter, blocks = lm.adapter, lm.adapter.layers(lm.model)
    plan = []
    for (layer, norm), idx in channels.items():
        adapter.norm_names(norm, "intervention.norm")
        w = gamma_param(adapter, blocks[layer], norm)
        index = _index(idx, w.shape[0], (layer, norm))
        target = (w.float() + adapter.gamma_offset).mean() if value == "mean" else torch.zeros(())
        plan.append((w.unsqueeze(0), index, (target - adapter.gamma_offset).to(w.dtype)))
    log = EditLog("gamma", value, {key: sorted({int(i) for i in idx}) for key, idx in channels.items()})
    with _restoring([(view, 1, index) for view, index, _ in plan]):
        with torch.no_grad():
            for view, index, fill in plan:
                view[:, index] = fill
        yield log


@contextmanager
def edit_weight_channels(
    lm: LoadedModel, channels: Mapping[Key, Sequence[int]], axis: str, value: str
) -> Iterator[EditLog]:
    """Set channels of weights, (layer, name) -> indices along `axis` of the (out, in) view, to each
    channel's own mean (a row mean for axis "out") or to zero. Biases are left alone."""
    value = check_value(value, WEIGHT_VALUES)
    dim = AXES.index(check_axis(axis))
    adapter, blocks = lm.adapter, lm.adapter.layers(lm.model)
    plan = []
    for (layer, name), idx in channels.items():
        adapter.weight_name(name, "intervention.matrices")
        view = weight_view(adapter, blocks[layer], name)
        plan.append((view, _index(idx, view.shape[dim], (layer, name))))
    log = EditLog(
        "weight_channels", value, {key: sorted({int(i) for i in idx}) for key, idx in channels.items()}
    )
    with _restoring([(view, dim, index) for view, index in plan]):
        with torch.no_grad():
            for view, index in plan:
                part = view.index_select(dim, index)
                fill = part.float().mean(dim=1 - dim, keepdim=True) if value == "channel_mean" else 0.0
                view.index_copy_(dim, index, torch.zeros_like(part).add_(fill))
        yield log
