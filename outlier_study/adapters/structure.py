"""Derive a family's adapter from its decoder layer's module names.

Decoders of transformers share a small vocabulary of module names (q_proj / query_key_value / c_attn,
gate_proj / fc1 / dense_h_to_4h, input_layernorm / ln_1, ...). Each role below lists the names that play
it; the derivation finds them in a model built on the meta device from the config alone (no weights),
then writes the same declarative `Adapter` a hand-written family file would. What names cannot say
(parallel blocks, γ offsets, scaled branches) comes from the tables of `adapters/deviations.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from outlier_study.adapters import deviations
from outlier_study.adapters.base import ATTENTION, EXPERTS, Adapter, NormSpec, TapSpec, WeightSpec
from outlier_study.adapters.derived_taps import Rows, flatten_heads, layer_standardize, standardizer
from outlier_study.adapters.experts import MoESpec, find_moe
from outlier_study.adapters.linears import is_linear, weight_out_in
from outlier_study.adapters.taps import EXPERT_TAPS, PAPER_ALIASES
from outlier_study.errors import ConfigError

# ---------------------------------------------------------------- the role vocabulary

ATTN_ROOTS = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention")
MLP_ROOTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
Q = ("q_proj", "query", "Wq")
K = ("k_proj", "key", "Wk")
V = ("v_proj", "value", "Wv")
OUT = ("o_proj", "out_proj", "dense", "c_proj", "o")
QKV = ("qkv_proj", "query_key_value", "Wqkv", "c_attn", "qkv", "W_pack")
MLA_Q_A, MLA_Q_B, MLA_KV_A = ("q_a_proj",), ("q_b_proj",), ("kv_a_proj_with_mqa",)
GATE = ("gate_proj", "w1")
UP = ("up_proj", "w3")
GATE_UP = ("gate_up_proj",)
# The first linear of an ungated MLP, and the down projection ("0" / "2": CTRL's MLP is an nn.Sequential).
FIRST = ("fc1", "c_fc", "dense_h_to_4h", "fc_in", "up_proj", "w1", "0")
DOWN = ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "2")
ACT = ("act_fn", "act", "activation_fn", "activation", "gelu_impl", "1")
Q_NORM = ("q_norm", "q_layernorm")
K_NORM = ("k_norm", "k_layernorm")
ATTN_PRE = (
    "input_layernorm",
    "ln_1",
    "norm_1",
    "self_attn_layer_norm",
    "attention_norm",
    "ln_attn",
    "attn_norm",
    "attention_layernorm",
    "layernorm1",
)
MLP_PRE = (
    "pre_feedforward_layernorm",
    "pre_mlp_layernorm",
    "ln_2",
    "norm_2",
    "final_layer_norm",
    "ffn_norm",
    "feedforward_layernorm",
    "layernorm2",
)
MLP_PRE_PARALLEL = ("ln_mlp",)
ATTN_POST = ("post_self_attn_layernorm", "post_norm1")
MLP_POST = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_norm2")
AMBIGUOUS = "post_attention_layernorm"  # the MLP's pre-norm, or (with post-MLP norms) attention's post-norm
PLE_OUT = ("post_per_layer_input_norm",)  # the last module of Gemma 4's per-layer input branch
OUTPUT_SCALES = ("layer_scalar",)  # a buffer scaling the layer's whole output
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm", "final_norm")

# Fused q/k/v projections whose output is [q | k | v] in contiguous blocks (others interleave per head).
QKV_BLOCKS: dict[str, str] = {"phi3": "qkv_proj", "gpt2": "c_attn", "gpt_bigcode": "c_attn", "mpt": "Wqkv"}


# ---------------------------------------------------------------- the derivation


class _Layer:
    """Name lookups inside one decoder layer."""

    def __init__(self, layer: nn.Module) -> None:
        self.modules = dict(layer.named_modules())
        self.buffers = dict(layer.named_buffers(recurse=False))  # the layer's own, not its modules'

    def first(self, root: str, names: Sequence[str], linear: bool | None = None) -> str | None:
        """The shallowest module under `root` whose last name is one of `names` (in their order)."""
        prefix = f"{root}." if root else ""
        for name in names:
            found = [
                p
                for p, m in self.modules.items()
                if p.startswith(prefix)
                and p.rsplit(".", 1)[-1] == name
                and (linear is None or is_linear(m) == linear)
            ]
            if found:
                return min(found, key=lambda p: p.count("."))
        return None

    def child(self, names: Sequence[str]) -> str | None:
        return next((n for n in names if n in self.modules and "." not in n), None)


def _norm_roles(lay: _Layer, parallel: bool) -> dict[str, str | None]:
    post_mlp = lay.child(MLP_POST)
    attn_pre = lay.child(ATTN_PRE)
    mlp_pre = lay.child(MLP_PRE) or (lay.child(MLP_PRE_PARALLEL) if parallel else None)
    attn_post = lay.child(ATTN_POST)
    if AMBIGUOUS in lay.modules:
        if post_mlp is not None and mlp_pre is None and attn_post is None and not parallel:
            attn_post = AMBIGUOUS  # OLMo-2 / EXAONE-4: post-norms only
        elif post_mlp is not None and mlp_pre is not None:
            attn_post = AMBIGUOUS  # Gemma-2/3: sandwich norms
        elif mlp_pre is None:
            mlp_pre = AMBIGUOUS
    return {"attn": attn_pre, "mlp": mlp_pre, "attn_post": attn_post, "mlp_post": post_mlp}


def _attention(
    lay: _Layer, model_type: str, config: Any, taps: dict[str, TapSpec], weights: dict[str, WeightSpec]
) -> str:
    root = lay.child(ATTN_ROOTS)
    if root is None:
        raise ConfigError(
            "model", f"{model_type}: no attention module ({'/'.join(ATTN_ROOTS)}) in its layers"
        )
    q, k, v = (lay.first(root, names, linear=True) for names in (Q, K, V))
    qkv = lay.first(root, QKV, linear=True)
    q_a, q_b, kv_a = (lay.first(root, n, linear=True) for n in (MLA_Q_A, MLA_Q_B, MLA_KV_A))
    if kv_a is not None:  # latent attention: low-rank q and kv, keys and values made per head from kv_a
        if q_a is not None:
            taps["attn.q_a"] = TapSpec(q_a, "output")
            weights["q_a"] = WeightSpec(q_a)
        q = q_b or q
        taps["attn.kv_a"] = TapSpec(kv_a, "output")
        weights["kv_a"] = WeightSpec(kv_a)
        kv_b = lay.first(root, ("kv_b_proj",), linear=True)
        if kv_b:
            weights["kv_b"] = WeightSpec(kv_b)
        if q:
            taps["attn.q"] = TapSpec(q, "output")
            weights["q"] = WeightSpec(q)
    elif q and k and v:
        for tap, path in (("attn.q", q), ("attn.k", k), ("attn.v", v)):
            taps[tap] = TapSpec(path, "output")
            weights[tap[-1]] = WeightSpec(path)
    elif qkv is not None:
        weights["qkv"] = WeightSpec(qkv)
        if QKV_BLOCKS.get(model_type) == qkv.rsplit(".", 1)[-1]:
            size = weight_out_in(lay.modules[qkv]).shape[0]  # type: ignore[arg-type]
            q_rows, kv_rows = _qkv_rows(config, size)
            bounds = (0, q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows)
            for i, tap in enumerate(("attn.q", "attn.k", "attn.v")):
                taps[tap] = TapSpec(qkv, "output", Rows(bounds[i], bounds[i + 1]))
                weights[tap[-1]] = WeightSpec(qkv, bounds[i], bounds[i + 1])
    else:
        raise ConfigError("model", f"{model_type}: no q/k/v projections found in {root}")
    o = lay.first(root, OUT, linear=True)
    if o is None:
        raise ConfigError("model", f"{model_type}: no attention output projection found in {root}")
    if model_type not in deviations.NO_ATTENTION_MAPS:
        taps["attn.scores"] = taps["attn.probs"] = ATTENTION
    taps["attn.ctx"] = TapSpec(o, "input")
    taps["attn.out"] = TapSpec(o, "output")
    weights["o"] = WeightSpec(o)
    for tap, names in (("attn.q_norm", Q_NORM), ("attn.k_norm", K_NORM)):
        # the attention's own per-head norms, not those of a sub-module (e.g. a sparse-attention indexer)
        path = next((f"{root}.{n}" for n in names if f"{root}.{n}" in lay.modules), None)
        if path is not None and getattr(lay.modules[path], "weight", None) is not None:
            taps[tap] = TapSpec(path, "output", flatten_heads)
    return root


def _qkv_rows(config: Any, size: int) -> tuple[int, int]:
    """(q rows, k rows = v rows) of a fused [q | k | v] projection with `size` output rows."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    q_rows = heads * int(head_dim)
    return q_rows, (size - q_rows) // 2


