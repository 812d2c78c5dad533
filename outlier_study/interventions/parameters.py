"""Edits of weight entries (γ entries, weight rows or columns), undone bit-exactly on exit.

Everything is validated and every new value computed before the first write; the touched entries are
saved by `Edits.set_entries` and copied back in `finally`, so an exception inside the block still restores
the model. A layerwise model (`execution=layerwise`) is validated on its weightless layers and edited in
each layer as it is read, from that layer's own weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

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


# One edit of some entries, computed from its layer's own weights: (view, dim, index, new values).
Entry = tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]
T = TypeVar("T")


@contextmanager
def edited(
    lm: LoadedModel, items: Iterable[tuple[int, T]], plan: Callable[[nn.Module, T], Entry]
) -> Iterator[None]:
    """Each item's entries, (layer, item), set to `plan(the layer's module, item)` for the `with` body.

    In memory every plan is made before the first write (bad input writes nothing) and the entries come
    back on exit. A layerwise model holds no layer weights: the plans are made on the weightless layers
    first (shapes only, so the same checks fail before anything runs), then made again from the real
    weights and written into each layer as it is read (`LayerStore.editing`); a layer read again starts
    from the checkpoint, so nothing is left to restore."""
    blocks = lm.adapter.blocks(lm.model)
    items = list(items)
    plans = [plan(blocks[layer], item) for layer, item in items]
    if lm.store is None:
        with reversible() as edits:
            for view, dim, index, new in plans:
                edits.set_entries(view, dim, index, new)
            yield
        return
    by_layer: dict[int, list[T]] = defaultdict(list)
    for layer, item in items:
        by_layer[layer].append(item)

    def write(layer: int, block: nn.Module) -> None:
        for item in by_layer.get(layer, ()):
            view, dim, index, new = plan(block, item)
            view.index_copy_(dim, index, new.to(view.dtype))

    with lm.store.editing(write):
        yield


@contextmanager
def edit_gamma(lm: LoadedModel, channels: Mapping[Key, Sequence[int]], value: str) -> Iterator[Edited]:
    """Set γ entries (layer, norm) -> channels to the mean of that γ over all channels, or to zero.

    For Gemma3 γ = 1 + weight, so the weight is set to (target − 1)."""
    adapter = lm.adapter
    for _, norm in channels:
        adapter.norm_names(norm, "intervention.norm")

    def plan(block: nn.Module, key: Key) -> Entry:
        w = adapter.gamma(block, key[1])
        index = _index(channels[key], w.shape[0], key)
        target = (
            (w.float() + adapter.gamma_offset).mean()
            if value == "mean"
            else w.new_zeros((), dtype=torch.float32)
        )
        fill = (target - adapter.gamma_offset).to(w.dtype).expand(1, index.numel())
        return w.unsqueeze(0), 1, index, fill

    with edited(lm, [(key[0], key) for key in channels], plan):
        yield _record("gamma", value, channels)


@contextmanager
def edit_weight_channels(
    lm: LoadedModel, channels: Mapping[Key, Sequence[int]], axis: str, value: str
) -> Iterator[Edited]:
    """Set channels of weights, (layer, name) -> indices along `axis` of the (out, in) view, to each
    channel's own mean (a row mean for axis "out") or to zero. Biases are left alone."""
    dim = AXES.index(str(axis))
    adapter = lm.adapter
    for _, name in channels:
        adapter.weight_name(name, "intervention.matrices")

    def plan(block: nn.Module, key: Key) -> Entry:
        view = adapter.weight_view(block, key[1])
        index = _index(channels[key], view.shape[dim], key)
        part = view.detach().index_select(dim, index)
        fill = part.float().mean(dim=1 - dim, keepdim=True) if value == "channel_mean" else 0.0
        return view, dim, index, torch.zeros_like(part).add_(fill)

    with edited(lm, [(key[0], key) for key in channels], plan):
        yield _record("weight_channels", value, channels)
