"""Llama-like decoders (Llama, Qwen2, Mistral, SmolLM2): pre-RMSNorm, gated SiLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from outlier_study.adapters.base import Adapter, NormSpec
from outlier_study.adapters.gated import ATTN_READERS, MLP_READERS, WEIGHTS, gated_taps
from outlier_study.adapters.taps import PAPER_ALIASES


def rms_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without γ, computed as the HF Llama-style norm does before its weight multiply."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


ADAPTER = Adapter(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    layers_path="model.layers",
    final_norm="model.norm",
    aliases=PAPER_ALIASES,
    norms={
        "attn": NormSpec("input_layernorm", "attn.norm", ATTN_READERS),
        "mlp": NormSpec("post_attention_layernorm", "mlp.norm", MLP_READERS),
    },
    weights=WEIGHTS,
    taps=gated_taps("input_layernorm", "post_attention_layernorm", rms_standardize),
)
