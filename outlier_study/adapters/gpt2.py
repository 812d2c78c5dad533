"""GPT-2: pre-LayerNorm (with β), fused c_attn (q, k, v as thirds), GeLU MLP without an up projection."""

from __future__ import annotations

import torch
from torch import nn

from outlier_study.adapters.base import ATTENTION, Adapter, Derive, NormSpec, TapSpec, WeightSpec
from outlier_study.adapters.taps import PAPER_ALIASES


def layer_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without γ and β."""
    return nn.functional.layer_norm(x, norm.normalized_shape, None, None, norm.eps)


def _third(index: int) -> Derive:
    def derive(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(3, dim=-1)[index]

    return derive


# The paper calls GPT-2's c_proj input "y4" in its GPT-2 tables and "y6" in Table 2.
GPT2_ALIASES = {k: v for k, v in PAPER_ALIASES.items() if v != "mlp.up"} | {"y4": "mlp.hidden"}

ADAPTER = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    final_norm="transformer.ln_f",
    aliases=GPT2_ALIASES,
    norms={
        "attn": NormSpec("ln_1", "attn.norm", ("q", "k", "v")),
        "mlp": NormSpec("ln_2", "mlp.norm", ("gate",)),
    },
    weights={
        "q": WeightSpec("attn.c_attn", 0, 3),
        "k": WeightSpec("attn.c_attn", 1, 3),
        "v": WeightSpec("attn.c_attn", 2, 3),
        "o": WeightSpec("attn.c_proj"),
        "gate": WeightSpec("mlp.c_fc"),  # GPT-2's c_fc plays the gate's role (y3 = its output)
        "down": WeightSpec("mlp.c_proj"),
    },
    taps={
        "resid.pre": TapSpec("", "input"),
        "attn.norm_std": TapSpec("ln_1", "input", layer_standardize),
        "attn.norm": TapSpec("ln_1", "output"),
        "attn.q": TapSpec("attn.c_attn", "output", _third(0)),
        "attn.k": TapSpec("attn.c_attn", "output", _third(1)),
        "attn.v": TapSpec("attn.c_attn", "output", _third(2)),
        "attn.scores": ATTENTION,
        "attn.probs": ATTENTION,
        "attn.ctx": TapSpec("attn.c_proj", "input"),
        "attn.out": TapSpec("attn.c_proj", "output"),
        "resid.mid": TapSpec("ln_2", "input"),
        "mlp.norm_std": TapSpec("ln_2", "input", layer_standardize),
        "mlp.norm": TapSpec("ln_2", "output"),
        "mlp.gate": TapSpec("mlp.c_fc", "output"),
        "mlp.act": TapSpec("mlp.act", "output"),
        "mlp.hidden": TapSpec("mlp.c_proj", "input"),
        "mlp.out": TapSpec("mlp.c_proj", "output"),
        "resid.post": TapSpec("", "output"),
    },
    rotation_blocker="its LayerNorm subtracts the mean, which does not commute with a rotation",
)
