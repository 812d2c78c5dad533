"""Forward hooks at taps: the one place that reads (and, for interventions, replaces) a module's input or
output. Hooks go on the unmodified modules and are removed when their `with` block exits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from outlier_study.adapters.base import CAPTURED, Adapter, Derive
from outlier_study.adapters.experts import moe_specs
from outlier_study.adapters.taps import ATTENTION_TAPS
from outlier_study.measure.attention import capture_attention
from outlier_study.measure.experts import MOE_TAPS, capture_experts

# (layer index, canonical tap or per-expert key `tap@expert`, tensor (B, T, C), or (B, H, Tq, Tk) for
# attention taps, or (B, k, T, C) for a MoE layer's expert taps pooled over its k routed experts;
# valid mask or None)
TapSink = Callable[[int, str, torch.Tensor, torch.Tensor | None], None]
# Sees a module's tensor at a hook; a returned tensor replaces it downstream, None leaves it as it is.
TensorFn = Callable[[nn.Module, torch.Tensor], torch.Tensor | None]


def hook_module(
    module: nn.Module, io: Literal["input", "output"], fn: TensorFn, prepend: bool = False
) -> RemovableHandle:
    """Call `fn` on the module's first input (positional or `hidden_states`) or its (first) output."""
    if io == "input":

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = fn(mod, args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)

    def post(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        single = isinstance(output, torch.Tensor)
        new = fn(mod, output if single else output[0])
        if new is None:
            return None
        return new if single else (new, *output[1:])

    return module.register_forward_hook(post, prepend=prepend)


def _feeder(
    layer: int, taps: list[tuple[str, Derive | None]], sink: TapSink, windows: list[tuple[int, int]]
) -> TensorFn:
    """Feed a module boundary's taps to the sink; tensors a family flattens to (B·T, C) inside its layer
    (OPT's MLP, Llama 4's experts) come back as (B, T, C) of the layer input's `windows` shape."""

    def feed(module: nn.Module, x: torch.Tensor) -> None:
        if x.dim() == 2 and windows:
            x = x.view(*windows[-1], x.shape[-1])
        for tap, derive in taps:
            sink(layer, tap, derive(module, x) if derive else x, None)

    return feed


def _shape_recorder(windows: list[tuple[int, int]]) -> TensorFn:
    def record(_module: nn.Module, x: torch.Tensor) -> None:
        windows[:] = [tuple(x.shape[:2])]  # type: ignore[list-item]

    return record


@contextmanager
def tap_hooks(
    model: nn.Module,
    adapter: Adapter,
    taps: list[str],
    layers: list[int],
    sink: TapSink,
    experts: bool = False,
) -> Iterator[None]:
    """Hook `taps` at `layers` of an unmodified model; all hooks are gone after the block (even on errors).
    Taps on the same module boundary share one hook. In mixture-of-experts layers the expert taps no
    module hook reaches come through the experts interface (measure/experts/), pooled over the routed
    (token, expert) pairs as (B, k, T, C); with `experts` also per expert (`tap@e`, `tap@shared`) and the
    routing load (`moe.routing`)."""
    with ExitStack() as stack:
        blocks = adapter.blocks(model)
        moe = moe_specs(blocks, layers)
        hooked: set[str] = set()  # taps of MoE layers a module hook reaches (e.g. the block's output)
        for layer in layers:
            groups: dict[tuple[str, str], list[tuple[str, Derive | None]]] = defaultdict(list)
            for tap in taps:
                if not adapter.has_tap(layer, tap):
                    continue
                spec = adapter.tap_spec(layer, tap)
                if spec not in CAPTURED:
                    groups[(spec.module, spec.io)].append((tap, spec.derive))
            windows: list[tuple[int, int]] = []  # (B, T) of this layer's input, while it runs
            if groups:
                recorder = hook_module(blocks[layer], "input", _shape_recorder(windows), prepend=True)
                stack.callback(recorder.remove)
            for (path, io), derived in groups.items():
                module = adapter.module(blocks[layer], path)
                feeder = _feeder(layer, derived, sink, windows)
                stack.callback(hook_module(module, io, feeder).remove)  # type: ignore[arg-type]
            if layer in moe:
                hooked |= {tap for derived in groups.values() for tap, _ in derived}
        attention = frozenset(taps) & ATTENTION_TAPS
        if attention:
            stack.enter_context(capture_attention(model, sink, attention, frozenset(layers)))
        moe_taps = [t for t in taps if t in MOE_TAPS]
        if moe and (moe_taps or experts):
            pooled = [t for t in moe_taps if t not in hooked]
            stack.enter_context(
                capture_experts(model, moe, sink, moe_taps, blocks, pooled=pooled, per_expert=experts)
            )
        yield
