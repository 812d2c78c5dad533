"""Edits of weight entries (γ entries, weight rows or columns), undone bit-exactly on exit.

Everything is validated and every new value computed before the first write; the touched entries are
saved by `Edits.set_entries` and copied back in `finally`, so an exception inside the block still restores
the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from outlier_study.errors import ConfigError
from outlier_study.interventions.edits import reversible
from outlier_study.interventions.record import Edited

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

Key = tuple[int, str]  # (layer, norm key or weight name)
AXES: tuple[str, ...] = ("out", "in")


def _index(idx: Sequence[int], size: int, key: Key) -> torch.Tensor:
    index = torch.as_tensor(sorted({int(i) for i in idx}), dtype=torch.long)
    if index.numel() and not (0 <= int(index[0]) and int(index[-1]) < size):
        raise ConfigError(
            "intervention.channels", f"channel out of range for {key}", allowed=[f"0..{size - 1}"]
        )
    return index


def _record(name: str, value: str, channels: Mapping[Key, Sequence[int]]) -> Edited:
    return Edited(name, str(value), {key: sorted({int(i) for i in idx}) for key, idx in channels.items()})


@contextmanager
def edit_gamma(lm: LoadedModel, channels: Mapping[Key, Sequence[int]], value: str) -> Iterator[Edited]:
    """Set γ entries (layer, norm) -> channels to the mean of that γ over all channels, or to zero.

    For Gemma3 γ = 1 + weight, so the weight is set to (target − 1)."""
    adapter, blocks = lm.adapter, lm.adapter.blocks(lm.model)
    plan = []
    for (layer, norm), idx in channels.items():
        adapter.norm_names(norm, "intervention.norm")
        w = adapter.gamma(blocks[layer], norm)
        index = _index(idx, w.shape[0], (layer, norm))
        target = (
            (w.float() + adapter.gamma_offset).mean()
            if value == "mean"
            else w.new_zeros((), dtype=torch.float32)
        )
        fill = (target - adapter.gamma_offset).to(w.dtype).expand(1, index.numel())
        plan.append((w.unsqueeze(0), index, fill))
    with reversible() as edits:
        for view, index, fill in plan:
            edits.set_entries(view, 1, index, fill)
        yield _record("gamma", value, channels)


@contextmanager
def edit_weight_channels(
    lm: LoadedModel, channels: Mapping[Key, Sequence[int]], axis: str, value: str
) -> Iterator[Edited]:
    """Set channels of weights, (layer, name) -> indices along `axis` of the (out, in) view, to each
    channel's own mean (a row mean for axis "out") or to zero. Biases are left alone."""
    dim = AXES.index(str(axis))
    adapter, blocks = lm.adapter, lm.adapter.blocks(lm.model)
    plan = []
    for (layer, name), idx in channels.items():
        adapter.weight_name(name, "intervention.matrices")
        view = adapter.weight_view(blocks[layer], name)
        index = _index(idx, view.shape[dim], (layer, name))
        part = view.detach().index_select(dim, index)
        fill = part.float().mean(dim=1 - dim, keepdim=True) if value == "channel_mean" else 0.0
        plan.append((view, index, torch.zeros_like(part).add_(fill)))
    with reversible() as edits:
        for view, index, new in plan:
            edits.set_entries(view, dim, index, new)
        yield _record("weight_channels", value, channels)
