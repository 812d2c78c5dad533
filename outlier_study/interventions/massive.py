"""Replace the massive activations at one tap: the paper's "set MAs to zero / to the mean" ablation.

The edit is done by hooks that return a new tensor (never writing into the model's own tensor), so the
model's weights are never touched and leaving the `with` block restores it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters import resolve_layers
from outlier_study.adapters.base import ATTENTION_TAPS, Adapter
from outlier_study.errors import ConfigError
from outlier_study.stats.massive import ma_mask, may_hold_ma

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

VALUES: tuple[str, ...] = ("zero", "mean")
# Not module boundaries whose edit reaches everything downstream: resid.mid is only the input of the MLP
# norm (the residual add keeps its own copy), derived taps are views computed from a larger tensor.
_NOT_EDITABLE: frozenset[str] = frozenset({"resid.mid"}) | ATTENTION_TAPS


@dataclass
class InterventionLog:
    """How many elements an intervention replaced, per layer (summed over every forward pass).

    Only counts: a log must stay tiny however many windows run through the model."""

    name: str
    value: str
    layers: list[int]
    tap: str | None = None
    changed: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.changed.values())

    def add(self, layer: int, count: int) -> None:
        self.changed[layer] = self.changed.get(layer, 0) + count

    def summary(self) -> dict[str, Any]:
        """Flat scalars for metrics.json / the tracker."""
        out: dict[str, Any] = {"intervention.name": self.name, "intervention.value": self.value}
        if self.tap is not None:
            out["intervention.tap"] = self.tap
        out["intervention.changed_total"] = self.total
        out.update({f"intervention.changed.layer{k}": v for k, v in sorted(self.changed.items())})
        return out


def check_value(value: Any) -> str:
    """'zero' or 'mean' (enum or string), else a ConfigError naming intervention.value."""
    value = str(value)
    if value not in VALUES:
        raise ConfigError("intervention.value", f"unknown value '{value}'", allowed=VALUES)
    return str(value)


def check_layers(lm: LoadedModel, layers: list[int] | None) -> list[int]:
    """Layer indices from 0 (None = all); an empty or out-of-range list is a config error."""
    if layers is not None and len(layers) == 0:
        raise ConfigError(
            "intervention.layers", "empty layer list", allowed=[f"0..{lm.n_layers - 1}", "null"]
        )
    return resolve_layers(lm.n_layers, None if layers is None else list(layers), "intervention.layers")


def check_threshold(ma_abs: float, ma_ratio: float) -> None:
    """A negative bound would turn every element into an 'MA'; refuse it rather than zero the model."""
    if not ma_abs >= 0:
        raise ConfigError("threshold.ma_abs", f"must be >= 0, got {ma_abs}")
    if not ma_ratio >= 0:
        raise ConfigError("threshold.ma_ratio", f"must be >= 0, got {ma_ratio}")


def fill_value(x: torch.Tensor, value: str) -> torch.Tensor:
    """The replacement: 0, or each window's mean of the whole tensor x (MAs included), shaped to broadcast."""
    if value == "zero":
        return x.new_zeros(())
    mean = x.reshape(x.shape[0], -1).mean(dim=1, dtype=torch.float32)
    return mean.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def editable_taps(adapter: Adapter) -> list[str]:
    """Taps whose tensor is a whole module input/output that flows on unchanged: the ones we can edit."""
    return [t for t in adapter.available() if t not in _NOT_EDITABLE and adapter.taps[t].derive is None]


def _resolve_tap(adapter: Adapter, tap: str) -> str:
    allowed = editable_taps(adapter)
    try:
        canonical = adapter.canonical(str(tap))
    except ConfigError as err:
        raise ConfigError("intervention.tap", f"unknown tap '{tap}' for {adapter.family}", allowed) from err
    if canonical not in allowed:
        why = "not a module boundary whose edit flows downstream"
        raise ConfigError("intervention.tap", f"tap '{tap}' ({canonical}) cannot be edited: {why}", allowed)
    return canonical


def masked(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> torch.Tensor | None:
    """The MA mask of x, or None when no element can be one: one min/max reduction instead of a median
    per window on every hooked tensor of every forward pass, since most hold no MA at all."""
    return ma_mask(x, ma_abs, ma_ratio) if may_hold_ma(x, ma_abs) else None


def _replace(x: torch.Tensor, value: str, ma_abs: float, ma_ratio: float) -> tuple[torch.Tensor | None, int]:
    """A new tensor with the MAs of x replaced (None when there are none) and how many were replaced."""
    mask = masked(x, ma_abs, ma_ratio)
    if mask is None:
        return None, 0
    count = int(mask.sum())
    if count == 0:
        return None, 0
    return torch.where(mask, fill_value(x, value), x), count


def _input_editor(
    layer: int, value: str, ma_abs: float, ma_ratio: float, log: InterventionLog
) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        new, count = _replace(x, value, ma_abs, ma_ratio)
        log.add(layer, count)
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return hook


def _output_editor(
    layer: int, value: str, ma_abs: float, ma_ratio: float, log: InterventionLog
) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        y = output if isinstance(output, torch.Tensor) else output[0]
        new, count = _replace(y, value, ma_abs, ma_ratio)
        log.add(layer, count)
        if new is None:
            return None
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    return hook


@contextmanager
def replace_massive(
    lm: LoadedModel, tap: str, layers: list[int] | None, value: str, ma_abs: float, ma_ratio: float
) -> Iterator[InterventionLog]:
    """Replace every MA (per window, the rule of `ma_mask`) at `tap` of `layers` by 0 or the window mean.

    The hooks are prepended, so measurement hooks on the same module (`tap_hooks`) see the edited tensor
    whichever context was entered first. All input is checked before any hook is installed."""
    adapter = lm.adapter
    canonical = _resolve_tap(adapter, tap)
    value = check_value(value)
    chosen = check_layers(lm, layers)
    check_threshold(ma_abs, ma_ratio)
    spec = adapter.taps[canonical]
    log = InterventionLog(
        name="massive", value=value, layers=chosen, tap=canonical, changed=dict.fromkeys(chosen, 0)
    )
    blocks = adapter.layers(lm.model)
    with ExitStack() as stack:
        for layer in chosen:
            module = blocks[layer].get_submodule(spec.module) if spec.module else blocks[layer]
            if spec.io == "input":
                handle = module.register_forward_pre_hook(
                    _input_editor(layer, value, ma_abs, ma_ratio, log), with_kwargs=True, prepend=True
                )
            else:
                handle = module.register_forward_hook(
                    _output_editor(layer, value, ma_abs, ma_ratio, log), prepend=True
                )
            stack.callback(handle.remove)
        yield log
