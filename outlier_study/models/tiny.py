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


def tiny_config(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """HF config for a tiny model of `model_type`, with optional field overrides."""
    return AutoConfig.for_model(model_type, **{**TINY_ARCHS.get(model_type, {}), **(overrides or {})})
