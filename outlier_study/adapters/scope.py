"""Which causal-LM families of transformers this project measures: decoders built of attention and an MLP
(or a mixture of experts) in every layer. The others are refused with the reason, in one line."""

from __future__ import annotations

from typing import Any

ENCODER = "a bidirectional encoder used as a decoder, not a decoder-only model"
ENCODER_DECODER = "the decoder half of an encoder-decoder model"
RECURRENT = "state-space, recurrent or linear-attention layers, not attention and an MLP in every layer"
MULTIMODAL = "a multimodal wrapper; use its text model's family"
STREAMS = (
    "several residual streams per layer (hyper-connections, AltUp, attention over earlier blocks' outputs), "
    "not one residual stream"
)
LOOPED = "recurrent depth: a block of its layers runs several times per forward, so a layer has no one output"

OUT_OF_SCOPE: dict[str, str] = {
    **dict.fromkeys(
        (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
            "xlnet",
            "reformer",
            "modernbert-decoder",
        ),
        ENCODER,
    ),
    **dict.fromkeys(
        (
            "bart",
            "mbart",
            "marian",
            "pegasus",
            "blenderbot",
            "blenderbot-small",
            "mvp",
            "plbart",
            "bigbird_pegasus",
            "prophetnet",
            "trocr",
            "whisper",
            "musicgen",
            "musicgen_melody",
            "moss_transcribe_diarize",
        ),
        ENCODER_DECODER,
    ),
    **dict.fromkeys(
        (
            "mamba",
            "mamba2",
            "falcon_mamba",
            "rwkv",
            "xlstm",
            "recurrent_gemma",
            "bamba",
            "jamba",
            "zamba",
            "zamba2",
            "falcon_h1",
            "granitemoehybrid",
            "nemotron_h",
            "lfm2",
            "lfm2_moe",
            "lfm3",
            "qwen3_next",
            "qwen3_5_text",
            "qwen3_5_moe_text",
            "kimi_linear",
            "olmo_hybrid",
            "bailing_hybrid",
            "minimax",
            "hy_v4",
            "lara_mini",
            "qwen4_exp_text",
            "hrm_text",
        ),
        RECURRENT,
    ),
    **dict.fromkeys(
        (
            "fuyu",
            "gemma3n",
            "gemma4",
            "gemma4_unified",
            "gemma4_assistant",
            "gemma4_unified_assistant",
            "git",
            "got_ocr2",
            "mllama",
            "phi4_multimodal",
            "emu3",
            "llama4",
            "qwen3_5",
            "qwen3_5_moe",
            "qwen4_exp",
            "dots3_note",
            "minimax_m3_vl_text",
            "gemma3",
            "moshi",
        ),
        MULTIMODAL,
    ),
    **dict.fromkeys(("deepseek_v4", "gemma3n_text", "inkling2_text"), STREAMS),
    **dict.fromkeys(("dory", "inkling2_loop_text"), LOOPED),
    "blt": "a byte-level model with local and global transformers, not one stack of decoder layers",
}


def out_of_scope(model_type: str, config: Any) -> str | None:
    """Why a family is not measured here, or None when it is in scope."""
    if model_type in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[model_type]
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    return None
