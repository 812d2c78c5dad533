"""What a family's module names cannot say, as tables keyed by `config.model_type`.

Everything else about a decoder layer is read off its modules (`adapters/structure.py`); a family appears
here only for a real deviation from the common layout, and each deviation is one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from outlier_study.adapters.base import ResidualAdd

Predicate = Callable[[Any], bool]


def _always(_config: Any) -> bool:
    return True


def _flag(name: str, default: bool = False) -> Predicate:
    return lambda config: bool(getattr(config, name, default))


def _falcon_parallel(config: Any) -> bool:
    return bool(config.parallel_attn or config.new_decoder_architecture)


# Parallel blocks: attention and MLP both read the layer input; one residual add, no resid.mid.
PARALLEL: dict[str, Predicate] = {
    "gpt_neox": _flag("use_parallel_residual", True),
    "gpt_neox_japanese": _always,
    "stablelm": _flag("use_parallel_residual"),
    "phi": _always,
    "gptj": _always,
    "codegen": _always,
    "cohere": _always,
    "cohere2": _always,
    "cohere2_moe": _always,
    "cohere_compass_text": _always,
    "falcon": _falcon_parallel,
}

# How a parallel block sums its three terms, for bit-exact rebuilding: "(x+a)+m" or "x+(a+m)" (addition
# of two floats commutes, so (m+a)+x is x+(a+m)).
PARALLEL_SUM: dict[str, str] = {
    "gpt_neox": "x+(a+m)",
    "gpt_neox_japanese": "x+(a+m)",
    "phi": "x+(a+m)",
    "gptj": "x+(a+m)",
    "codegen": "x+(a+m)",
    "falcon": "x+(a+m)",
    "cohere": "(x+a)+m",
    "cohere2": "(x+a)+m",
    "cohere2_moe": "(x+a)+m",
    "cohere_compass_text": "(x+a)+m",
    "stablelm": "(x+a)+m",
}

# Norms that scale by (1 + weight) instead of weight.
GAMMA_OFFSET: dict[str, float] = {
    "gemma": 1.0,
    "gemma2": 1.0,
    "gemma3": 1.0,
    "gemma3_text": 1.0,
    "vaultgemma": 1.0,
    "nemotron": 1.0,  # LayerNorm1P
}


def _minicpm3_scale(config: Any) -> float:
    return float(config.scale_depth) / math.sqrt(int(config.num_hidden_layers))


# Residual branches scaled before the add: resid.mid = resid.pre + scale · branch; a config field, or a
# function of the config (the same scale for both adds of every layer).
BRANCH_SCALE: dict[str, str | Callable[[Any], float]] = {
    "minicpm3": _minicpm3_scale,
    "granite": "residual_multiplier",
    "granitemoe": "residual_multiplier",
    "granitemoeshared": "residual_multiplier",
    "granite_swa": "residual_multiplier",
    "granitemoe_swa": "residual_multiplier",
    "hyperclovax": "residual_multiplier",
}

# A norm between act(gate)·up and down_proj (inside the MLP, relative to the layer): mlp.hidden is its output.
MLP_SUB_NORM: dict[str, str] = {"bitnet": "mlp.ffn_sub_norm"}

# Attention maps that the attention interface cannot give as one map per layer (the function runs twice).
NO_ATTENTION_MAPS: dict[str, str] = {"diffllama": "differential attention runs the attention function twice"}


def _depth_scaled_add(index: int) -> ResidualAdd:
    """The index-th residual add of the stack (index 2 is layer 0's attention add), as Beam writes it."""
    return ResidualAdd(skip=math.sqrt((index - 1) / index), scale=1.0 / math.sqrt(index))


# Residual adds whose skip and branch scales depend on the layer: model_type -> layer -> (attn, mlp).
DEPTH_SCALED: dict[str, Callable[[int], tuple[ResidualAdd, ResidualAdd]]] = {
    "beam": lambda layer: (_depth_scaled_add(2 * (layer + 1)), _depth_scaled_add(2 * (layer + 1) + 1)),
}


def parallel(model_type: str, config: Any) -> bool:
    return PARALLEL.get(model_type, lambda _c: False)(config)


def branch_scale(model_type: str, config: Any) -> float:
    rule = BRANCH_SCALE.get(model_type)
    if rule is None:
        return 1.0
    return rule(config) if callable(rule) else float(getattr(config, rule, 1.0) or 1.0)


def residual_adds(model_type: str, config: Any, n_layers: int) -> tuple[tuple[ResidualAdd, ResidualAdd], ...]:
    """Each layer's (attention, MLP) residual add; () when every add is a plain x + branch."""
    if model_type in DEPTH_SCALED:
        return tuple(DEPTH_SCALED[model_type](layer) for layer in range(n_layers))
    scale = branch_scale(model_type, config)
    return () if scale == 1.0 else ((ResidualAdd(scale=scale),) * 2,) * n_layers
