"""The contract each architecture family fills in: one declarative description of everything the code
needs to know about it, and `Arch`, what a config tells about a model before any weight is loaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from outlier_study.adapters.experts import MATRICES as EXPERT_MATRICES
from outlier_study.adapters.experts import expert_weight_view, find_moe, router_paths
from outlier_study.adapters.linears import LinearLike, is_linear, weight_out_in
from outlier_study.adapters.taps import ATTENTION_TAPS, CANONICAL_TAPS, PAPER_ALIASES, SYNONYMS
from outlier_study.errors import ConfigError, require

Derive = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TapSpec:
    """Where a tap lives: a module path inside the decoder layer ("" = the layer), its input or output,
    and an optional pure function deriving the tap from that tensor (e.g. a third of GPT-2's c_attn)."""

    module: str
    io: Literal["input", "output"]
    derive: Derive | None = None


ATTENTION = TapSpec(module="<attention-function>", io="output")  # reached through AttentionInterface
EXPERTS = TapSpec(module="<experts-function>", io="output")  # reached through the experts interface
CAPTURED = (ATTENTION, EXPERTS)  # taps no module hook reaches


@dataclass(frozen=True)
class WeightSpec:
    """A weight matrix of a decoder layer: module path, and the rows start:stop of its (out, in) view it
    holds (stop None: all; GPT-2's fused c_attn holds q, k and v as row blocks)."""

    module: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class ResidualAdd:
    """One residual add of a decoder layer: skip · stream + scale · branch. Both are 1 in most families;
    Granite scales the branch, Beam both, by depth."""

    skip: float = 1.0
    scale: float = 1.0

    def branch(self, b: torch.Tensor) -> torch.Tensor:
        """What the add receives from the branch."""
        return b if self.scale == 1.0 else b * self.scale

    def __call__(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (x if self.skip == 1.0 else x * self.skip) + self.branch(b)


PLAIN_ADDS = (ResidualAdd(), ResidualAdd())


@dataclass(frozen=True)
class NormSpec:
    """A norm of a decoder layer: its module, the tap it writes (whose COs pick the γ entries the channel
    experiments edit), and the weights that read its output (SmoothQuant scales them, rotation folds γ
    into them; none for a norm whose output goes straight into the residual add)."""

    module: str
    output_tap: str
    readers: tuple[str, ...] = ()


def _plain_boundary(spec: TapSpec) -> bool:
    """A whole module input/output, read as it is (not captured elsewhere, not derived)."""
    return spec not in CAPTURED and spec.derive is None


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one architecture family."""

    family: str
    model_types: tuple[str, ...]
    taps: dict[str, TapSpec]
    aliases: dict[str, str]
    layers_path: str  # dotted path from the CausalLM to its list of decoder layers
    final_norm: str  # dotted path from the CausalLM to the norm before the lm_head
    norms: dict[str, NormSpec]  # "attn" / "mlp" (and post norms) -> the norm
    weights: dict[str, WeightSpec]  # "q", "k", ..., "down" -> where it lives
    gamma_offset: float = 0.0  # Gemma RMSNorm scales by (1 + weight)
    rotation_blocker: str | None = None  # why the exact rotation fold does not apply; None: it does
    parallel: bool = False  # attention and MLP both read the layer input; one residual add, no resid.mid
    parallel_sum: str = "(x+a)+m"  # how a parallel block sums input and branches: or "x+(a+m)"
    residual_adds: tuple[tuple[ResidualAdd, ResidualAdd], ...] = ()  # per layer (attn, mlp); (): plain adds
    output_scale: str = ""  # a buffer of the layer scaling its whole output (Gemma 4's layer_scalar)
    moe: dict[int, Any] = field(default_factory=dict)  # layer -> MoESpec of its mixture-of-experts block
    moe_taps: dict[str, TapSpec] = field(default_factory=dict)  # tap table of MoE layers, where it differs
    absent: dict[str, str] = field(default_factory=dict)  # paper taps this family lacks -> why

    # ---------------------------------------------------------------- taps

    def canonical(self, name: str, field_name: str = "taps") -> str:
        """Resolve a canonical tap, synonym or paper alias; reject names this architecture lacks."""
        tap = self.aliases.get(name) or SYNONYMS.get(name) or name
        if tap not in CANONICAL_TAPS:
            known = sorted(set(CANONICAL_TAPS) | set(SYNONYMS) | set(self.aliases))
            raise ConfigError(field_name, f"unknown tap '{name}'", allowed=known)
        if tap not in self.available():
            why = f" ({self.absent[tap]})" if tap in self.absent else ""
            raise ConfigError(
                field_name,
                f"tap '{name}' does not exist in {self.family} models{why}",
                allowed=self.available(),
            )
        return tap

    def available(self) -> list[str]:
        """Taps of this architecture, in forward order."""
        return [t for t in CANONICAL_TAPS if t in self.taps or t in self.moe_taps]

    def paper_taps(self) -> list[tuple[str, str]]:
        """(paper name, canonical tap) for the x1..x9, y1..y7 this architecture has."""
        return [
            (a, self.aliases[a]) for a in PAPER_ALIASES if a in self.aliases and self.aliases[a] in self.taps
        ]

    def residual_branches(self) -> tuple[str, ...]:
        """The taps added to the residual stream, in order: attention's and the MLP's (Gemma adds post-normed
        outputs), then Gemma 4's per-layer input."""
        post = "attn.post_norm" in self.taps
        pair = ("attn.post_norm", "mlp.post_norm") if post else ("attn.out", "mlp.out")
        return pair + (("ple.out",) if "ple.out" in self.taps else ())

    def _layer_taps(self, layer: int) -> dict[str, TapSpec]:
        """The tap table of decoder layer `layer`: MoE layers of a model with dense ones have their own."""
        return self.moe_taps if self.moe_taps and layer in self.moe else self.taps

    def has_tap(self, layer: int, tap: str) -> bool:
        """Whether decoder layer `layer` has `tap` (the router taps exist in the MoE layers only)."""
        return tap in self._layer_taps(layer)

    def tap_spec(self, layer: int, tap: str) -> TapSpec:
        """Where `tap` lives in decoder layer `layer`."""
        return self._layer_taps(layer)[tap]

    def adds(self, layer: int) -> tuple[ResidualAdd, ResidualAdd]:
        """The attention and MLP residual adds of `layer`."""
        return self.residual_adds[layer] if self.residual_adds else PLAIN_ADDS

    def residual_sum(
        self, layer: int, x: torch.Tensor, branches: Sequence[torch.Tensor], scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output of `layer` from its input x and its branch taps (`residual_branches`), in the model's
        own order of additions (so a rebuilt output has the model's bits): the one description of the
        residual adds. `scale`: the layer's output scale (`output_scale_of`)."""
        a, m, *later = branches
        attn, mlp = self.adds(layer)
        if not self.parallel:
            return self.finish(mlp(attn(x, a), m), later, scale)
        a, m = attn.branch(a), mlp.branch(m)
        return self.finish(x + (a + m) if self.parallel_sum == "x+(a+m)" else (x + a) + m, later, scale)

    @staticmethod
    def finish(out: torch.Tensor, later: Sequence[torch.Tensor], scale: torch.Tensor | None) -> torch.Tensor:
        """What a layer does after its MLP add: the branches added later, then the output scale."""
        for branch in later:
            out = out + branch
        return out if scale is None else out * scale

    def output_scale_of(self, block: nn.Module) -> torch.Tensor | None:
        """The tensor scaling the whole output of a layer (Gemma 4's layer_scalar); None: it has none."""
        return getattr(block, self.output_scale) if self.output_scale else None

    def editable_taps(self) -> list[str]:
        """Taps whose tensor is a whole module input/output that flows on unchanged: the ones an intervention
        can replace. resid.mid is only the MLP norm's input (the residual add keeps its own copy)."""
        return [t for t in self.available() if t != "resid.mid" and all(map(_plain_boundary, self._specs(t)))]

    def _specs(self, tap: str) -> list[TapSpec]:
        """Where `tap` lives in each tap table that has it (the dense layers', the MoE layers')."""
        return [table[tap] for table in (self.taps, self.moe_taps) if tap in table]

    # ---------------------------------------------------------------- modules

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def module(self, block: nn.Module, path: str) -> nn.Module:
        """The module at `path` inside a decoder layer ("" is the layer itself): the one lookup every hook,
        edit and quantizer goes through."""
        return block.get_submodule(path) if path else block

    def final_norm_of(self, model: nn.Module) -> nn.Module:
        """The norm before the lm_head (its γ is folded into the head by the rotation)."""
        return model.get_submodule(self.final_norm)

    def linears(self, model: nn.Module) -> list[tuple[int, str, LinearLike]]:
        """(layer, path inside the layer, module) of every linear inside the decoder layers, module order;
        MoE routers (an `nn.Linear` in some families) are left out: they stay in full precision."""
        out: list[tuple[int, str, LinearLike]] = []
        for layer, block in enumerate(self.blocks(model)):
            routers = router_paths(self.moe[layer]) if layer in self.moe else frozenset()
            out.extend(
                (layer, name, m)  # type: ignore[misc]
                for name, m in block.named_modules()
                if is_linear(m) and name not in routers
            )
        return out

    def experts(self, model: nn.Module) -> list[tuple[int, str, nn.Module, Any]]:
        """(layer, path inside the layer, module, MoESpec) of every fused routed-experts module."""
        blocks = self.blocks(model)
        return [
            (layer, spec.experts, self.module(blocks[layer], spec.experts), spec)
            for layer, spec in sorted(self.moe.items())
        ]

    # ---------------------------------------------------------------- norms and weights

    def norm_names(self, name: str, field_name: str) -> list[str]:
        """Norm keys for a config value: one of `norms`, or "both" = attn and mlp."""
        allowed = [*self.norms, "both"]
        if name not in allowed:
            raise ConfigError(field_name, f"no norm '{name}' in {self.family} models", allowed=allowed)
        if name != "both":
            return [name]
        both = [n for n in ("attn", "mlp") if n in self.norms]
        require(
            bool(both), field_name, f"{self.family} models have no norm before attention or MLP", self.norms
        )
        return both

    def norm_taps(self) -> dict[str, tuple[str, str, str]]:
        """Input, standardized input and output tap of each pre-norm ("attn", "mlp"), in forward order
        (x1 -> x2, y1 -> y2); a parallel block's MLP norm reads the layer input, resid.pre."""
        inputs = {"attn": "resid.pre", "mlp": "resid.pre" if self.parallel else "resid.mid"}
        return {
            side: (inputs[side], f"{side}.norm_std", f"{side}.norm")
            for side in ("attn", "mlp")
            if side in self.norms and f"{side}.norm_std" in self.taps
        }

    def gamma(self, block: nn.Module, norm: str) -> torch.Tensor:
        """The weight of a layer's norm; the norm scales by weight + gamma_offset."""
        return self.module(block, self.norms[norm].module).weight  # type: ignore[return-value]

    def weight_name(self, name: str, field_name: str) -> str:
        if name not in self.weights and not (self.moe and name in EXPERT_MATRICES):
            raise ConfigError(field_name, f"unknown matrix '{name}' for {self.family}", allowed=self.weights)
        return name

    def weight_view(self, block: nn.Module, name: str) -> torch.Tensor:
        """(out, in) view of a layer's weight `name`, sharing storage with the parameter."""
        spec = self.weights[name]
        view = weight_out_in(self.module(block, spec.module))  # type: ignore[arg-type]
        return view[spec.start : spec.stop]

    def weight_view_expert(self, block: nn.Module, name: str, expert: int | str) -> torch.Tensor:
        """(out, in) view of matrix `name` (gate | up | down) of one expert of a MoE layer ("shared": the
        shared experts), sharing storage with the fused 3-D parameter. KeyError: the layer has no experts."""
        spec = find_moe(block)
        if spec is None:
            raise KeyError(f"no experts in this layer of {self.family}")
        return expert_weight_view(block, spec, name, expert)

    def modules_of(self, names: Sequence[str]) -> tuple[str, ...]:
        """Module paths of weights, each once, in the order given (GPT-2's q, k, v share c_attn)."""
        return tuple(dict.fromkeys(self.weights[n].module for n in names if n in self.weights))

    @property
    def writers(self) -> tuple[str, ...]:
        """Linears whose output is added to the residual stream."""
        return self.modules_of(("o", "down"))

    @property
    def down(self) -> str:
        """The MLP's output projection (its input is the tap mlp.hidden)."""
        return self.weights["down"].module

    def readers(self) -> dict[str, tuple[str, ...]]:
        """norm key -> module paths of the linears reading its output (norms that feed linears only)."""
        return {key: self.modules_of(spec.readers) for key, spec in self.norms.items() if spec.readers}


@dataclass(frozen=True)
class Arch:
    """A model as its config describes it: family, depth, context. Known before any weight is loaded, so
    layer and tap names of every option are checked before the work starts."""

    adapter: Adapter
    config: Any = field(repr=False)  # the transformers PretrainedConfig
    n_layers: int
    max_context: int | None

    def layers(self, values: Sequence[int] | None, field_name: str = "layers") -> list[int]:
        """Layer indices from 0, sorted and unique; negative indices count from the end; None = all."""
        if values is None:
            return list(range(self.n_layers))
        require(len(values) > 0, field_name, "empty layer list", [f"0..{self.n_layers - 1}", "null"])
        return sorted({self.layer(v, field_name) for v in values})

    def layer_type(self, layer: int) -> str:
        """The layer's kind as its config names it (full, sliding or chunked attention), "+moe" for a
        mixture-of-experts layer: hybrid stacks keep per-layer statistics, each row says which kind."""
        kinds = getattr(self.config, "layer_types", None)
        if kinds and layer < len(kinds):
            kind = str(kinds[layer])
        else:  # no per-layer types: a window of the config applies to every layer
            kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return kind + "+moe" if layer in self.adapter.moe else kind

    def layer(self, value: int, field_name: str) -> int:
        idx = int(value)
        if not -self.n_layers <= idx < self.n_layers:
            raise ConfigError(field_name, f"layer {idx} out of range", allowed=[f"0..{self.n_layers - 1}"])
        return idx % self.n_layers

    def taps(self, names: Sequence[str] | None, field_name: str = "taps") -> list[str]:
        """Canonical taps in forward order; default: all but attention scores/probs (they cost a QKᵀ)."""
        if names is None:
            return [t for t in self.adapter.available() if t not in ATTENTION_TAPS]
        require(len(names) > 0, field_name, "empty tap list", self.adapter.available())
        wanted = {self.adapter.canonical(str(n), field_name) for n in names}
        return [t for t in self.adapter.available() if t in wanted]
