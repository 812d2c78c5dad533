"""Gemma3 text decoders: sandwich RMSNorms (pre and post each sublayer) that scale by (1 + weight).

The residual adds the post-normed sublayer outputs: resid.mid = resid.pre + attn.post_norm and
resid.post = resid.mid + mlp.post_norm.
"""

from __future__ import annotations

import torch
from torch import nn

from outlier_study.adapters.base import ATTENTION, GATED_WEIGHTS, PAPER_ALIASES_GATED, Adapter, TapSpec


def gemma_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma3RMSNorm before its (1 + weight) scale; float32 like the norm's own intermediate."""
    return norm._norm(x.float())  # type: ignore[operator]


ADAPTER = Adapter(
    family="gemma3",
    model_types=("gemma3_text", "gemma3"),
    layers_path="model.layers",
    aliases=PAPER_ALIASES_GATED,
    gamma_offset=1.0,
    norms={
        "attn": "input_layernorm",
        "mlp": "pre_feedforward_layernorm",
        "attn_post": "post_attention_layernorm",
        "mlp_post": "post_feedforward_layernorm",
    },
    weights=GATED_WEIGHTS,
    taps={
        "resid.pre": TapSpec("", "input"),
        "attn.norm_std": TapSpec("input_layernorm", "input", gemma_standardize),
        "attn.norm": TapSpec("input_layernorm", "output"),
        "attn.q": TapSpec("self_attn.q_proj", "output"),
        "attn.k": TapSpec("self_attn.k_proj", "output"),
        "attn.v": TapSpec("self_attn.v_proj", "output"),
        "attn.scores": ATTENTION,
        "attn.probs": ATTENTION,
        "attn.ctx": TapSpec("self_attn.o_proj", "input"),
        "attn.out": TapSpec("self_attn.o_proj", "output"),
        "attn.post_norm": TapSpec("post_attention_layernorm", "output"),
        "resid.mid": TapSpec("pre_feedforward_layernorm", "input"),
        "mlp.norm_std": TapSpec("pre_feedforward_layernorm", "input", gemma_standardize),
        "mlp.norm": TapSpec("pre_feedforward_layernorm", "output"),
        "mlp.gate": TapSpec("mlp.gate_proj", "output"),
        "mlp.up": TapSpec("mlp.up_proj", "output"),
        "mlp.act": TapSpec("mlp.act_fn", "output"),
        "mlp.hidden": TapSpec("mlp.down_proj", "input"),
        "mlp.out": TapSpec("mlp.down_proj", "output"),
        "mlp.post_norm": TapSpec("post_feedforward_layernorm", "output"),
        "resid.post": TapSpec("", "output"),
    },
)
