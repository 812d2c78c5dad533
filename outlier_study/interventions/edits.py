"""Reversible weight edits: every method and fake quantization swaps tensors in and puts the originals back.

A parameter's `.data` is replaced by a new tensor and the original tensor object is kept untouched, so the
restore is bit-exact by construction (no copy, no arithmetic) and costs no time. Module attributes (e.g. an
untied lm_head) are swapped the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Edits:
    """Records the first original of everything it replaces; `restore` puts them back in reverse order."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._attrs: list[tuple[nn.Module, str, Any]] = []

    def set_data(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Give `param` new values (same shape); the original tensor object is kept for the restore."""
        if value.shape != param.shape:
            raise ValueError(
                f"shape {tuple(value.shape)} does not match the parameter's {tuple(param.shape)}"
            )
        self._data.setdefault(id(param), (param, param.data))
        param.data = value.detach().to(dtype=param.dtype, device=param.device).contiguous()

    def set_attr(self, module: nn.Module, name: str, value: Any) -> None:
        """Replace a module attribute (e.g. a Parameter, to untie a shared weight) for the block."""
        self._attrs.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def restore(self) -> None:
        for module, name, original in reversed(self._attrs):
            setattr(module, name, original)
        for param, original in reversed(list(self._data.values())):
            param.data = original
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
