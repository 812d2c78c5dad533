"""Routed experts under quantization: their activations quantized, and GPTQ's Hessians per expert, reached
through transformers' experts interface (the mechanism of `measure/experts/routed.py`).

transformers 5 runs a MoE layer's routed experts as one module over fused 3-D parameters, dispatched to
the experts implementation the config names; no per-expert `nn.Linear` exists to hook. Two tensors are
read by expert matrices:
- the experts module's input (each token before routing; every expert's gate/up reads its routed rows):
  a pre-hook on the module quantizes it, one scale per token, or per sequence;
- what an expert's down projection reads (act(gate)·up of its routed tokens), which exists only inside
  the implementation: the routed mechanism recomputes it for every expert hit, and the quantizer moves
  the layer's output on those rows by w·(down(Q(h)) − down(h)), one scale per routed token, or per
  sequence over the tokens it routed to that expert.
GPTQ's Hessians come from the same recomputation: per expert, the inputs of the tokens routed to it and
their hidden activations, with the layer in full precision as for its linears.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.experts import expert_params
from outlier_study.measure.experts.routed import (
    CAPTURES,
    EDITS,
    Routed,
    Site,
    activate,
    shape_hook,
    sites_of,
    watch,
)
from outlier_study.quant.layerwise import Grams

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

RowQuantizer = Callable[..., torch.Tensor]  # q(x (n, C), window=(n,) or None): fake-quantized rows


def _windows(site: Site, tokens: torch.Tensor) -> torch.Tensor:
    """The sequence (window) of each flat token row, from the decoder layer's (B, T)."""
    return torch.div(tokens, site.shape[1], rounding_mode="floor")


@dataclass
class _Hidden:
    """A routed-mechanism user: every hit expert's down_proj input, quantized."""

    quantize: RowQuantizer
    per_window: bool
    sites: dict[int, Site] = field(default_factory=dict)

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
        for e in routed.hit:
            tok = routed.rows(e)[0]
            hidden = quantized_hidden(site, routed, e, self.quantize, self.per_window)
            delta = routed.replace_hidden(e, hidden)
            out = routed.add_rows(out, e, torch.arange(tok.shape[0], device=tok.device), delta)
        return out


def quantized_input(site: Site, x: torch.Tensor, quantize: RowQuantizer, per_window: bool) -> torch.Tensor:
    """The experts module's input (..., H) as its matrices read it under quantization: per token row, or per
    sequence of the decoder layer's (B, T)."""
    rows = x.reshape(-1, x.shape[-1])
    window = _windows(site, torch.arange(rows.shape[0], device=x.device)) if per_window else None
    return quantize(rows, window=window).reshape(x.shape)


def quantized_hidden(
    site: Site, routed: Routed, e: int, quantize: RowQuantizer, per_window: bool
) -> torch.Tensor:
    """Expert e's down_proj input on its routed tokens, quantized per row or per sequence of those tokens."""
    window = _windows(site, routed.rows(e)[0]) if per_window else None
    return quantize(routed.taps(e)["mlp.hidden"], window=window)


def _input_hook(site: Site, quantize: RowQuantizer, per_window: bool) -> Callable[..., Any]:
    """Pre-hook of the experts module: its token rows (the first argument) quantized."""

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        q = quantized_input(site, x, quantize, per_window)
        return ((q, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": q})

    return pre


@contextmanager
def expert_activations(lm: LoadedModel, quantize: RowQuantizer, per_window: bool) -> Iterator[None]:
    """Quantize what every routed expert's matrices read, for the block (nothing on a dense model). An edit
    of the routed mechanism, registered after any method's edit, so it quantizes what the method left."""
    specs = lm.adapter.moe
    blocks = lm.adapter.blocks(lm.model)
    user = _Hidden(quantize, per_window)
    with ExitStack() as stack:
        for block, site in sites_of(specs, blocks):
            stack.callback(block.register_forward_pre_hook(shape_hook(site), with_kwargs=True).remove)
            hook = _input_hook(site, quantize, per_window)
            stack.callback(site.experts.register_forward_pre_hook(hook, with_kwargs=True).remove)
            watch(stack, block, site, user)
        activate(stack, lm.model, user, EDITS)
        yield


@dataclass
class ExpertHessians:
    """A routed-mechanism user: per (experts parameter, expert), Σ xᵀx of what that expert's slice read."""

    grams: Grams = field(default_factory=Grams)
    sites: dict[int, Site] = field(default_factory=dict)

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
        up, down = expert_params(site.spec)
        for e in routed.hit:
            self.grams.add((getattr(site.experts, up), e), routed.inputs(e))
            self.grams.add((getattr(site.experts, down), e), routed.taps(e)["mlp.hidden"])
        return out

    def hessian(self, param: nn.Parameter, expert: int) -> torch.Tensor | None:
        """H = 2 XᵀX / n of expert `expert`'s slice of `param`; None: no token was routed to it."""
        key = (param, expert)
        return self.grams.hessian(key) if key in self.grams else None


@contextmanager
def expert_hessians(lm: LoadedModel, layer: int) -> Iterator[ExpertHessians]:
    """Accumulate the per-expert Hessians of decoder layer `layer`'s routed experts while the block runs
    (an empty log for a dense layer)."""
    log = ExpertHessians()
    specs = {layer: lm.adapter.moe[layer]} if layer in lm.adapter.moe else {}
    with ExitStack() as stack:
        for block, site in sites_of(specs, lm.adapter.blocks(lm.model)):
            watch(stack, block, site, log)
        activate(stack, lm.model, log, CAPTURES)
        yield log
