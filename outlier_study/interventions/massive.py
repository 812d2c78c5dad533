"""Replace the massive activations at one tap: the paper's "set MAs to zero / to the mean" ablation.

The edit is done by hooks that return a new tensor (never writing into the model's own tensor), so the
model's weights are never touched and leaving the `with` block restores it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.base import Adapter
from outlier_study.config.options import opt
from outlier_study.config.vocab import MAValue
from outlier_study.errors import ConfigError
from outlier_study.interventions.record import Counted
from outlier_study.interventions.treatment import Inputs, Treatment
from outlier_study.measure.hooks import TensorFn, hook_module
from outlier_study.stats.massive import masked

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch
    from outlier_study.models.loader import LoadedModel


def fill_value(x: torch.Tensor, value: str) -> torch.Tensor:
    """The replacement: 0, or each window's mean of the whole tensor x (MAs included), shaped to broadcast."""
    if value == "zero":
        return x.new_zeros(())
    mean = x.reshape(x.shape[0], -1).mean(dim=1, dtype=torch.float32)
    return mean.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def editable_tap(adapter: Adapter, tap: str, field_name: str) -> str:
    """The canonical name of a tap an intervention can replace, else a ConfigError listing those taps."""
    allowed = adapter.editable_taps()
    try:
        canonical = adapter.canonical(str(tap), field_name)
    except ConfigError as err:
        raise ConfigError(field_name, f"unknown tap '{tap}' for {adapter.family}", allowed) from err
    if canonical not in allowed:
        why = "not a module boundary whose edit flows downstream"
        raise ConfigError(field_name, f"tap '{tap}' ({canonical}) cannot be edited: {why}", allowed)
    return canonical


def _editor(layer: int, value: str, ma_abs: float, ma_ratio: float, log: Counted) -> TensorFn:
    def edit(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        mask = masked(x, ma_abs, ma_ratio)
        count = 0 if mask is None else int(mask.sum())
        log.add(layer, count)
        return torch.where(mask, fill_value(x, value), x) if count else None  # type: ignore[arg-type]

    return edit


@contextmanager
def replace_massive(
    lm: LoadedModel, tap: str, layers: Sequence[int] | None, value: str, ma_abs: float, ma_ratio: float
) -> Iterator[Counted]:
    """Replace every MA (per window, the rule of `ma_mask`) at `tap` of `layers` by 0 or the window mean.

    The hooks are prepended, so measurement hooks on the same module (`tap_hooks`) see the edited tensor
    whichever context was entered first. All input is checked before any hook is installed."""
    adapter = lm.adapter
    canonical = editable_tap(adapter, tap, "intervention.tap")
    chosen = lm.arch.layers(layers, "intervention.layers")
    spec = adapter.taps[canonical]
    log = Counted(
        name="massive", value=str(value), layers=chosen, tap=canonical, changed=dict.fromkeys(chosen, 0)
    )
    blocks = adapter.blocks(lm.model)
    with ExitStack() as stack:
        for layer in chosen:
            module = adapter.module(blocks[layer], spec.module)
            edit = _editor(layer, str(value), ma_abs, ma_ratio, log)
            stack.callback(hook_module(module, spec.io, edit, prepend=True).remove)
        yield log


@dataclass
class MassiveOptions:
    name: str = opt(
        "massive", "replace every element that meets the MA rule (threshold.ma_abs, ma_ratio) at one tap"
    )
    tap: str = opt(
        "mlp.hidden", "canonical tap or paper alias (y6 = mlp.hidden, y7 = mlp.out, x1 = resid.pre, ...)"
    )
    value: MAValue = opt(MAValue.mean, "zero | mean: the mean of that window's whole tensor at the tap")
    layers: list[int] | None = opt(None, "layers (from 0, negative from the end); null: all", min_items=1)


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    editable_tap(arch.adapter, options.tap, "intervention.tap")
    arch.layers(options.layers, "intervention.layers")


@contextmanager
def _apply(inputs: Inputs) -> Iterator[Counted]:
    o, th = inputs.options, inputs.threshold
    with replace_massive(inputs.lm, o.tap, o.layers, o.value, float(th.ma_abs), float(th.ma_ratio)) as log:
        yield log


TREATMENT = Treatment(
    _apply, MassiveOptions, "massive activations at one tap replaced by zero or the mean", _check
)
