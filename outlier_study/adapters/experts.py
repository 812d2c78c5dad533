"""Mixture-of-experts layers, found from the module layout: where the sparse block, its fused experts, its
router and its shared experts are inside a decoder layer, and how the experts store their weights.

In transformers 5 the routed experts of a layer are one module holding 3-D parameters (`gate_up_proj` or
`up_proj`, and `down_proj`, one slice per expert), run through the experts implementation the config
names (`use_experts_implementation`); the decorator records the storage layout on the module
(`has_gate`, `is_transposed`, `has_bias`, `is_concatenated`, `has_post_expert_norm`). Nothing here is
per family: `find_moe` reads the parameters' shapes and those flags.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

from outlier_study.adapters.taps import SHARED_EXPERT

Expert = int | str  # an index, or SHARED_EXPERT
MATRICES = ("gate", "up", "down")


@dataclass(frozen=True)
class SharedSpec:
    """The shared experts: an ordinary MLP beside the routed ones (paths inside it, "" when absent)."""

    path: str  # the shared MLP, inside the decoder layer
    gate: str  # its gate linear ("" when it has none)
    up: str  # its up linear ("" when it has none)
    down: str  # its down linear
    act: str  # the attribute holding its activation function ("" when unknown)
    gated_by: str | None = None  # a sibling Linear(hidden, 1) whose sigmoid scales the shared output


@dataclass(frozen=True)
class MoESpec:
    """One sparse MLP block of a decoder layer. Paths are inside the decoder layer."""

    block: str  # the sparse block (its input is what the router and the experts read)
    experts: str  # the fused experts module (3-D parameters)
    router: str  # the router module (called on the block input)
    router_weight: str  # the module holding the router's (num_experts, hidden) weight (the router or a child)
    shared: SharedSpec | None
    num_experts: int
    hidden: int
    intermediate: int  # width of one expert's hidden layer (what down_proj reads)
    has_gate: bool  # gate_up_proj (gate and up fused) rather than up_proj alone
    is_transposed: bool  # slices stored (in, out) rather than (out, in)
    has_bias: bool  # gate_up_proj_bias / up_proj_bias and down_proj_bias
    is_concatenated: bool  # gate_up rows as [gate; up] rather than interleaved [g0, u0, g1, u1, ...]
    has_post_expert_norm: bool  # a norm on each expert's output before the routing weight
    custom_gate: bool  # the class defines its own _apply_gate: act(gate) is not a separate step
    interface: bool  # dispatched through transformers' ExpertsInterface (else: not capturable)
    scoring: Literal["softmax", "sigmoid"]  # how the router turns logits into per-expert scores

    @property
    def separable(self) -> bool:
        """mlp.act exists as its own tensor (act(gate) before the product, or act(up) without a gate)."""
        return not self.custom_gate

    def expert_names(self) -> list[str]:
        """Every expert of the layer as the config value names it: indices, then "shared" if present."""
        return [str(e) for e in range(self.num_experts)] + ([SHARED_EXPERT] if self.shared else [])


def _params3d(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _is_experts(module: nn.Module) -> bool:
    """Fused experts: 3-D down_proj and gate_up_proj or up_proj with the experts on dim 0."""
    p = _params3d(module)
    up = p.get("gate_up_proj", p.get("up_proj"))
    return "down_proj" in p and up is not None and up.shape[0] == p["down_proj"].shape[0]


def _dispatches(module: nn.Module) -> bool:
    """The class is wrapped by `use_experts_implementation` (its forward dispatches on the config)."""
    forward = type(module).forward
    return hasattr(forward, "__wrapped__") and hasattr(module, "is_transposed") and hasattr(module, "config")


def _custom_gate(module: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(module), "_apply_gate", None)
    return gate is not None and gate is not _default_apply_gate


@lru_cache(maxsize=256)
def _scoring_of(cls: type) -> Literal["softmax", "sigmoid"]:
    """Sigmoid routers (DeepSeek-V3, Llama 4) score each expert on its own; the rest use a softmax."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return "softmax"
    return "sigmoid" if "sigmoid" in source and "softmax" not in source else "softmax"


