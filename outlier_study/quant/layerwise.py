"""Run a decoder layer by layer on calibration windows: what a sequential weight quantizer (GPTQ) needs.

One forward of the whole model records, for every decoder layer and batch, the arguments the model hands
that layer (attention mask, position embeddings, ...; per layer, since e.g. Gemma3's sliding and global
layers get different masks) and the hidden states entering layer 0. Then each layer can be run on its own:
layer l reads what layer l-1 returned, so a quantizer that quantizes layer l-1 before running layer l
calibrates every layer on the outputs of the already quantized layers before it, and nothing runs twice
through the whole model. The model's own hooks (a method's online rotation, MA replacement) are module
hooks and run as in a full forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.measure.forward import batches

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel


Call = tuple[tuple[Any, ...], dict[str, Any]]  # a layer call's arguments other than the hidden states


class _Stop(Exception):
    """Raised by the last layer's pre-hook: the capture needs nothing after it (the lm_head is costly)."""


@dataclass
class LayerCalls:
    """Per batch: the hidden states entering layer 0, and every layer's other arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # one per batch
    calls: list[list[Call]] = field(default_factory=list)  # [layer][batch]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple[Any, ...], dict]:
    """The hidden states out of a layer call, and the call without them."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


@torch.inference_mode()
def capture_layer_calls(lm: LoadedModel, ids: torch.Tensor, batch_size: int) -> LayerCalls:
    """One forward per batch of `ids` (no KV cache), stopped at the last layer, recording what each layer
    is called with."""
    blocks = list(lm.adapter.blocks(lm.model))
    out = LayerCalls(calls=[[] for _ in blocks])

    def recorder(index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, rest_args, rest_kwargs = _hidden_of(args, kwargs)
            if index == 0:
                out.hidden.append(hidden.detach())
            out.calls[index].append((rest_args, rest_kwargs))
            if index == len(blocks) - 1:
                raise _Stop

        return hook

    with ExitStack() as stack:
        for index, block in enumerate(blocks):
            handle = block.register_forward_pre_hook(recorder(index), with_kwargs=True)
            stack.callback(handle.remove)
        for _, batch in batches(ids, batch_size):
            try:
                lm.model(input_ids=batch.to(lm.input_device), use_cache=False)
            except _Stop:
                pass
    return out


@torch.inference_mode()
def run_layer(block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """One decoder layer on its own (its hooks included); the hidden states it returns."""
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Grams:
    """Σ xᵀx (float64) and the token count per key, over every token row x fed: the Hessian
    H = 2 XᵀX / n of what one weight read, the same sum for a linear and for one expert."""

    def __init__(self) -> None:
        self.sums: dict[Any, torch.Tensor] = {}
        self.tokens: dict[Any, int] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self.sums

    def add(self, key: Any, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        gram = (flat.t() @ flat).double()
        self.sums[key] = self.sums[key] + gram if key in self.sums else gram
        self.tokens[key] = self.tokens.get(key, 0) + flat.shape[0]

    def hessian(self, key: Any) -> torch.Tensor:
        return self.sums[key] * (2.0 / self.tokens[key])


class HessianLog:
    """Σ xᵀx and the token count of every hooked linear's input; linears that read the same tensor object
    (q/k/v, gate/up) share one sum, so it is computed once."""

    def __init__(self) -> None:
        self.grams = Grams()
        self.shared: dict[nn.Module, nn.Module] = {}  # linear -> the first linear that read its input
        self._last: tuple[torch.Tensor, nn.Module] | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        owner = self._last[1] if self._last is not None and x is self._last[0] else module
        if self.shared.setdefault(module, owner) is not owner:
            raise RuntimeError("a linear read its neighbour's input in one batch and its own in another")
        if owner is not module:
            return
        self._last = (x, module)
        self.grams.add(owner, x)

    def hessian(self, module: nn.Module) -> torch.Tensor:
        """H = 2 XᵀX / n of this linear's inputs (float64)."""
        return self.grams.hessian(self.shared[module])

    def groups(self) -> list[list[nn.Module]]:
        """The hooked linears grouped by shared input, in the order they first ran."""
        out: dict[nn.Module, list[nn.Module]] = {}
        for module, owner in self.shared.items():
            out.setdefault(owner, []).append(module)
        return list(out.values())

    def clear(self) -> None:
        self._last = None


@contextmanager
def hessians(linears: list[nn.Module]) -> Iterator[HessianLog]:
    """Accumulate the input Hessians of `linears` while the block runs (pre-hooks, appended: they see the
    input after any prepended method hook such as the online rotation before down_proj)."""
    log = HessianLog()
    with ExitStack() as stack:
        for module in linears:
            stack.callback(module.register_forward_pre_hook(log.hook).remove)
        stack.callback(log.clear)
        yield log
