"""Gemma3 text decoders: sandwich RMSNorms (pre and post each sublayer) that scale by (1 + weight).

The residual adds the post-normed sublayer outputs: resid.mid = resid.pre + attn.post_norm and
resid.post = resid.mid + mlp.post_norm.
"""

from __future__ import annotations

import torch
from torch import nn

from outlier_study.adapters.base import Adapter, NormSpec, TapSpec
from outlier_study.adapters.gated import ATTN_READERS, MLP_READERS, WEIGHTS, gated_taps
from outlier_study.adapters.taps import PAPER_ALIASES


def gemma_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma3RMSNorm before its (1 + weight) scale; float32 like the norm's own intermediate."""
    return norm._norm(x.float())  # type: ignore[operator]


ADAPTER = Adapter(
    family="gemma3",
    model_types=("gemma3_text", "gemma3"),
    layers_path="model.layers",
    final_norm="model.norm",
    aliases=PAPER_ALIASES,
    gamma_offset=1.0,
    norms={
        "attn": NormSpec("input_layernorm", "attn.norm", ATTN_READERS),
        "mlp": NormSpec("pre_feedforward_layernorm", "mlp.norm", MLP_READERS),
        "attn_post": NormSpec("post_attention_layernorm", "attn.post_norm"),
        "mlp_post": NormSpec("post_feedforward_layernorm", "mlp.post_norm"),
    },
    weights=WEIGHTS,
    taps={
        **gated_taps("input_layernorm", "pre_feedforward_layernorm", gemma_standardize),
        "attn.post_norm": TapSpec("post_attention_layernorm", "output"),
        "mlp.post_norm": TapSpec("post_feedforward_layernorm", "output"),
    },
    rotation_blocker="its sandwich norms sit on the residual branches, so γ cannot be folded into readers",
)
