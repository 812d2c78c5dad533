"""Super weights kept in full precision while everything else is quantized (Yu et al., 2024).

Each kept W[i, j] is set to zero for the block, so the weight quantizer that runs inside it sees a zero
there (a zero never widens a scale and quantizes to zero exactly): the rest of row i (or of its group) gets
the scale it would have without the outlier. A forward hook on the down projection adds W[i, j]·x_j back to
output i in full precision. With `keep_activations`, a pre-hook that runs before the activation quantizer
(it is prepended) also takes the MAs of input channel j, the y6 spike the super weight reads, out of the
linear's input, and the forward hook adds them back through column j of the weight as the linear holds it.
Unquantized, both are the same linear map up to rounding; on exit the weight comes back bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.linears import weight_out_in
from outlier_study.detect.superweight import SuperWeight
from outlier_study.interventions.edits import reversible
from outlier_study.interventions.record import Transformed
from outlier_study.stats.massive import masked

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel


class _Kept:
    """The hooks of one layer's down projection, keeping W[row, col] (and the MAs of input col)."""

    def __init__(self, row: int, col: int, weight: torch.Tensor, ma_rule: tuple[float, float]) -> None:
        self.row, self.col, self.weight, self.ma_rule = row, col, weight, ma_rule
        self.rows = torch.tensor([row])
        self._held: torch.Tensor | None = None  # the MAs `take` removed from this call's input

    def take(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        mask = masked(x, *self.ma_rule)
        self._held = None
        if mask is None or not bool(mask[..., self.col].any()):
            return None
        keep, xj = mask[..., self.col], x[..., self.col]
        self._held = torch.where(keep, xj, torch.zeros((), dtype=x.dtype, device=x.device))
        x = x.clone()
        x[..., self.col] = torch.where(keep, torch.zeros((), dtype=x.dtype, device=x.device), xj)
        return (x, *args[1:])

    def add_back(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        xj = args[0][..., self.col]  # what the linear read: quantized, without the held MAs
        if self._held is not None:
            xj = xj + self._held
        w = self.weight.to(output.device, output.dtype)
        out = output.index_add(-1, self.rows.to(output.device), (xj * w).unsqueeze(-1))
        if self._held is not None:
            column = weight_out_in(module)[:, self.col].to(output.dtype)  # (out,), W[row, col] is zero here
            out = out + self._held.unsqueeze(-1) * column
            self._held = None
        return out


@contextmanager
def keep_super_weights(
    lm: LoadedModel,
    weights: Sequence[SuperWeight],
    keep_activations: bool,
    ma_rule: tuple[float, float],
) -> Iterator[Transformed]:
    """Keep `weights` (at most one per layer, as detected) in full precision for the block."""
    adapter, blocks = lm.adapter, lm.adapter.blocks(lm.model)
    with reversible() as edits, ExitStack() as stack:
        for sw in weights:
            block = blocks[sw.layer]
            view = adapter.weight_view(block, "down")
            line, index = view[sw.row], torch.tensor([sw.col])
            hooks = _Kept(sw.row, sw.col, line.detach()[sw.col].clone(), ma_rule)
            edits.set_entries(line, 0, index, torch.zeros(1, dtype=view.dtype))
            module = adapter.module(block, adapter.down)
            if keep_activations:
                stack.callback(module.register_forward_pre_hook(hooks.take, prepend=True).remove)
            stack.callback(module.register_forward_hook(hooks.add_back).remove)
        yield Transformed(
            {
                "method.super_weights": " ".join(f"{sw.layer}:{sw.row},{sw.col}" for sw in weights) or "none",
                "method.keep_activations": keep_activations,
            },
            total=len(weights),
        )