def _router_weight(module: nn.Module, num_experts: int, hidden: int) -> str | None:
    """Path (inside `module`, "" = itself) of the first module holding a (num_experts, hidden) weight."""
    for name, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
            return name
    return None


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def _shared(block: nn.Module, prefix: str, skip: set[str], hidden: int) -> SharedSpec | None:
    """A direct child of the sparse block (not the router or the experts) that is an MLP writing the hidden
    width; a Linear(hidden, 1) sibling whose sigmoid scales it (Qwen2-MoE) is recorded with it."""
    children = [(n, c) for n, c in block.named_children() if n not in skip]
    gated_by = next(
        (
            prefix + n
            for n, c in children
            if isinstance(c, nn.Linear) and c.in_features == hidden and c.out_features == 1
        ),
        None,
    )
    for name, child in children:
        if isinstance(child, nn.Linear):
            continue
        lins = _linears(child)
        downs = [n for n, m in lins.items() if m.out_features == hidden and m.in_features != hidden]
        downs = downs or [n for n, m in lins.items() if m.out_features == hidden and "down" in n]
        if len(downs) != 1:
            continue
        down = downs[0]
        ins = [n for n, m in lins.items() if m.in_features == hidden and n != down]
        gate = next((n for n in ins if "gate" in n), "")
        up = next((n for n in ins if "up" in n and n != gate), "")
        if not gate and not up and len(ins) == 1:
            up = ins[0]
        act = next((a for a in ("act_fn", "activation_fn", "act") if callable(getattr(child, a, None))), "")
        return SharedSpec(prefix + name, gate, up, down, act, gated_by)
    return None


def find_moe(layer: nn.Module) -> MoESpec | None:
    """The sparse MLP block of a decoder layer, or None for a dense layer."""
    found = next(((n, m) for n, m in layer.named_modules() if _is_experts(m)), None)
    if found is None:
        return None
    path, experts = found
    block_path, _, own = path.rpartition(".")
    block = layer.get_submodule(block_path) if block_path else layer
    prefix = block_path + "." if block_path else ""
    p = _params3d(experts)
    interface = _dispatches(experts)
    flags: dict[str, Any] = {
        "has_gate": "gate_up_proj" in p,
        "is_transposed": False,
        "has_bias": hasattr(experts, "down_proj_bias"),
        "is_concatenated": True,
        "has_post_expert_norm": False,
    }
    if interface:
        flags.update({k: bool(getattr(experts, k)) for k in flags if hasattr(experts, k)})
    down = p["down_proj"]
    num = int(down.shape[0])
    if not interface and flags["has_gate"]:  # no recorded layout: bmm-style (in, out) slices show in the
        flags["is_transposed"] = down.shape[2] == p["gate_up_proj"].shape[1]  # shapes: (E, H, 2I), (E, I, H)
    hidden, inter = (int(down.shape[2]), int(down.shape[1])) if flags["is_transposed"] else down.shape[1:]
    router_path = router_weight = None
    for name, child in block.named_children():
        if name == own:
            continue
        sub = _router_weight(child, num, int(hidden))
        if sub is not None:
            router_path = prefix + name
            router_weight = router_path + ("." + sub if sub else "")
            break
    if router_path is None or router_weight is None:
        return None
    router = layer.get_submodule(router_path)
    shared = _shared(block, prefix, {own, router_path.rpartition(".")[2]}, int(hidden))
    return MoESpec(
        block=block_path,
        experts=path,
        router=router_path,
        router_weight=router_weight,
        shared=shared,
        num_experts=num,
        hidden=int(hidden),
        intermediate=int(inter),
        custom_gate=_custom_gate(experts),
        interface=interface,
        scoring=_scoring_of(type(router)),
        **flags,
    )