def _mlp(
    lay: _Layer, model_type: str, taps: dict[str, TapSpec], weights: dict[str, WeightSpec]
) -> tuple[str, bool]:
    """The MLP's taps and weights; returns (its root, whether it is gated)."""
    root = lay.child(MLP_ROOTS) or ""
    gate, up = lay.first(root, GATE, linear=True), lay.first(root, UP, linear=True)
    gate_up = lay.first(root, GATE_UP, linear=True)
    down = lay.first(root, DOWN, linear=True)
    act = lay.first(root, ACT, linear=False)
    gated = bool((gate and up) or gate_up)
    if gate and up:
        taps["mlp.gate"], taps["mlp.up"] = TapSpec(gate, "output"), TapSpec(up, "output")
        weights["gate"], weights["up"] = WeightSpec(gate), WeightSpec(up)
    elif gate_up:
        rows = weight_out_in(lay.modules[gate_up]).shape[0] // 2  # type: ignore[arg-type]
        taps["mlp.gate"] = TapSpec(gate_up, "output", Rows(0, rows))
        taps["mlp.up"] = TapSpec(gate_up, "output", Rows(rows, 2 * rows))
        weights["gate"], weights["up"] = WeightSpec(gate_up, 0, rows), WeightSpec(gate_up, rows, 2 * rows)
    else:
        first = lay.first(root, FIRST, linear=True)
        if first is None or down is None:
            raise ConfigError("model", f"{model_type}: no MLP projections found in its layers")
        taps["mlp.gate"] = TapSpec(first, "output")  # an ungated MLP's first projection plays y3
        weights["gate"] = WeightSpec(first)
    if down is None:
        raise ConfigError("model", f"{model_type}: no MLP down projection found in its layers")
    if act is not None:
        taps["mlp.act"] = TapSpec(act, "output")
    taps["mlp.hidden"] = TapSpec(down, "input")
    taps["mlp.out"] = TapSpec(down, "output")
    weights["down"] = WeightSpec(down)
    return root, gated


