"""Llama-like decoders (Llama, Qwen2, Mistral, SmolLM2): pre-RMSNorm, gated SiLU MLP."""

from __future__ import annotations

from outlier_study.adapters.base import (
    ATTENTION,
    GATED_WEIGHTS,
    PAPER_ALIASES_GATED,
    Adapter,
    TapSpec,
    rms_standardize,
)

ADAPTER = Adapter(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    layers_path="model.layers",
    aliases=PAPER_ALIASES_GATED,
    norms={"attn": "input_layernorm", "mlp": "post_attention_layernorm"},
    weights=GATED_WEIGHTS,
    taps={
        "resid.pre": TapSpec("", "input"),
        "attn.norm_std": TapSpec("input_layernorm", "input", rms_standardize),
        "attn.norm": TapSpec("input_layernorm", "output"),
        "attn.q": TapSpec("self_attn.q_proj", "output"),
        "attn.k": TapSpec("self_attn.k_proj", "output"),
        "attn.v": TapSpec("self_attn.v_proj", "output"),
        "attn.scores": ATTENTION,
        "attn.probs": ATTENTION,
        "attn.ctx": TapSpec("self_attn.o_proj", "input"),
        "attn.out": TapSpec("self_attn.o_proj", "output"),
        "resid.mid": TapSpec("post_attention_layernorm", "input"),
        "mlp.norm_std": TapSpec("post_attention_layernorm", "input", rms_standardize),
        "mlp.norm": TapSpec("post_attention_layernorm", "output"),
        "mlp.gate": TapSpec("mlp.gate_proj", "output"),
        "mlp.up": TapSpec("mlp.up_proj", "output"),
        "mlp.act": TapSpec("mlp.act_fn", "output"),
        "mlp.hidden": TapSpec("mlp.down_proj", "input"),
        "mlp.out": TapSpec("mlp.down_proj", "output"),
        "resid.post": TapSpec("", "output"),
    },
)
