"""Reach attention scores (x6) and probabilities (x7) through transformers' AttentionInterface.

The capturing function recomputes QKᵀ·scale for the statistics and then calls the model's own attention
implementation with the untouched inputs, so the forward pass (and the logits) stay exactly the same.
It is registered under a derived name and selected only while a run asks for x6/x7.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

# (layer index, tap name, tensor (B, H, Tq, Tk), valid mask broadcastable to it)
AttentionSink = Callable[[int, str, torch.Tensor, torch.Tensor], None]

_STATE: ContextVar[tuple[str, AttentionSink, frozenset[str], frozenset[int]] | None] = ContextVar(
    "outlier_study_attention_capture", default=None
)
_PREFIX = "outlier_capture_"


def original_attention(
    module: nn.Module, impl: str
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The attention function the model would have used, eager being module-specific."""
    eager = sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[attr-defined]
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


def _valid_mask(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Causal positions the query may attend to (masked entries never enter statistics)."""
    if mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if mask.dtype == torch.bool:
        return mask[..., :k_len]
    return mask[..., :k_len] == 0


def _capture_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    state = _STATE.get()
    assert state is not None, "capturing attention selected outside capture_attention()"
    impl, sink, taps, layers = state
    layer = int(getattr(module, "layer_idx", -1))
    if layer in layers:
        with torch.no_grad():
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            scores = torch.matmul(query, k.transpose(-1, -2)) * float(scaling)  # type: ignore[arg-type]
            valid = _valid_mask(attention_mask, query.shape[-2], k.shape[-2], query.device)
            if "attn.scores" in taps:
                sink(layer, "attn.scores", scores, valid)
            if "attn.probs" in taps:
                logits = scores.float()
                softcap = kwargs.get("softcap")
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap  # type: ignore[operator]
                probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
                sink(layer, "attn.probs", probs, valid)
    return original_attention(module, impl)(module, query, key, value, attention_mask, **kwargs)


def _register(impl: str) -> str:
    name = _PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capture_forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


@contextmanager
def capture_attention(
    model: nn.Module, sink: AttentionSink, taps: frozenset[str], layers: frozenset[int]
) -> Iterator[None]:
    """Select the capturing attention for the `with` body; restore the original selection after."""
    config = model.config  # type: ignore[attr-defined]
    original = config._attn_implementation
    token = _STATE.set((original, sink, taps, layers))
    try:
        model.set_attn_implementation(_register(original))  # type: ignore[operator]
        yield
    finally:
        model.set_attn_implementation(original)  # type: ignore[operator]
        _STATE.reset(token)