def _moe_taps(spec: MoESpec, dense: dict[str, TapSpec]) -> dict[str, TapSpec]:
    """A MoE layer's taps: the block's output is mlp.out; the experts' own taps come from the experts
    capture (pooled over experts), the router's from its module."""
    skip = {"mlp.out", "mlp.act"} if spec.custom_gate else {"mlp.out"}  # a custom gate has no separate act
    taps = {t: EXPERTS for t in EXPERT_TAPS if t not in skip}
    taps["mlp.out"] = TapSpec(spec.block, "output")
    taps["moe.router_logits"] = taps["moe.router_probs"] = EXPERTS
    merged = {**dense, **taps}
    return {t: v for t, v in merged.items() if not (t == "mlp.act" and spec.custom_gate)}


def derive(model_type: str, config: Any, model: nn.Module, n_layers: int) -> Adapter:
    """The adapter of a model built (on the meta device is enough) from `config`."""
    layers_path = _layers_path(model, n_layers, model_type)
    blocks = model.get_submodule(layers_path)
    moe = {i: s for i, b in enumerate(blocks) if (s := find_moe(b)) is not None}
    if any(not s.block for s in moe.values()):
        raise ConfigError(
            "model",
            f"{model_type}: experts beside a dense MLP in the decoder layer itself (a dense MLP and a "
            "mixture of experts side by side) are not described yet",
        )
    dense_layers = [i for i in range(n_layers) if i not in moe]
    lay = _Layer(blocks[dense_layers[0] if dense_layers else 0])
    parallel = deviations.parallel(model_type, config)
    norms = _norm_roles(lay, parallel)
    taps: dict[str, TapSpec] = {"resid.pre": TapSpec("", "input")}
    weights: dict[str, WeightSpec] = {}
    attn_norm, mlp_norm = norms["attn"], norms["mlp"]
    if attn_norm:
        std = standardizer(lay.modules[attn_norm])
        taps["attn.norm_std"] = TapSpec(attn_norm, "input", std)
        taps["attn.norm"] = TapSpec(attn_norm, "output")
    _attention(lay, model_type, config, taps, weights)
    if norms["attn_post"]:
        taps["attn.post_norm"] = TapSpec(norms["attn_post"], "output")
    if dense_layers:
        mlp_root, gated = _mlp(lay, model_type, taps, weights)
    else:
        mlp_root, gated = moe[0].block, True
    if not parallel:
        taps["resid.mid"] = TapSpec(mlp_norm, "input") if mlp_norm else TapSpec(mlp_root, "input")
    if mlp_norm:
        taps["mlp.norm_std"] = TapSpec(mlp_norm, "input", standardizer(lay.modules[mlp_norm]))
        taps["mlp.norm"] = TapSpec(mlp_norm, "output")
    elif parallel and attn_norm:  # one norm feeds both sublayers
        taps["mlp.norm_std"], taps["mlp.norm"] = taps["attn.norm_std"], taps["attn.norm"]
    if norms["mlp_post"]:
        taps["mlp.post_norm"] = TapSpec(norms["mlp_post"], "output")
    if ple := lay.child(PLE_OUT):
        taps["ple.out"] = TapSpec(ple, "output")
    taps["resid.post"] = TapSpec("", "output")
    if not dense_layers:
        taps = _moe_taps(moe[0], taps)
    first_q = ("q_a",) if "q_a" in weights else ("q",)  # latent attention: q_b reads q_a's own norm
    attn_readers = tuple(w for w in (*first_q, "k", "v", "qkv", "kv_a") if w in weights)
    mlp_readers = tuple(w for w in ("gate", "up") if w in weights)
    specs: dict[str, NormSpec] = {}
    if attn_norm:
        shared = parallel and not mlp_norm
        specs["attn"] = NormSpec(attn_norm, "attn.norm", attn_readers + (mlp_readers if shared else ()))
    if mlp_norm:
        specs["mlp"] = NormSpec(mlp_norm, "mlp.norm", mlp_readers)
    if norms["attn_post"]:
        specs["attn_post"] = NormSpec(norms["attn_post"], "attn.post_norm")
    if norms["mlp_post"]:
        specs["mlp_post"] = NormSpec(norms["mlp_post"], "mlp.post_norm")
    for key, tap in (("q_norm", "attn.q_norm"), ("k_norm", "attn.k_norm")):
        if tap in taps:
            specs[key] = NormSpec(taps[tap].module, tap)
    return Adapter(
        family=model_type,
        model_types=(model_type,),
        taps=taps,
        aliases=PAPER_ALIASES if gated else UNGATED_ALIASES,
        layers_path=layers_path,
        final_norm=_final_norm(model, layers_path),
        norms=specs,
        weights=weights,
        gamma_offset=deviations.GAMMA_OFFSET.get(model_type, 0.0),
        parallel=parallel,
        parallel_sum=deviations.PARALLEL_SUM.get(model_type, "(x+a)+m"),
        residual_adds=deviations.residual_adds(model_type, config, n_layers),
        output_scale=next((n for n in OUTPUT_SCALES if n in lay.buffers), ""),
        moe=moe,
        moe_taps=_moe_taps(next(iter(moe.values())), taps) if moe and dense_layers else {},
        rotation_blocker=_rotation_blocker(lay, norms, parallel, weights, taps, moe),
        absent=_absent(model_type, taps, weights, parallel),
    )


