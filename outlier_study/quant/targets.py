"""What a weight quantizer rounds: every decoder linear's weight (GPT-2's `Conv1D` and the shared experts'
included, MoE routers not: `Adapter.linears`) and every fused routed-experts parameter (`Adapter.experts`:
`gate_up_proj` or `up_proj`, and `down_proj`, one (out, in) slice per expert).

Both are one kind of thing here: a parameter with an (..., out, in) view whose rows are output channels, so
one scale per row (or per group of input columns) is per output channel of every expert too, and RTN and
GPTQ need no case for experts beyond running each expert's slice on its own Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from outlier_study.adapters.experts import MoESpec, expert_params

if TYPE_CHECKING:
    from outlier_study.adapters.base import Adapter


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One quantized parameter: a linear's weight, or a fused experts parameter (`experts` set)."""

    layer: int
    path: str  # inside the decoder layer: the linear's path, or the experts module's path + "." + parameter
    param: nn.Parameter
    transposed: bool  # stored with the input dimension before the output one (Conv1D, some experts)
    experts: MoESpec | None = None  # the layout of the routed experts this parameter holds

    def out_in(self) -> torch.Tensor:
        """(out, in), or (E, out, in) for experts: a view of the parameter."""
        return self.param.transpose(-1, -2) if self.transposed else self.param

    def storage(self, w_out_in: torch.Tensor) -> torch.Tensor:
        """An `out_in`-shaped tensor in the parameter's own orientation."""
        return w_out_in.transpose(-1, -2) if self.transposed else w_out_in


def quant_weights(adapter: Adapter, model: nn.Module) -> list[QuantWeight]:
    """Every quantized parameter of the decoder, layer by layer: its linears in module order, then its
    routed experts (up, then down)."""
    out = [
        QuantWeight(layer, path, module.weight, not isinstance(module, nn.Linear))
        for layer, path, module in adapter.linears(model)
    ]
    for layer, path, module, spec in adapter.experts(model):
        out.extend(
            QuantWeight(layer, f"{path}.{name}", getattr(module, name), spec.is_transposed, spec)
            for name in expert_params(spec)
        )
    return sorted(out, key=lambda t: t.layer)
