"""Architecture-neutral tap vocabulary and the adapter contract each architecture file fills in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from outlier_study.errors import ConfigError

# Canonical taps in forward order (DESIGN §2). Layers own every tap; numbering starts at 0.
CANONICAL_TAPS: tuple[str, ...] = (
    "resid.pre",
    "attn.norm_std",
    "attn.norm",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.probs",
    "attn.ctx",
    "attn.out",
    "attn.post_norm",
    "resid.mid",
    "mlp.norm_std",
    "mlp.norm",
    "mlp.gate",
    "mlp.up",
    "mlp.act",
    "mlp.hidden",
    "mlp.out",
    "mlp.post_norm",
    "resid.post",
)

# Synonyms that name the same point in every architecture.
SYNONYMS: dict[str, str] = {"attn.in": "resid.pre", "mlp.in": "resid.mid"}

ATTENTION_TAPS: frozenset[str] = frozenset({"attn.scores", "attn.probs"})

# The paper's names (x1..x9 attention, y1..y7 MLP) for gated-MLP models.
PAPER_ALIASES_GATED: dict[str, str] = {
    "x1": "resid.pre",
    "x2": "attn.norm",
    "x3": "attn.q",
    "x4": "attn.k",
    "x5": "attn.v",
    "x6": "attn.scores",
    "x7": "attn.probs",
    "x8": "attn.ctx",
    "x9": "attn.out",
    "y1": "resid.mid",
    "y2": "mlp.norm",
    "y3": "mlp.gate",
    "y4": "mlp.up",
    "y5": "mlp.act",
    "y6": "mlp.hidden",
    "y7": "mlp.out",
}

Standardize = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TapSpec:
    """Where a tap lives: a module path inside the decoder layer ("" = the layer), its input or output,
    and an optional pure function deriving the tap from that tensor (e.g. a third of GPT-2's c_attn)."""

    module: str
    io: Literal["input", "output"]
    derive: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


ATTENTION = TapSpec(module="<attention-function>", io="output")  # reached through AttentionInterface


@dataclass(frozen=True)
class WeightSpec:
    """A weight matrix of a decoder layer: module path, and which of `parts` equal row blocks of its
    (out, in) view it is (GPT-2's fused c_attn holds q, k and v as thirds)."""

    module: str
    part: int = 0
    parts: int = 1


# Weight names shared by the gated-MLP families (Llama, Qwen2, Mistral, Gemma3).
GATED_WEIGHTS: dict[str, WeightSpec] = {
    "q": WeightSpec("self_attn.q_proj"),
    "k": WeightSpec("self_attn.k_proj"),
    "v": WeightSpec("self_attn.v_proj"),
    "o": WeightSpec("self_attn.o_proj"),
    "gate": WeightSpec("mlp.gate_proj"),
    "up": WeightSpec("mlp.up_proj"),
    "down": WeightSpec("mlp.down_proj"),
}


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one architecture family."""

    family: str
    model_types: tuple[str, ...]
    taps: dict[str, TapSpec]
    aliases: dict[str, str]
    layers_path: str  # dotted path from the CausalLM to its list of decoder layers
    gamma_offset: float = 0.0  # Gemma RMSNorm scales by (1 + weight)
    norms: dict[str, str] = field(default_factory=dict)  # "attn" / "mlp" -> norm module path in a layer
    weights: dict[str, WeightSpec] = field(default_factory=dict)  # "q", "k", ..., "down" -> where it lives

    def canonical(self, name: str) -> str:
        """Resolve a canonical tap, synonym or paper alias; reject names this architecture lacks."""
        tap = self.aliases.get(name) or SYNONYMS.get(name) or name
        if tap not in CANONICAL_TAPS:
            known = sorted(set(CANONICAL_TAPS) | set(SYNONYMS) | set(self.aliases))
            raise ConfigError("taps", f"unknown tap '{name}'", allowed=known)
        if tap not in self.taps:
            raise ConfigError(
                "taps", f"tap '{name}' does not exist in {self.family} models", allowed=self.available()
            )
        return tap

    def available(self) -> list[str]:
        """Taps of this architecture, in forward order."""
        return [t for t in CANONICAL_TAPS if t in self.taps]

    def residual_branches(self) -> tuple[str, str]:
        """The taps that attention and MLP add to the residual stream (Gemma3 adds post-normed outputs)."""
        if "attn.post_norm" in self.taps:
            return "attn.post_norm", "mlp.post_norm"
        return "attn.out", "mlp.out"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def norm_names(self, name: str, field_name: str) -> list[str]:
        """Norm keys for a config value: one of `norms`, or "both" = attn and mlp."""
        allowed = [*self.norms, "both"]
        if name not in allowed:
            raise ConfigError(field_name, f"no norm '{name}' in {self.family} models", allowed=allowed)
        return ["attn", "mlp"] if name == "both" else [name]

    def weight_name(self, name: str, field_name: str) -> str:
        if name not in self.weights:
            raise ConfigError(field_name, f"unknown matrix '{name}' for {self.family}", allowed=self.weights)
        return name


def resolve_taps(adapter: Adapter, names: list[str] | None) -> list[str]:
    """Canonical taps in forward order; default: all except attention scores/probs (they cost a QKᵀ)."""
    if names is None:
        return [t for t in adapter.available() if t not in ATTENTION_TAPS]
    wanted = {adapter.canonical(str(n)) for n in names}
    if not wanted:
        raise ConfigError("taps", "empty tap list", allowed=adapter.available())
    return [t for t in adapter.available() if t in wanted]


def resolve_layers(n_layers: int, layers: list[int] | None, field_name: str = "layers") -> list[int]:
    """Layer indices (from 0); negative indices count from the end like Python."""
    if layers is None:
        return list(range(n_layers))
    out: list[int] = []
    for raw in layers:
        idx = int(raw)
        if not -n_layers <= idx < n_layers:
            raise ConfigError(field_name, f"layer {idx} out of range", allowed=[f"0..{n_layers - 1}"])
        out.append(idx % n_layers)
    return sorted(set(out))


def rms_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without γ, computed as the HF Llama-style norm does before its weight multiply."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def layer_standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without γ and β."""
    return nn.functional.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