def _absent(
    model_type: str, taps: dict[str, TapSpec], weights: dict[str, WeightSpec], parallel: bool
) -> dict[str, str]:
    """Why each of the paper's taps this family lacks does not apply."""
    reasons = {
        "attn.norm": "no norm before attention: it reads the residual stream",
        "attn.q": "latent attention: queries come from q_b_proj" if "kv_a" in weights else "",
        "attn.k": "latent attention: keys are made per head from kv_a" if "kv_a" in weights else "",
        "attn.v": "latent attention: values are made per head from kv_a" if "kv_a" in weights else "",
        "resid.mid": "parallel block: one residual add for attention and MLP" if parallel else "",
        "mlp.norm": "no norm before the MLP: it reads the residual stream",
        "mlp.up": "ungated MLP: one projection before the activation",
        "mlp.act": "the activation is a function, not a module",
    }
    fused = "q, k, v are interleaved per head in one fused projection"
    out = {}
    for tap, why in reasons.items():
        if tap not in taps:
            out[tap] = why or (fused if tap.startswith("attn.") and "qkv" in weights else "not found")
    if model_type in deviations.NO_ATTENTION_MAPS:
        out["attn.scores"] = out["attn.probs"] = deviations.NO_ATTENTION_MAPS[model_type]
    if "attn.norm" in out:
        out["attn.norm_std"] = out["attn.norm"]
    if "mlp.norm" in out:
        out["mlp.norm_std"] = out["mlp.norm"]
    return out


