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
