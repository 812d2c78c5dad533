"""Transform the query, key and value tensors the attention function receives: after RoPE and the q/k
norms, and after the KV cache update, so keys are what a KV cache holds.

No module hook reaches these tensors (RoPE is applied inside the attention module's forward), so a
wrapper of the model's attention implementation is selected through transformers' AttentionInterface, as
`measure/attention.py` does for the scores. Transforms stack: each `with attention_inputs(model, t)`
appends one, they run in the order they were entered (rotation's online Hadamard before the KV quantizer),
and the model's own implementation is selected again when the outermost block exits, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from outlier_study.measure.attention import original_attention

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (attention module, query (B, H, Tq, d), key (B, Hkv, Tk, d), value (B, Hkv, Tk, dv)) -> new q, k, v
AttentionTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], QKV]

_TRANSFORMS: ContextVar[tuple[AttentionTransform, ...]] = ContextVar(
    "outlier_study_attention_inputs", default=()
)
_PREFIX = "outlier_inputs_"


def _wrapper(impl: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The attention function `impl` (eager: the module's own) called with transformed q, k, v."""

    def forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for transform in _TRANSFORMS.get():
            query, key, value = transform(module, query, key, value)
        return original_attention(module, impl)(module, query, key, value, attention_mask, **kwargs)

    return forward


def _register(impl: str) -> str:
    name = _PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(impl))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


@contextmanager
def attention_inputs(model: nn.Module, transform: AttentionTransform) -> Iterator[None]:
    """Apply `transform` to every attention call's q, k, v for the block (after the ones entered before)."""
    config = model.config  # type: ignore[attr-defined]
    original = str(config._attn_implementation)
    outermost = _PREFIX not in original  # else a wrapper (maybe under a capture) runs the stack
    token = _TRANSFORMS.set((*_TRANSFORMS.get(), transform))
    try:
        if outermost:
            model.set_attn_implementation(_register(original))  # type: ignore[operator]
        yield
    finally:
        if outermost:
            model.set_attn_implementation(original)  # type: ignore[operator]
        _TRANSFORMS.reset(token)
