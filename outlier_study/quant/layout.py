"""Where the linear layers sit relative to the norms and the residual stream, per architecture family.

SmoothQuant needs the linears that read each norm's output; rotation also needs the linears that write the
residual stream and the MLP's down projection. GPT-2's transformers `Conv1D` stores its weight as
(in, out); `weight_out_in` gives every linear the (out, in) orientation of `nn.Linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from outlier_study.adapters.base import Adapter

LinearLike = nn.Linear | Conv1D


@dataclass(frozen=True)
class Layout:
    """Module paths inside one decoder layer (and the final norm inside the CausalLM)."""

    readers: dict[str, tuple[str, ...]]  # norm key of Adapter.norms ("attn"/"mlp") -> linears reading it
    writers: tuple[str, ...]  # linears whose output is added to the residual stream
    down: str  # the MLP output projection (its input is the tap mlp.hidden)
    kv: tuple[str, ...]  # projections producing keys and values ("" parts of a fused c_attn: see kv_fused)
    kv_fused: bool = False  # GPT-2: keys and values are the 2nd and 3rd thirds of c_attn's output
    final_norm: str = "model.norm"


_GATED = Layout(  # Llama, Qwen2, Mistral and Gemma3 name their projections alike
    readers={
        "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj"),
    },
    writers=("self_attn.o_proj", "mlp.down_proj"),
    down="mlp.down_proj",
    kv=("self_attn.k_proj", "self_attn.v_proj"),
)

LAYOUTS: dict[str, Layout] = {
    "llama": _GATED,
    "gemma3": _GATED,
    "gpt2": Layout(
        readers={"attn": ("attn.c_attn",), "mlp": ("mlp.c_fc",)},
        writers=("attn.c_proj", "mlp.c_proj"),
        down="mlp.c_proj",
        kv=("attn.c_attn",),
        kv_fused=True,
        final_norm="transformer.ln_f",
    ),
}


def layout_for(adapter: Adapter) -> Layout:
    return LAYOUTS[adapter.family]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def decoder_linears(model: nn.Module, adapter: Adapter) -> list[tuple[int, str, LinearLike]]:
    """(layer, path inside the layer, module) of every linear inside the decoder layers, in module order."""
    out: list[tuple[int, str, LinearLike]] = []
    for layer, block in enumerate(adapter.layers(model)):
        out.extend((layer, name, m) for name, m in block.named_modules() if is_linear(m))  # type: ignore[misc]
    return out


def weight_out_in(module: LinearLike) -> torch.Tensor:
    """The weight as (out_features, in_features): a view for Conv1D's (in, out) storage."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def to_storage(module: LinearLike, w_out_in: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight in the module's own storage orientation."""
    return w_out_in if isinstance(module, nn.Linear) else w_out_in.t()


def head_dim(config: object) -> int:
    """Per-head width of keys and values (KV quantization groups)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return int(hidden) // int(heads)
