"""What the gated-MLP families (Llama, Qwen2, Mistral, Gemma3) share: the projection names, the weights,
and the tap table up to where their norms differ."""

from __future__ import annotations

from outlier_study.adapters.base import ATTENTION, Derive, TapSpec, WeightSpec

WEIGHTS: dict[str, WeightSpec] = {
    "q": WeightSpec("self_attn.q_proj"),
    "k": WeightSpec("self_attn.k_proj"),
    "v": WeightSpec("self_attn.v_proj"),
    "o": WeightSpec("self_attn.o_proj"),
    "gate": WeightSpec("mlp.gate_proj"),
    "up": WeightSpec("mlp.up_proj"),
    "down": WeightSpec("mlp.down_proj"),
}
ATTN_READERS = ("q", "k", "v")
MLP_READERS = ("gate", "up")


def gated_taps(attn_norm: str, mlp_norm: str, standardize: Derive) -> dict[str, TapSpec]:
    """The tap table of a pre-norm decoder layer with a gated MLP; `mlp_norm` is the norm the MLP reads
    (its input is resid.mid), `standardize` the norm without its γ."""
    return {
        "resid.pre": TapSpec("", "input"),
        "attn.norm_std": TapSpec(attn_norm, "input", standardize),
        "attn.norm": TapSpec(attn_norm, "output"),
        "attn.q": TapSpec("self_attn.q_proj", "output"),
        "attn.k": TapSpec("self_attn.k_proj", "output"),
        "attn.v": TapSpec("self_attn.v_proj", "output"),
        "attn.scores": ATTENTION,
        "attn.probs": ATTENTION,
        "attn.ctx": TapSpec("self_attn.o_proj", "input"),
        "attn.out": TapSpec("self_attn.o_proj", "output"),
        "resid.mid": TapSpec(mlp_norm, "input"),
        "mlp.norm_std": TapSpec(mlp_norm, "input", standardize),
        "mlp.norm": TapSpec(mlp_norm, "output"),
        "mlp.gate": TapSpec("mlp.gate_proj", "output"),
        "mlp.up": TapSpec("mlp.up_proj", "output"),
        "mlp.act": TapSpec("mlp.act_fn", "output"),
        "mlp.hidden": TapSpec("mlp.down_proj", "input"),
        "mlp.out": TapSpec("mlp.down_proj", "output"),
        "resid.post": TapSpec("", "output"),
    }
