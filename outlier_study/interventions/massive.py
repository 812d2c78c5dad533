"""Replace the massive activations at one tap: the paper's "set MAs to zero / to the mean" ablation.

The edit is done by hooks that return a new tensor (never writing into the model's own tensor), so the
model's weights are never touched and leaving the `with` block restores it exactly. In mixture-of-experts
layers y6/y7 live inside each expert: there the edit runs in the experts implementation
(`measure/experts/edit.py`) for one expert, the shared experts, or all of them (the default, so the
paper's Table 2 on a MoE model means "in every expert").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.base import Adapter
from outlier_study.adapters.experts import moe_specs
from outlier_study.adapters.taps import EXPERT_TAPS, SHARED_EXPERT, expert_key
from outlier_study.config.options import opt
from outlier_study.config.vocab import MAValue
from outlier_study.errors import ConfigError
from outlier_study.interventions.record import Counted
from outlier_study.interventions.treatment import Inputs, Treatment
from outlier_study.measure.experts import EDITABLE, edit_experts
from outlier_study.measure.hooks import TensorFn, hook_module
from outlier_study.stats.massive import fill_value, masked

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch
    from outlier_study.models.loader import LoadedModel


def editable_tap(adapter: Adapter, tap: str, field_name: str) -> str:
    """The canonical name of a tap an intervention can replace, else a ConfigError listing those taps
    (in a MoE model y6 and y7 too: they are edited inside the experts)."""
    allowed = adapter.editable_taps()
    if _moe_of(adapter):
        allowed = [t for t in adapter.available() if t in allowed or t in EDITABLE]
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


def _moe_of(adapter: Adapter) -> dict[int, Any]:
    """layer -> MoESpec of the adapter's mixture-of-experts layers (none for a dense model)."""
    return dict(getattr(adapter, "moe", None) or {})


def expert_choice(adapter: Adapter, expert: object, tap: str, field_name: str) -> str | None:
    """A valid `expert` value (an index, "shared" or "all") as text, None when unset; a ConfigError naming
    the field and the allowed values otherwise."""
    if expert is None:
        return None
    moe = _moe_of(adapter)
    if not moe:
        raise ConfigError(field_name, f"{adapter.family} models have no mixture-of-experts layers", ["null"])
    num = min(spec.num_experts for spec in moe.values())
    shared = all(spec.shared is not None for spec in moe.values())
    allowed = [f"0..{num - 1}", *([SHARED_EXPERT] if shared else []), "all", "null"]
    text = str(expert).strip()
    if not (text == "all" or (shared and text == SHARED_EXPERT) or (text.isdigit() and int(text) < num)):
        raise ConfigError(field_name, f"no expert '{expert}' in {adapter.family} models", allowed)
    if tap not in EDITABLE:
        raise ConfigError(field_name, f"experts are edited at mlp.hidden (y6) or mlp.out (y7), not {tap}")
    return text


@contextmanager
def replace_massive(
    lm: LoadedModel,
    tap: str,
    layers: Sequence[int] | None,
    value: str,
    ma_abs: float,
    ma_ratio: float,
    expert: object = None,
) -> Iterator[Counted]:
    """Replace every MA (per window, the rule of `ma_mask`) at `tap` of `layers` by 0 or the window mean;
    in MoE layers at y6/y7 inside `expert` (an index, "shared"; None or "all": every expert).

    The hooks are prepended, so measurement hooks on the same module (`tap_hooks`) see the edited tensor
    whichever context was entered first. All input is checked before any hook is installed."""
    adapter = lm.adapter
    canonical = editable_tap(adapter, tap, "intervention.tap")
    choice = expert_choice(adapter, expert, canonical, "intervention.expert")
    chosen = lm.arch.layers(layers, "intervention.layers")
    blocks = adapter.blocks(lm.model)
    moe = moe_specs(blocks, chosen)
    if moe and canonical in EXPERT_TAPS and canonical not in EDITABLE:
        why = f"lies inside the experts of MoE layer {min(moe)}, where only y6 and y7 are edited"
        raise ConfigError("intervention.tap", f"tap '{tap}' ({canonical}) {why}", EDITABLE)
    if canonical not in EDITABLE:
        moe = {}
    recorded = expert_key(canonical, choice or "all") if moe else canonical
    log = Counted(
        name="massive", value=str(value), layers=chosen, tap=recorded, changed=dict.fromkeys(chosen, 0)
    )
    spec = adapter.taps[canonical]  # a dense layer's (a model with MoE layers: the table of its dense ones)
    with ExitStack() as stack:
        for layer in chosen:
            if layer in moe:
                continue
            module = adapter.module(blocks[layer], spec.module)
            edit = _editor(layer, str(value), ma_abs, ma_ratio, log)
            stack.callback(hook_module(module, spec.io, edit, prepend=True).remove)
        if moe:
            edits = edit_experts(
                lm.model, moe, blocks, canonical, choice or "all", str(value), ma_abs, ma_ratio, log.add
            )
            stack.enter_context(edits)
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
    expert: str | None = opt(
        None,
        "MoE models, at y6/y7: the expert edited inside each MoE layer: an index, shared (the shared "
        "experts) or all; null: all",
    )


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    tap = editable_tap(arch.adapter, options.tap, "intervention.tap")
    arch.layers(options.layers, "intervention.layers")
    expert_choice(arch.adapter, options.expert, tap, "intervention.expert")


@contextmanager
def _apply(inputs: Inputs) -> Iterator[Counted]:
    o, th = inputs.options, inputs.threshold
    ma_abs, ma_ratio = float(th.ma_abs), float(th.ma_ratio)
    with replace_massive(inputs.lm, o.tap, o.layers, o.value, ma_abs, ma_ratio, o.expert) as log:
        yield log


TREATMENT = Treatment(
    _apply,
    MassiveOptions,
    "massive activations at one tap replaced by zero or the mean",
    _check,
    layerwise=True,
)
