"""Remove the MAs carried by the residual connections, so each layer's output keeps only the MAs its own
sublayers generated (the paper's "only TMA left", Fig. 4/5 right).

Every supported decoder layer computes out = (x + attn_branch) + mlp_branch, with both sublayers reading
the original x. The intervention keeps the sublayers' view of x and swaps x's MA elements for a fill on the
residual path only: at those positions the output becomes (fill + attn_branch) + mlp_branch. Rebuilding it
from the captured branch outputs, in the model's own order of additions, gives exactly the bits a model
with an edited residual copy would produce; subtracting (x − fill) from the output would not (at |x| ~ 1e4
a bf16 sum has already rounded the branches away).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.base import TapSpec
from outlier_study.interventions.massive import (
    InterventionLog,
    check_layers,
    check_threshold,
    check_value,
    fill_value,
    masked,
)

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel


@dataclass
class _Pending:
    """One layer's in-flight state between its pre-hook and post-hook; dropped at the post-hook."""

    x: torch.Tensor
    mask: torch.Tensor
    fill: torch.Tensor
    count: int
    branches: dict[str, torch.Tensor] = field(default_factory=dict)


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def remove_residual_mas(
    lm: LoadedModel, layers: list[int] | None, value: str, ma_abs: float, ma_ratio: float
) -> Iterator[InterventionLog]:
    """At each layer in `layers`, replace the MAs of the layer input on the residual path by 0 or the window
    mean of that input; the attention and MLP sublayers still see the original input."""
    value = check_value(value)
    chosen = check_layers(lm, layers)
    check_threshold(ma_abs, ma_ratio)
    adapter = lm.adapter
    branch_specs: dict[str, TapSpec] = {}
    for name, tap in zip(("attn", "mlp"), adapter.residual_branches(), strict=True):
        spec = adapter.taps[tap]
        if spec.io != "output" or spec.derive is not None:
            raise RuntimeError(f"{adapter.family}: branch tap {tap} is not a module output")
        branch_specs[name] = spec
    log = InterventionLog(name="residual", value=value, layers=chosen, changed=dict.fromkeys(chosen, 0))
    pending: dict[int, _Pending] = {}

    def before(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            pending.pop(layer, None)  # a stale entry from a forward that raised midway
            x = _layer_input(args, kwargs)
            mask = masked(x, ma_abs, ma_ratio)
            count = 0 if mask is None else int(mask.sum())
            if mask is not None and count:
                pending[layer] = _Pending(x=x, mask=mask, fill=fill_value(x, value), count=count)

        return hook

    def branch(layer: int, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            state = pending.get(layer)
            if state is not None:
                state.branches[name] = output if isinstance(output, torch.Tensor) else output[0]

        return hook

    def after(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            state = pending.pop(layer, None)
            if state is None:
                return None
            y = output if isinstance(output, torch.Tensor) else output[0]
            if set(state.branches) != set(branch_specs):
                raise RuntimeError(f"layer {layer}: sublayer outputs not seen ({sorted(state.branches)})")
            a, m = state.branches["attn"], state.branches["mlp"]
            mask = state.mask
            # Guard the premise out = (x + a) + m where it matters; fails e.g. with dropout in train mode.
            if not torch.equal(((state.x + a) + m)[mask], y[mask]):
                raise RuntimeError(
                    f"layer {layer}: output is not (input + attention branch) + MLP branch; "
                    "the residual intervention cannot be applied exactly (is the model in eval mode?)"
                )
            new = torch.where(mask, (state.fill + a) + m, y)
            log.add(layer, state.count)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        return hook

    blocks = adapter.layers(lm.model)
    with ExitStack() as stack:
        stack.callback(pending.clear)
        for layer in chosen:
            block = blocks[layer]
            handles = [
                block.register_forward_pre_hook(before(layer), with_kwargs=True, prepend=True),
                # appended: they capture what really enters the residual add, after any other editing hook
                *(
                    block.get_submodule(spec.module).register_forward_hook(branch(layer, name))
                    for name, spec in branch_specs.items()
                ),
                # prepended: measurement hooks on the layer output (resid.post) see the edited output
                block.register_forward_hook(after(layer), prepend=True),
            ]
            for handle in handles:
                stack.callback(handle.remove)
        yield log
