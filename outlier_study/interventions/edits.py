"""Reversible edits of a model's parameters: everything an intervention or method changes comes back
bit-exactly when its block exits, also when the block raises.

Two kinds of edit, one restore: `set_data` swaps in a new tensor and keeps the original tensor object (a
whole-matrix transform: no copy, no arithmetic on the way back); `set_entries` writes a few rows or columns
in place and saves only those entries (editing q/k/v rows of every layer of an 8B model must not double its
memory). Module attributes (e.g. an untied lm_head) are swapped like tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Edits:
    """Records the first original of everything it changes; `restore` puts them back in reverse order."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._attrs: list[tuple[nn.Module, str, Any]] = []
        self._entries: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def set_data(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Give `param` new values (same shape); the original tensor object is kept for the restore."""
        if value.shape != param.shape:
            raise ValueError(
                f"shape {tuple(value.shape)} does not match the parameter's {tuple(param.shape)}"
            )
        self._data.setdefault(id(param), (param, param.data))
        param.data = value.detach().to(dtype=param.dtype, device=param.device).contiguous()

    def set_entries(self, view: torch.Tensor, dim: int, index: torch.Tensor, value: torch.Tensor) -> None:
        """view.index_copy_(dim, index, value) in place, after saving the entries it overwrites."""
        self._entries.append((view, dim, index, view.detach().index_select(dim, index).clone()))
        with torch.no_grad():
            view.index_copy_(dim, index, value.to(view.dtype))

    def set_attr(self, module: nn.Module, name: str, value: Any) -> None:
        """Replace a module attribute (e.g. a Parameter, to untie a shared weight) for the block."""
        self._attrs.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def restore(self) -> None:
        with torch.no_grad():
            for view, dim, index, saved in reversed(self._entries):
                view.index_copy_(dim, index, saved)
        for module, name, original in reversed(self._attrs):
            setattr(module, name, original)
        for param, original in reversed(list(self._data.values())):
            param.data = original
        self._entries.clear()
        self._attrs.clear()
        self._data.clear()


@contextmanager
def reversible() -> Iterator[Edits]:
    """An `Edits` whose changes are undone when the block exits, also when it raises."""
    edits = Edits()
    try:
        yield edits
    finally:
        edits.restore()
