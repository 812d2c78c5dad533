"""Forward hooks that hand each tap's tensor to a sink; removed when the `with` block exits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from outlier_study.measure.attention import capture_attention
from outlier_study.adapters.base import ATTENTION_TAPS, Adapter

# (layer index, canonical tap, tensor (B, T, C) or (B, H, Tq, Tk) for attention taps, valid mask or None)
TapSink = Callable[[int, str, torch.Tensor, torch.Tensor | None], None]
Derived = list[tuple[str, Callable[[nn.Module, torch.Tensor], torch.Tensor] | None]]


def _first_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def _input_hook(layer: int, taps: Derived, sink: TapSink) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        for tap, derive in taps:
            sink(layer, tap, derive(module, x) if derive else x, None)

    return hook


def _output_hook(layer: int, taps: Derived, sink: TapSink) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        y = _first_tensor(output)
        for tap, derive in taps:
            sink(layer, tap, derive(module, y) if derive else y, None)

    return hook


@contextmanager
def tap_hooks(
    model: nn.Module, adapter: Adapter, taps: list[str], layers: list[int], sink: TapSink
) -> Iterator[None]:
    """Hook `taps` at `layers` of an unmodified model; all hooks are gone after the block (even on errors)."""
    with ExitStack() as stack:
        blocks = adapter.layers(model)
        for layer in layers:
            groups: dict[tuple[str, str], Derived] = defaultdict(list)
            for tap in taps:
                if tap in ATTENTION_TAPS:
                    continue
                spec = adapter.taps[tap]
                groups[(spec.module, spec.io)].append((tap, spec.derive))
            for (path, io), derived in groups.items():
                module = blocks[layer].get_submodule(path) if path else blocks[layer]
                if io == "input":
                    handle = module.register_forward_pre_hook(
                        _input_hook(layer, derived, sink), with_kwargs=True
                    )
                else:
                    handle = module.register_forward_hook(_output_hook(layer, derived, sink))
                stack.callback(handle.remove)
        attention = frozenset(taps) & ATTENTION_TAPS
        if attention:
            stack.enter_context(capture_attention(model, sink, attention, frozenset(layers)))
        yield
