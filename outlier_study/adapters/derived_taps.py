"""Taps derived from a hooked tensor: a norm's γ-free part (by the norm's kind), per-head norm outputs
flattened, a block of a fused projection's channels. Pure functions of (module, tensor), applied in the
hook that reads the tensor; `adapters/structure.py` picks one per tap."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from outlier_study.adapters.base import Derive


def rms_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without γ, computed as the HF Llama-style norm does before its weight multiply."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def own_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Norms with a `_norm` method (Gemma-style): their own γ-free part, float32 like their intermediate."""
    return norm._norm(x.float())  # type: ignore[operator]


def layer_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without γ and β."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
    return nn.functional.layer_norm(x, x.shape[-1:], None, None, eps)


def standardizer(norm: nn.Module) -> Derive:
    """The γ-free part of a norm, by its kind: mean-subtracting LayerNorms, `_norm` norms, RMSNorms."""
    name = type(norm).__name__.lower()
    if isinstance(norm, nn.LayerNorm) or ("layernorm" in name and "rms" not in name):
        return layer_standardize
    if callable(getattr(norm, "_norm", None)):
        return own_standardize
    return rms_standardize


def flatten_heads(_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-head norm outputs (B, T, heads, head_dim) as (B, T, heads·head_dim)."""
    return x.flatten(-2) if x.dim() == 4 else x


@dataclass(frozen=True)
class Rows:
    """A tap that is a contiguous block of a fused projection's output channels."""

    start: int
    stop: int

    def __call__(self, _module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.start : self.stop]
