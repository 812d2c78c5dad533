"""Tiny random-init models and a byte-level tokenizer, so tests run real HF code in seconds."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

BYTE_SPECIALS = ("<bos>", "<eos>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the 256 byte symbols plus BOS/EOS: no download, any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in BYTE_SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", model_max_length=1 << 30
    )


BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIALS)

# Shapes small enough for CPU tests, large enough to have GQA, several heads and several layers.
_TINY_COMMON: dict[str, Any] = {
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "tie_word_embeddings": False,
}

TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(_TINY_COMMON),
    "qwen2": dict(_TINY_COMMON),
    "mistral": dict(_TINY_COMMON, sliding_window=None),
    "gemma3_text": dict(
        _TINY_COMMON, head_dim=16, sliding_window=8, layer_types=None, query_pre_attn_scalar=16
    ),
    "gpt2": {
        "vocab_size": BYTE_VOCAB_SIZE,
        "n_embd": 64,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 1024,
        "bos_token_id": 256,
        "eos_token_id": 257,
    },
}


# One shrink for every other family: each size field its default config has, made small. Fields whose
# default is None are derived by the config itself (head_dim from hidden_size and heads, ...).
SHRINK: dict[str, Any] = {
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "ffn_dim": 128,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "rotary_dim": 8,
    "max_position_embeddings": 1024,
    "n_positions": 1024,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}
DERIVED = ("layer_types",)  # lists per layer: recomputed by the config for the new depth
LAYER_KINDS = ("full_attention", "sliding_attention")
# Families whose default config leaves a field unset that a model needs (transformers fills it in for the
# real checkpoints): the one value each needs, over the shrink.
NEEDS: dict[str, dict[str, Any]] = {
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "ministral": {"head_dim": 16},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "zaya": {"num_experts_per_tok": 1},
    "helium": {"head_dim": 16},
    "nemotron": {"head_dim": 16, "num_key_value_heads": 2},
    "cohere_compass_text": {
        "rope_parameters": {kind: {"rope_type": "default", "rope_theta": 1e4} for kind in LAYER_KINDS}
    },
    "dots1": dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
}


def shrunk_overrides(model_type: str) -> dict[str, Any]:
    """The SHRINK fields a family's default config has (and sets), for a tiny model of that family."""
    default = AutoConfig.for_model(model_type)
    out = {k: v for k, v in SHRINK.items() if getattr(default, k, None) is not None or k == "pad_token_id"}
    if getattr(default, "num_key_value_heads", None) == getattr(default, "num_attention_heads", None):
        out["num_key_value_heads"] = SHRINK["num_attention_heads"]  # multi-head attention stays so
    out |= {k: None for k in DERIVED if getattr(default, k, None) is not None}
    return out | NEEDS.get(model_type, {})


def tiny_config(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """HF config for a tiny model of `model_type` (hand-set shapes for the paper's families, the generic
    shrink for the others), with optional field overrides."""
    base = TINY_ARCHS[model_type] if model_type in TINY_ARCHS else shrunk_overrides(model_type)
    return AutoConfig.for_model(model_type, **{**base, **(overrides or {})})
