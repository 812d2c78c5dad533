"""Remove the MAs carried by the residual connections, so each layer's output keeps only the MAs its own
sublayers generated (the paper's "only TMA left", Fig. 4/5 right).

Every decoder layer computes its output from x and its branches in one order of additions
(`Adapter.residual_sum`: (x + attn) + mlp for sequential layers, x + (attn + mlp) for some parallel
ones; scaled adds, a later per-layer-input branch and an output scale where a family has them). The
intervention keeps the sublayers' view of x and swaps x's MA elements for a fill on the residual path
only: at those positions the output becomes residual_sum(fill, branches).
Rebuilding it from the captured branch outputs, in the model's own order of additions, gives exactly
the bits a model with an edited residual copy would produce; subtracting (x − fill) from the output
would not (at |x| ~ 1e4 a bf16 sum has already rounded the branches away).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.config.options import opt
from outlier_study.config.vocab import MAValue
from outlier_study.interventions.record import Counted
from outlier_study.interventions.treatment import Inputs, Treatment
from outlier_study.measure.hooks import TensorFn, hook_module
from outlier_study.stats.massive import fill_value, masked

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch
    from outlier_study.models.loader import LoadedModel


@dataclass
class _Pending:
    """One layer's in-flight state between its pre-hook and post-hook; dropped at the post-hook."""

    x: torch.Tensor
    mask: torch.Tensor
    fill: torch.Tensor
    count: int
    branches: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def remove_residual_mas(
    lm: LoadedModel, layers: Sequence[int] | None, value: str, ma_abs: float, ma_ratio: float
) -> Iterator[Counted]:
    """At each layer in `layers`, replace the MAs of the layer input on the residual path by 0 or the window
    mean of that input; the attention and MLP sublayers still see the original input."""
    value = str(value)
    chosen = lm.arch.layers(layers, "intervention.layers")
    adapter = lm.adapter
    names = adapter.residual_branches()

    def branch_specs(layer: int) -> dict[str, Any]:
        """Where the branch taps of `layer` are (a MoE layer's MLP branch is its sparse block)."""
        specs = {t: adapter.tap_spec(layer, t) for t in names}
        for spec in specs.values():
            if spec.io != "output" or spec.derive is not None:
                raise RuntimeError(f"{adapter.family}: branch tap at {spec.module} is not a module output")
        return specs

    log = Counted(name="residual", value=value, layers=chosen, changed=dict.fromkeys(chosen, 0))
    pending: dict[int, _Pending] = {}

    def before(layer: int) -> TensorFn:
        def hook(module: nn.Module, x: torch.Tensor) -> None:
            pending.pop(layer, None)  # a stale entry from a forward that raised midway
            mask = masked(x, ma_abs, ma_ratio)
            count = 0 if mask is None else int(mask.sum())
            if mask is not None and count:
                pending[layer] = _Pending(x=x, mask=mask, fill=fill_value(x, value), count=count)

        return hook

    def branch(layer: int, name: str) -> TensorFn:
        def hook(module: nn.Module, y: torch.Tensor) -> None:
            state = pending.get(layer)
            if state is not None:
                state.branches[name] = y.clone()  # Falcon adds attention into the MLP output in place

        return hook

    def after(layer: int) -> TensorFn:
        def hook(module: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
            state = pending.pop(layer, None)
            if state is None:
                return None
            if set(state.branches) != set(names):
                raise RuntimeError(f"layer {layer}: sublayer outputs not seen ({sorted(state.branches)})")
            branches = [state.branches[t] for t in names]
            scale = adapter.output_scale_of(module)
            mask = state.mask
            # Guard the premise where it matters; fails e.g. with dropout in train mode.
            if not torch.equal(adapter.residual_sum(layer, state.x, branches, scale)[mask], y[mask]):
                raise RuntimeError(
                    f"layer {layer}: output is not its input plus its branches ({', '.join(names)}); "
                    "the residual intervention cannot be applied exactly (is the model in eval mode?)"
                )
            log.add(layer, state.count)
            return torch.where(mask, adapter.residual_sum(layer, state.fill, branches, scale), y)

        return hook

    blocks = adapter.blocks(lm.model)
    with ExitStack() as stack:
        stack.callback(pending.clear)
        for layer in chosen:
            block = blocks[layer]
            handles = [
                hook_module(block, "input", before(layer), prepend=True),
                # appended: they capture what really enters the residual add, after any other editing hook
                *(
                    hook_module(adapter.module(block, spec.module), "output", branch(layer, name))
                    for name, spec in branch_specs(layer).items()
                ),
                # prepended: measurement hooks on the layer output (resid.post) see the edited output
                hook_module(block, "output", after(layer), prepend=True),
            ]
            for handle in handles:
                stack.callback(handle.remove)
        yield log


@dataclass
class ResidualOptions:
    name: str = opt(
        "residual", "remove the MAs carried by the residual connections (the paper's 'only TMA left')"
    )
    value: MAValue = opt(MAValue.zero, "zero | mean: what the carried MA elements are replaced with")
    layers: list[int] | None = opt(None, "layers (from 0, negative from the end); null: all", min_items=1)


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    arch.layers(options.layers, "intervention.layers")


@contextmanager
def _apply(inputs: Inputs) -> Iterator[Counted]:
    o, th = inputs.options, inputs.threshold
    with remove_residual_mas(inputs.lm, o.layers, o.value, float(th.ma_abs), float(th.ma_ratio)) as log:
        yield log


TREATMENT = Treatment(
    _apply,
    ResidualOptions,
    "MAs carried by the residual stream removed; each layer keeps its own TMAs",
    _check,
    layerwise=True,  # its hooks compare a layer's input with its output: both inside the resident layer
)
