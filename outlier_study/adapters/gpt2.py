"""GPT-2: pre-LayerNorm (with β), fused c_attn, GeLU MLP without an up projection."""

from __future__ import annotations

import torch
from torch import nn

from outlier_study.adapters.base import (
    ATTENTION,
    PAPER_ALIASES_GATED,
    Adapter,
    TapSpec,
    WeightSpec,
    layer_standardize,
)


def _third(index: int) -> object:
    def derive(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(3, dim=-1)[index]

    return derive


# The paper calls GPT-2's c_proj input "y4" in its GPT-2 tables and "y6" in Table 2.
GPT2_ALIASES = {k: v for k, v in PAPER_ALIASES_GATED.items() if v != "mlp.up"} | {"y4": "mlp.hidden"}

ADAPTER = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    aliases=GPT2_ALIASES,
    norms={"attn": "ln_1", "mlp": "ln_2"},
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
        "attn.q": TapSpec("attn.c_attn", "output", _third(0)),  # type: ignore[arg-type]
        "attn.k": TapSpec("attn.c_attn", "output", _third(1)),  # type: ignore[arg-type]
        "attn.v": TapSpec("attn.c_attn", "output", _third(2)),  # type: ignore[arg-type]
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
)