# The paper calls an ungated MLP's down-projection input "y4" (GPT-2 tables) and "y6" (Table 2).
UNGATED_ALIASES = {k: v for k, v in PAPER_ALIASES.items() if v != "mlp.up"} | {"y4": "mlp.hidden"}


def _layers_path(model: nn.Module, n_layers: int, model_type: str) -> str:
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path
    raise ConfigError("model", f"{model_type}: no list of {n_layers} decoder layers in the model")


def _final_norm(model: nn.Module, layers_path: str) -> str:
    inside = layers_path + "."
    found = [
        p
        for p, _ in model.named_modules()
        if p.rsplit(".", 1)[-1] in FINAL_NORMS and not p.startswith(inside)
    ]
    return min(found, key=lambda p: p.count(".")) if found else ""


def _rotation_blocker(
    lay: _Layer,
    norms: dict[str, str | None],
    parallel: bool,
    weights: dict[str, WeightSpec],
    taps: dict[str, TapSpec],
    moe: dict,
) -> str | None:
    """Why the exact rotation (quant/rotation.py) does not apply to this family (None: it does)."""
    if moe:
        return "its experts are fused 3-D parameters the rotation does not rotate yet"
    if not norms["attn"] or not norms["mlp"] and not parallel:
        return "a sublayer reads the residual stream without a norm"
    if parallel:
        return "its attention and MLP run in parallel, which the rotation does not fold yet"
    if "v" not in weights:
        return "its values are no block of projection rows (interleaved or latent), so R2 has nothing to fold"
    if "ple.out" in taps:
        return "its per-layer input branch writes into the residual stream unrotated"
    pre = [lay.modules[n] for n in (norms["attn"], norms["mlp"]) if n]
    layernorm = any(standardizer(m) is layer_standardize for m in pre)
    if layernorm and (norms["attn_post"] or norms["mlp_post"]):
        return "its post-sublayer norms would leave the stream off mean zero, which its LayerNorms need"
    return None
