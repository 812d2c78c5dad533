"""`edit_experts` is the `massive` intervention inside the same implementation: the MAs of one expert's y6
(or y7) are replaced on its routed tokens, and only the rows of the (token, expert) pairs that changed
get output += routing_weight · (down(y6') − down(y6)) (computed as W_down(y6' − y6)), so every other row
of the layer's output stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlier_study.adapters.experts import MoESpec
from outlier_study.adapters.taps import SHARED_EXPERT
from outlier_study.measure.experts.routed import (
    EDITS,
    Routed,
    Site,
    activate,
    shape_hook,
    shared_modules,
    sites_of,
    watch,
)
from outlier_study.stats.massive import fill_value, masked

EDITABLE = ("mlp.hidden", "mlp.out")  # y6, y7: the expert taps the massive intervention replaces


@dataclass
class _Edit:
    tap: str  # mlp.hidden | mlp.out
    value: str  # zero | mean
    ma_abs: float
    ma_ratio: float
    count: Callable[[int, int], None]  # (layer, replaced elements)
    sites: dict[int, Site] = field(default_factory=dict)
    targets: dict[int, frozenset[int]] = field(default_factory=dict)  # id(experts module) -> routed experts

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
        return _apply_edit(self, site, routed, out)


# ------------------------------------------------------------------ editing (the massive intervention)


def _fill(x: torch.Tensor, value: str) -> torch.Tensor:
    """0, or the mean of the whole tensor x (MAs included): `stats.massive.fill_value` for one
    window's rows of one expert."""
    if value == "zero":
        return x.new_zeros(())
    return x.mean(dtype=torch.float32).to(x.dtype)


def _edit_rows(
    x: torch.Tensor, window: torch.Tensor, value: str, ma_abs: float, ma_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (n, C) rows of one expert; each window's rows are one tensor for the MA rule (its median over
    the routed tokens of that window). Returns (edited x, rows changed (n,), elements replaced)."""
    new, changed, total = x, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), 0
    for b in window.unique().tolist():
        sel = (window == b).nonzero(as_tuple=True)[0]
        sub = x[sel]
        mask = masked(sub[None], ma_abs, ma_ratio)
        count = 0 if mask is None else int(mask.sum())
        if not count:
            continue
        assert mask is not None
        if new is x:
            new = x.clone()
        new[sel] = torch.where(mask[0], _fill(sub, value), sub)
        changed[sel] |= mask[0].any(dim=-1)
        total += count
    return new, changed, total


def _apply_edit(edit: _Edit, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
    t = site.shape[1]
    for e in sorted(edit.targets[id(site.experts)] & set(routed.hit)):
        taps = routed.taps(e)
        tok, _ = routed.rows(e)
        old = taps[edit.tap]
        new, changed, count = _edit_rows(old, torch.div(tok, t, rounding_mode="floor"), edit.value,
                                         edit.ma_abs, edit.ma_ratio)  # fmt: skip
        edit.count(site.layer, count)
        if not count:
            continue
        if edit.tap == "mlp.hidden":
            delta = routed.replace_hidden(e, new)
        else:
            delta = routed.post(new) - routed.post(old)
            taps["mlp.out"] = new
        out = routed.add_rows(out, e, changed.nonzero(as_tuple=True)[0], delta)
    return out


def _shared_edit(stack: ExitStack, block: nn.Module, site: Site, edit: _Edit) -> None:
    """The dense rule at the shared experts' y6 (down_proj input) or y7 (its output), per window."""
    down = shared_modules(block, site.spec.shared)["down"]  # type: ignore[arg-type]

    def replace(x: torch.Tensor) -> torch.Tensor | None:
        b, t = site.shape
        xs = x.reshape(b, t, x.shape[-1])
        mask = masked(xs, edit.ma_abs, edit.ma_ratio)
        count = 0 if mask is None else int(mask.sum())
        edit.count(site.layer, count)
        if not count:
            return None
        assert mask is not None
        return torch.where(mask, fill_value(xs, edit.value), xs).reshape(x.shape)

    if edit.tap == "mlp.hidden":

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = replace(args[0] if args else kwargs["input"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "input": new})

        stack.callback(down.register_forward_pre_hook(pre, with_kwargs=True, prepend=True).remove)
    else:

        def post(_m: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
            return replace(output)

        stack.callback(down.register_forward_hook(post, prepend=True).remove)


@contextmanager
def edit_experts(
    model: nn.Module,
    specs: Mapping[int, MoESpec],
    layers: Sequence[nn.Module] | Mapping[int, nn.Module],
    tap: str,
    experts: Sequence[int | str] | str,
    value: str,
    ma_abs: float,
    ma_ratio: float,
    count: Callable[[int, int], None],
) -> Iterator[None]:
    """Replace the MAs at `tap` (mlp.hidden or mlp.out) of `experts` (indices and/or "shared", or "all")
    in the MoE layers of `specs`, on the tokens routed to each; `count(layer, n)` gets every replacement.
    Only the output rows of the (token, expert) pairs that changed move; the model is untouched after."""
    if tap not in EDITABLE:
        raise ValueError(f"expert tap '{tap}' cannot be edited (allowed: {', '.join(EDITABLE)})")
    chosen = {str(e) for e in ([experts] if isinstance(experts, str | int) else experts)}
    edit = _Edit(tap, value, ma_abs, ma_ratio, count)
    with ExitStack() as stack:
        for block, site in sites_of(specs, layers):
            names = set(site.spec.expert_names()) if "all" in chosen else chosen
            targets = {int(e) for e in names if e != SHARED_EXPERT}
            share = SHARED_EXPERT in names and site.spec.shared is not None
            if not targets and not share:
                continue
            stack.callback(block.register_forward_pre_hook(shape_hook(site), with_kwargs=True).remove)
            if targets:
                edit.targets[id(site.experts)] = frozenset(targets)
                watch(stack, block, site, edit)
            if share:
                _shared_edit(stack, block, site, edit)
        activate(stack, model, edit, EDITS)
        yield
