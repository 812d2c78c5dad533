"""The architecture-neutral tap vocabulary: canonical names in forward order, synonyms, paper aliases."""

from __future__ import annotations

# Canonical taps in forward order. Layers own every tap; numbering starts at 0.
CANONICAL_TAPS: tuple[str, ...] = (
    "resid.pre",
    "attn.norm_std",
    "attn.norm",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.q_norm",
    "attn.k_norm",
    "attn.q_a",
    "attn.kv_a",
    "attn.scores",
    "attn.probs",
    "attn.ctx",
    "attn.out",
    "attn.post_norm",
    "resid.mid",
    "mlp.norm_std",
    "mlp.norm",
    "moe.router_logits",
    "moe.router_probs",
    "mlp.gate",
    "mlp.up",
    "mlp.act",
    "mlp.hidden",
    "mlp.out",
    "mlp.post_norm",
    "ple.out",
    "resid.post",
)

# Synonyms that name the same point in every architecture.
SYNONYMS: dict[str, str] = {"attn.in": "resid.pre", "mlp.in": "resid.mid"}

# Not module boundaries: reached through transformers' attention interface, and only when asked for.
ATTENTION_TAPS: frozenset[str] = frozenset({"attn.scores", "attn.probs"})

# The residual stream itself (inputs and outputs of the sublayers).
RESIDUAL_TAPS: tuple[str, ...] = ("resid.pre", "resid.mid", "resid.post")

# The paper's names (x1..x9 attention, y1..y7 MLP) for gated-MLP models.
PAPER_ALIASES: dict[str, str] = {
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

# Mixture-of-experts layers: the MLP taps of one expert are keyed "<tap>@<expert>" (an index, or "shared"
# for the shared experts); the plain tap of a MoE layer pools every routed (token, expert) pair.
EXPERT_TAPS: tuple[str, ...] = ("mlp.gate", "mlp.up", "mlp.act", "mlp.hidden", "mlp.out")
SHARED_EXPERT = "shared"
ROUTING = "moe.routing"  # per (token, expert) routing weight, valid where routed: the load per expert


def expert_key(tap: str, expert: int | str) -> str:
    """The statistics key of `tap` inside one expert."""
    return f"{tap}@{expert}"


def split_expert(key: str) -> tuple[str, str | None]:
    """(tap, expert) of a statistics key; expert is None for a layer-level tap."""
    tap, _, expert = key.partition("@")
    return tap, expert or None