def moe_specs(blocks: nn.ModuleList | list[nn.Module], layers: list[int] | None = None) -> dict[int, MoESpec]:
    """layer -> its MoESpec, for the MoE layers among `layers` (all by default)."""
    chosen = range(len(blocks)) if layers is None else layers
    return {layer: spec for layer in chosen if (spec := find_moe(blocks[layer])) is not None}


def expert_params(spec: MoESpec) -> tuple[str, str]:
    """The 3-D parameters holding the routed experts' matrices, in the order they run: (gate_)up, then
    down. Each row of an expert's (out, in) slice is one output channel, whether gate and up rows are
    concatenated or interleaved, so a per-row rule needs nothing else of the layout."""
    return ("gate_up_proj" if spec.has_gate else "up_proj", "down_proj")


def router_paths(spec: MoESpec) -> frozenset[str]:
    """Modules of a MoE block that only route (the router, its weight's holder, the shared experts' gate):
    they stay in full precision."""
    gated = () if spec.shared is None or spec.shared.gated_by is None else (spec.shared.gated_by,)
    return frozenset((spec.router, spec.router_weight, *gated))


def _module(layer: nn.Module, path: str) -> nn.Module:
    return layer.get_submodule(path) if path else layer


def expert_weight_view(layer: nn.Module, spec: MoESpec, name: str, expert: Expert) -> torch.Tensor:
    """The (out, in) matrix `name` (gate | up | down) of one expert, sharing storage with the parameter: a
    slice of the 3-D parameter (transposed back when stored (in, out); every other row of gate_up for the
    interleaved layout), or the shared MLP's linear weight for expert "shared"."""
    if name not in MATRICES:
        raise ValueError(f"unknown expert matrix '{name}' (allowed: {', '.join(MATRICES)})")
    if str(expert) == SHARED_EXPERT:
        if spec.shared is None:
            raise ValueError("this layer has no shared experts")
        sub = getattr(spec.shared, name)
        if not sub:
            raise ValueError(f"the shared experts have no '{name}' matrix")
        return _module(layer, spec.shared.path).get_submodule(sub).weight  # type: ignore[return-value]
    e = int(expert)
    if not 0 <= e < spec.num_experts:
        raise ValueError(f"expert {e} out of range (allowed: 0..{spec.num_experts - 1}, {SHARED_EXPERT})")
    experts = _module(layer, spec.experts)
    if name == "down":
        w = experts.down_proj[e]
        return w.t() if spec.is_transposed else w
    if not spec.has_gate:
        if name == "gate":
            raise ValueError("these experts have no gate matrix (up_proj only)")
        w = experts.up_proj[e]
        return w.t() if spec.is_transposed else w
    fused = experts.gate_up_proj[e]
    fused = fused.t() if spec.is_transposed else fused  # (2I, H)
    if spec.is_concatenated:
        half = fused.shape[0] // 2
        return fused[:half] if name == "gate" else fused[half:]
    return fused[0::2] if name == "gate" else fused[1::2]


def expert_bias_view(layer: nn.Module, spec: MoESpec, name: str, expert: Expert) -> torch.Tensor | None:
    """The bias of matrix `name` of one expert (a view like `expert_weight_view`), None without biases."""
    if str(expert) == SHARED_EXPERT:
        assert spec.shared is not None
        sub = getattr(spec.shared, name)
        return _module(layer, spec.shared.path).get_submodule(sub).bias if sub else None  # type: ignore[return-value]
    if not spec.has_bias:
        return None
    experts = _module(layer, spec.experts)
    e = int(expert)
    if name == "down":
        return experts.down_proj_bias[e]
    if not spec.has_gate:
        return experts.up_proj_bias[e]
    fused = experts.gate_up_proj_bias[e]
    if spec.is_concatenated:
        half = fused.shape[0] // 2
        return fused[:half] if name == "gate" else fused[half:]
    return fused[0::2] if name == "gate" else fused[1::2]
