"""Reach the inside of mixture-of-experts layers through transformers' experts interface.

In transformers 5 a MoE layer's routed experts are one module with 3-D parameters, run by the experts
implementation its config names (`config._experts_implementation`: eager, batched_mm, grouped_mm, …).
`capture_experts` registers, under a derived name, an implementation that first calls the ORIGINAL one
with the untouched inputs (so the forward pass and the logits stay bit-identical) and then recomputes,
for every expert hit, its MLP taps on the tokens routed to it. It is selected only inside the `with`
block; the config's own implementation is restored on exit, errors included. No method is replaced:
the router, the shared experts and the decoder layer are read with ordinary forward hooks, and so are
experts that do not dispatch through the interface (Llama 4: every token through every expert, its input
scaled by its routing weight), whose taps are then on those scaled inputs.

What reaches the sink, for a MoE layer (B windows of T tokens, k experts routed per token):
- per expert, key `expert_key(tap, e)`: a (B, T, C) tensor, valid (B, T, 1) only at the tokens routed to
  `e`, so window and token of every top entry are the real ones; an expert that got no token in a batch
  still gets its one update (an empty (B, 0, C) tensor), which keeps the per-window medians aligned;
- pooled, key `tap`: every routed (token, expert) pair of the layer, as a (B, k, T, C) tensor whose slot j
  holds each token's j-th routed choice; `Profiler.sink` folds it to (B, k·T, C) (one update per window
  batch, so each window's median and MA count are over all its pairs) and maps a top entry's token back
  with `token % T`;
- shared experts (ordinary linears), key `expert_key(tap, "shared")`, (B, T, C);
- `moe.router_logits`, `moe.router_probs`: (B, T, E), recomputed in float32 from the router's input and its
  (E, hidden) weight; probabilities are the softmax over all experts (sigmoid for sigmoid-scoring routers);
- `ROUTING` ("moe.routing"): (B, T, E) routing weights, valid only where a token was routed: its
  per-channel count and mean are each expert's load (tokens routed, mean routing weight).
Taps: mlp.gate / mlp.up are the two halves of gate_up_proj (with its bias), mlp.act = act(gate) (only
where the experts use the default gating), mlp.hidden = what down_proj reads (after `_apply_gate`),
mlp.out = down_proj's output (with its bias) before the routing weight (and before a post-expert norm).

`edit_experts` is the `massive` intervention inside the same implementation: the MAs of one expert's y6
(or y7) are replaced on its routed tokens, and only the rows of the (token, expert) pairs that changed
get output += routing_weight · (down(y6') − down(y6)) (computed as W_down(y6' − y6)), so every other row
of the layer's output stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from outlier_study.adapters.experts import MoESpec, SharedSpec
from outlier_study.adapters.taps import EXPERT_TAPS, ROUTING, SHARED_EXPERT, expert_key
from outlier_study.stats.massive import masked

ROUTER_TAPS: tuple[str, ...] = ("moe.router_logits", "moe.router_probs")
MOE_TAPS: frozenset[str] = frozenset(EXPERT_TAPS) | frozenset(ROUTER_TAPS)
EDITABLE = ("mlp.hidden", "mlp.out")  # y6, y7: the expert taps the massive intervention replaces

# (layer index, key, tensor, valid mask or None): the hook sink of measure/hooks.py
Sink = Callable[[int, str, torch.Tensor, torch.Tensor | None], None]

_PREFIX = "outlier_experts_"


@dataclass
class _Site:
    """One MoE layer inside an active capture or edit; `shape` is (B, T) of the batch in flight."""

    layer: int
    spec: MoESpec
    experts: nn.Module
    shape: tuple[int, int] = (0, 0)


@dataclass
class _Capture:
    sink: Sink
    taps: tuple[str, ...]  # the expert taps asked for, in forward order
    pooled: frozenset[str]  # those fed at the layer-level key too (pooled over routed pairs)
    per_expert: bool
    sites: dict[int, _Site] = field(default_factory=dict)  # id(experts module) -> site


@dataclass
class _Edit:
    tap: str  # mlp.hidden | mlp.out
    value: str  # zero | mean
    ma_abs: float
    ma_ratio: float
    count: Callable[[int, int], None]  # (layer, replaced elements)
    sites: dict[int, _Site] = field(default_factory=dict)
    targets: dict[int, frozenset[int]] = field(default_factory=dict)  # id(experts module) -> routed experts


_CAPTURES: ContextVar[tuple[_Capture, ...]] = ContextVar("outlier_study_expert_captures", default=())
_EDITS: ContextVar[tuple[_Edit, ...]] = ContextVar("outlier_study_expert_edits", default=())


# ------------------------------------------------------------------ the registered implementation


def _original_function(module: nn.Module, impl: str) -> Callable[..., torch.Tensor]:
    """The experts function the model would have used; 'eager' is the class's own forward, which
    `use_experts_implementation` keeps as the wrapped function of the dispatching one."""
    eager = type(module).forward.__wrapped__  # type: ignore[attr-defined]
    return ALL_EXPERTS_FUNCTIONS.get_interface(impl, eager)


def _routing_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """(hidden_states (N, H), top_k_index (N, k), top_k_weights (N, k)), positional or by name."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    out = list(args[:3])
    for options in names[len(out) :]:
        out.append(next(kwargs[n] for n in options if n in kwargs))
    return tuple(out)


def _active(module: nn.Module) -> tuple[list[tuple[_Edit, _Site]], list[tuple[_Capture, _Site]]]:
    key = id(module)
    edits = [(e, e.sites[key]) for e in _EDITS.get() if key in e.sites]
    return edits, [(c, c.sites[key]) for c in _CAPTURES.get() if key in c.sites]


def _run(
    edits: list[tuple[_Edit, _Site]],
    captures: list[tuple[_Capture, _Site]],
    routed: _Routed,
    out: torch.Tensor,
) -> torch.Tensor:
    for edit, site in edits:  # edits first: measurement sees what they changed
        out = _apply_edit(edit, site, routed, out)
    for capture, site in captures:
        _record(capture, site, routed)
    return out


def _capturing_forward(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    impl = str(module.config._experts_implementation).removeprefix(_PREFIX)  # type: ignore[union-attr]
    out = _original_function(module, impl)(module, *args, **kwargs)
    edits, captures = _active(module)
    if not edits and not captures:
        return out
    with torch.no_grad():
        x, idx, w = _routing_args(args, kwargs)
        return _run(edits, captures, _Routed(module, (edits or captures)[0][1].spec, idx, w, x), out)


def _register(impl: str) -> str:
    if impl.startswith(_PREFIX):  # already selected by an enclosing capture or edit
        return impl
    name = _PREFIX + impl
    if name not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(name, _capturing_forward)
    return name


@contextmanager
def _selected(model: nn.Module) -> Iterator[None]:
    """The capturing implementation for the `with` body; the config's own one restored after."""
    config = model.config  # type: ignore[attr-defined]
    original = config._experts_implementation or "eager"
    try:
        model.set_experts_implementation(_register(original))  # type: ignore[operator]
        yield
    finally:
        model.set_experts_implementation(original)  # type: ignore[operator]


# ------------------------------------------------------------------ one expert's taps, recomputed


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


class _Routed:
    """The routing of one call and, per expert hit (computed once, on demand), its taps on its tokens.

    Experts run through the interface read x (N, H) and weigh their outputs; experts outside it (Llama 4)
    read every token, already scaled by its routing weight (0 where not routed): `scaled` (E, N, H)."""

    def __init__(
        self,
        module: nn.Module,
        spec: MoESpec,
        idx: torch.Tensor,
        w: torch.Tensor,
        x: torch.Tensor | None = None,
        scaled: torch.Tensor | None = None,
    ) -> None:
        self.module, self.spec, self.idx, self.w, self.x, self.scaled = module, spec, idx, w, x, scaled
        self.n = int(idx.shape[0])
        self.k = int(idx.shape[-1])
        real = idx[idx < spec.num_experts]  # expert-parallel sentinels (>= E) are no expert
        self.hit: list[int] = sorted(set(real.unique().tolist()))
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._taps: dict[int, dict[str, torch.Tensor]] = {}

    def rows(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, slot) of every pair routed to expert e, tokens ascending."""
        if e not in self._rows:
            tok, slot = (self.idx == e).nonzero(as_tuple=True)
            self._rows[e] = (tok, slot)
        return self._rows[e]

    def weights(self, e: int) -> torch.Tensor:
        tok, slot = self.rows(e)
        return self.w[tok, slot]

    def inputs(self, e: int) -> torch.Tensor:
        tok = self.rows(e)[0]
        return self.x[tok] if self.scaled is None else self.scaled[e][tok]  # type: ignore[index]

    def like(self) -> torch.Tensor:
        return self.x if self.scaled is None else self.scaled

    def out_rows(self, e: int, tok: torch.Tensor) -> torch.Tensor:
        """Rows of the experts' output holding (token, e): token rows, or e's block of E·N rows."""
        return tok if self.scaled is None else tok + e * self.n

    def out_weights(self, e: int) -> torch.Tensor | None:
        """What multiplies an expert's output rows: its routing weights (None: applied to its input)."""
        return self.weights(e) if self.scaled is None else None

    def down(self, e: int, hidden: torch.Tensor, bias: bool = True) -> torch.Tensor:
        m, s = self.module, self.spec
        b = m.down_proj_bias[e] if s.has_bias and bias else None
        return _project(hidden, m.down_proj[e], b, s.is_transposed)

    def post(self, out: torch.Tensor) -> torch.Tensor:
        """What the routing weight multiplies: the expert output after its post-expert norm, if any."""
        return self.module.post_expert_norm(out) if self.spec.has_post_expert_norm else out

    def taps(self, e: int) -> dict[str, torch.Tensor]:
        if e in self._taps:
            return self._taps[e]
        m, s = self.module, self.spec
        xe = self.inputs(e)
        out: dict[str, torch.Tensor] = {}
        if s.has_gate:
            b = m.gate_up_proj_bias[e] if s.has_bias else None
            gate_up = _project(xe, m.gate_up_proj[e], b, s.is_transposed)
            if s.is_concatenated:
                out["mlp.gate"], out["mlp.up"] = gate_up.chunk(2, dim=-1)
            else:
                out["mlp.gate"], out["mlp.up"] = gate_up[..., 0::2], gate_up[..., 1::2]
            if not s.custom_gate:
                out["mlp.act"] = m.act_fn(out["mlp.gate"])
            if hasattr(m, "_apply_gate"):
                out["mlp.hidden"] = m._apply_gate(gate_up)
            else:  # experts outside the interface gate the default way
                out["mlp.hidden"] = out["mlp.act"] * out["mlp.up"]
        else:
            b = m.up_proj_bias[e] if s.has_bias else None
            out["mlp.up"] = _project(xe, m.up_proj[e], b, s.is_transposed)
            out["mlp.act"] = out["mlp.hidden"] = m.act_fn(out["mlp.up"])
        out["mlp.out"] = self.down(e, out["mlp.hidden"])
        self._taps[e] = out
        return out


# ------------------------------------------------------------------ recording


def _record(capture: _Capture, site: _Site, routed: _Routed) -> None:
    b, t = site.shape
    n, k, num = b * t, routed.k, site.spec.num_experts
    if routed.n != n:
        raise RuntimeError(f"layer {site.layer}: {routed.n} tokens reached the experts, not {b}×{t}")
    sink, layer = capture.sink, site.layer
    for tap in capture.taps:
        if tap not in capture.pooled and not capture.per_expert:
            continue
        width = next((routed.taps(e)[tap].shape[-1] for e in routed.hit if tap in routed.taps(e)), None)
        if width is None:  # no expert hit (an empty batch) or a tap these experts do not have
            if tap not in _available(site.spec):
                continue
            width = site.spec.hidden if tap == "mlp.out" else site.spec.intermediate
        if tap in capture.pooled:
            _record_pooled(sink, layer, tap, routed, (b, k, t, width), num)
        if not capture.per_expert:
            continue
        for e in range(num):
            if e in routed.hit:
                tok, _ = routed.rows(e)
                dense = routed.like().new_zeros(n, width)
                dense[tok] = routed.taps(e)[tap].to(dense.dtype)
                mask = torch.zeros(n, 1, dtype=torch.bool, device=dense.device)
                mask[tok] = True
                sink(layer, expert_key(tap, e), dense.view(b, t, width), mask.view(b, t, 1))
            else:
                empty = routed.like().new_zeros(b, 0, width)
                none = torch.zeros(b, 0, 1, dtype=torch.bool, device=empty.device)
                sink(layer, expert_key(tap, e), empty, none)
    if capture.per_expert:
        weights = routed.w.new_zeros(n, num + 1)  # column num catches sentinels, then is dropped
        routed_mask = torch.zeros(n, num + 1, dtype=torch.bool, device=weights.device)
        index = routed.idx.clamp(max=num).long()
        weights.scatter_(1, index, routed.w)
        routed_mask.scatter_(1, index, True)
        sink(layer, ROUTING, weights[:, :num].reshape(b, t, num), routed_mask[:, :num].reshape(b, t, num))


def _record_pooled(
    sink: Sink, layer: int, tap: str, routed: _Routed, shape: tuple[int, int, int, int], num: int
) -> None:
    """Every routed (token, expert) pair as (B, k, T, C): slot j holds each token's j-th routed choice."""
    b, k, t, _ = shape
    pooled = routed.like().new_zeros(shape)
    for e in routed.hit:
        tok, slot = routed.rows(e)
        pooled[tok // t, slot, tok % t] = routed.taps(e)[tap].to(pooled.dtype)
    sentinel = routed.idx >= num
    valid = None
    if bool(sentinel.any()):
        valid = (~sentinel).view(b, t, k).permute(0, 2, 1)[..., None]
    sink(layer, tap, pooled, valid)


def _available(spec: MoESpec) -> set[str]:
    """The expert taps these experts have."""
    taps = {"mlp.up", "mlp.hidden", "mlp.out"}
    if spec.has_gate:
        taps.add("mlp.gate")
    if spec.separable:
        taps.add("mlp.act")
    return taps


def expert_taps(spec: MoESpec) -> list[str]:
    """The expert taps of a MoE layer, in forward order (mlp.act only where gating is separable)."""
    have = _available(spec)
    return [tap for tap in EXPERT_TAPS if tap in have]


# ------------------------------------------------------------------ editing (the massive intervention)


def _fill(x: torch.Tensor, value: str) -> torch.Tensor:
    """0, or the mean of the whole tensor x (MAs included): `interventions.massive.fill_value` for one
    window's rows of one expert."""
    if value == "zero":
        return x.new_zeros(())
    return x.mean(dtype=torch.float32).to(x.dtype)


def _edit_rows(
    x: torch.Tensor, window: torch.Tensor, value: str, ma_abs: float, ma_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (n, C) rows of one expert; each window's rows are one tensor for the MA rule (its median over
    the routed tokens of that window). Returns (edited x, rows changed (n,), elements replaced)."""
    new, changed, total = x, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), 0
    for b in window.unique().tolist():
        sel = (window == b).nonzero(as_tuple=True)[0]
        sub = x[sel]
        mask = masked(sub[None], ma_abs, ma_ratio)
        count = 0 if mask is None else int(mask.sum())
        if not count:
            continue
        assert mask is not None
        if new is x:
            new = x.clone()
        new[sel] = torch.where(mask[0], _fill(sub, value), sub)
        changed[sel] |= mask[0].any(dim=-1)
        total += count
    return new, changed, total


def _apply_edit(edit: _Edit, site: _Site, routed: _Routed, out: torch.Tensor) -> torch.Tensor:
    t = site.shape[1]
    for e in sorted(edit.targets[id(site.experts)] & set(routed.hit)):
        taps = routed.taps(e)
        tok, _ = routed.rows(e)
        old = taps[edit.tap]
        new, changed, count = _edit_rows(old, torch.div(tok, t, rounding_mode="floor"), edit.value,
                                         edit.ma_abs, edit.ma_ratio)  # fmt: skip
        edit.count(site.layer, count)
        if not count:
            continue
        if edit.tap == "mlp.hidden":
            new_out = routed.down(e, new)
            if routed.spec.has_post_expert_norm:
                delta = routed.post(new_out) - routed.post(taps["mlp.out"])
            else:
                delta = routed.down(e, new - old, bias=False)
            taps["mlp.hidden"], taps["mlp.out"] = new, new_out
        else:
            delta = routed.post(new) - routed.post(old)
            taps["mlp.out"] = new
        rows = changed.nonzero(as_tuple=True)[0]
        weights = routed.out_weights(e)
        contribution = delta[rows] if weights is None else delta[rows] * weights[rows, None].to(delta.dtype)
        out = out.index_add(0, routed.out_rows(e, tok[rows]), contribution.to(out.dtype))
    return out


# ------------------------------------------------------------------ hooks on ordinary modules


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _shape_hook(site: _Site) -> Callable[..., None]:
    """The decoder layer's input is (B, T, H): the shape every flat (N, ·) tensor inside it comes back to."""

    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _first_tensor(args, kwargs)
        site.shape = (int(x.shape[0]), int(x.shape[1]))

    return pre


def _router_hook(
    site: _Site, router_weight: nn.Module, sink: Sink, taps: frozenset[str]
) -> Callable[..., None]:
    weight = router_weight.weight
    bias = getattr(router_weight, "bias", None)

    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        b, t = site.shape
        x = _first_tensor(args, kwargs).reshape(b * t, -1)
        with torch.no_grad():
            logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            logits = logits.view(b, t, -1)
            if "moe.router_logits" in taps:
                sink(site.layer, "moe.router_logits", logits, None)
            if "moe.router_probs" in taps:
                probs = logits.sigmoid() if site.spec.scoring == "sigmoid" else logits.softmax(dim=-1)
                sink(site.layer, "moe.router_probs", probs, None)

    return pre


def _shared_modules(block: nn.Module, shared: SharedSpec) -> dict[str, nn.Module]:
    mlp = block.get_submodule(shared.path)
    return {
        part: mlp.get_submodule(getattr(shared, part))
        for part in ("gate", "up", "down")
        if getattr(shared, part)
    }


def _shared_capture(stack: ExitStack, block: nn.Module, site: _Site, capture: _Capture) -> None:
    """Shared experts are ordinary linears: forward hooks, key '<tap>@shared', reshaped to (B, T, C)."""
    shared = site.spec.shared
    assert shared is not None
    parts = _shared_modules(block, shared)
    act = getattr(block.get_submodule(shared.path), shared.act, None) if shared.act else None

    def emit(tap: str, x: torch.Tensor) -> None:
        b, t = site.shape
        capture.sink(site.layer, expert_key(tap, SHARED_EXPERT), x.reshape(b, t, x.shape[-1]), None)

    def output_of(taps: list[str]) -> Callable[..., None]:
        def post(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            for tap in taps:
                emit(tap, output if tap != "mlp.act" else act(output))  # type: ignore[misc]

        return post

    def down_input(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        emit("mlp.hidden", _first_tensor(args, kwargs))

    wanted = set(capture.taps)
    gate_taps = [t for t in ("mlp.gate", "mlp.act") if t in wanted and (t == "mlp.gate" or act is not None)]
    if "gate" in parts and gate_taps:
        stack.callback(parts["gate"].register_forward_hook(output_of(gate_taps)).remove)
    if "up" in parts and "mlp.up" in wanted:
        stack.callback(parts["up"].register_forward_hook(output_of(["mlp.up"])).remove)
    if "mlp.hidden" in wanted:
        stack.callback(parts["down"].register_forward_pre_hook(down_input, with_kwargs=True).remove)
    if "mlp.out" in wanted:
        stack.callback(parts["down"].register_forward_hook(output_of(["mlp.out"])).remove)


def _shared_edit(stack: ExitStack, block: nn.Module, site: _Site, edit: _Edit) -> None:
    """The dense rule at the shared experts' y6 (down_proj input) or y7 (its output), per window."""
    down = _shared_modules(block, site.spec.shared)["down"]  # type: ignore[arg-type]

    def replace(x: torch.Tensor) -> torch.Tensor | None:
        b, t = site.shape
        xs = x.reshape(b, t, x.shape[-1])
        mask = masked(xs, edit.ma_abs, edit.ma_ratio)
        count = 0 if mask is None else int(mask.sum())
        edit.count(site.layer, count)
        if not count:
            return None
        assert mask is not None
        fill = xs.new_zeros(()) if edit.value == "zero" else _window_means(xs)
        return torch.where(mask, fill, xs).reshape(x.shape)

    if edit.tap == "mlp.hidden":

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = replace(args[0] if args else kwargs["input"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "input": new})

        stack.callback(down.register_forward_pre_hook(pre, with_kwargs=True, prepend=True).remove)
    else:

        def post(_m: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
            return replace(output)

        stack.callback(down.register_forward_hook(post, prepend=True).remove)


def _window_means(x: torch.Tensor) -> torch.Tensor:
    mean = x.reshape(x.shape[0], -1).mean(dim=1, dtype=torch.float32)
    return mean.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------ the two context managers


def _sites(
    specs: Mapping[int, MoESpec], layers: Sequence[nn.Module] | Mapping[int, nn.Module]
) -> list[tuple[nn.Module, _Site]]:
    out = []
    for layer, spec in sorted(specs.items()):
        block = layers[layer]
        out.append((block, _Site(layer, spec, block.get_submodule(spec.experts))))
    return out


# Experts outside the interface (Llama 4: every token through every expert, its input scaled by its
# routing weight) are read with forward hooks instead: the router's, which keeps the routing of the call,
# and the experts', which sees their input and may replace their output. One pair per experts module,
# shared by every active capture and edit.
_ROUTING_OF: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(experts) -> (top_k_index, weights)
_HOOKED: dict[int, list[Any]] = {}  # id(experts) -> [users, handles]


def _router_routing(site: _Site, router_weight: nn.Module) -> Callable[..., None]:
    """Top-k of the router's logits (recomputed with its own weight, as nn.Linear does) and the scores
    the router output holds for them."""

    def post(router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].reshape(-1, site.spec.hidden)
        logits = F.linear(x, router_weight.weight, getattr(router_weight, "bias", None))
        k = int(getattr(router, "top_k", None) or site.experts.config.num_experts_per_tok)
        idx = logits.topk(k, dim=1).indices
        outputs = output if isinstance(output, tuple) else (output,)
        scores = next(o for o in outputs if isinstance(o, torch.Tensor) and o.shape == logits.shape)
        _ROUTING_OF[id(site.experts)] = (idx, scores.gather(1, idx))

    return post


def _scaled_experts_hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    module = _module
    edits, captures = _active(module)
    if not edits and not captures:
        return None
    with torch.no_grad():
        site = (edits or captures)[0][1]
        idx, w = _ROUTING_OF.pop(id(module))
        scaled = args[0].view(site.spec.num_experts, idx.shape[0], -1)
        new = _run(edits, captures, _Routed(module, site.spec, idx, w, scaled=scaled), output)
    return None if new is output else new


@contextmanager
def _hooked(block: nn.Module, site: _Site) -> Iterator[None]:
    key = id(site.experts)
    if key not in _HOOKED:
        router = block.get_submodule(site.spec.router)
        weight = block.get_submodule(site.spec.router_weight)
        handles = [
            router.register_forward_hook(_router_routing(site, weight)),
            site.experts.register_forward_hook(_scaled_experts_hook),
        ]
        _HOOKED[key] = [0, handles]
    _HOOKED[key][0] += 1
    try:
        yield
    finally:
        _HOOKED[key][0] -= 1
        if not _HOOKED[key][0]:
            for handle in _HOOKED.pop(key)[1]:
                handle.remove()
            _ROUTING_OF.pop(key, None)


@contextmanager
def capture_experts(
    model: nn.Module,
    specs: Mapping[int, MoESpec],
    sink: Sink,
    taps: Sequence[str] | frozenset[str],
    layers: Sequence[nn.Module] | Mapping[int, nn.Module],
    *,
    pooled: Collection[str] | None = None,
    per_expert: bool = True,
) -> Iterator[None]:
    """Feed `sink` the MoE taps among `taps` (EXPERT_TAPS, ROUTER_TAPS) of the MoE layers in `specs`
    (layer index -> spec; `layers` holds the decoder layer modules by index): the expert taps in `pooled`
    (default: all) at their layer-level key, pooled over the routed pairs, and with `per_expert` every
    expert's keys, the shared experts' keys and the routing load (ROUTING) too.
    The model's experts implementation is its own again after the block, even on errors."""
    wanted = frozenset(taps)
    expert_wanted = tuple(t for t in EXPERT_TAPS if t in wanted)
    router_wanted = wanted & frozenset(ROUTER_TAPS)
    layer_level = frozenset(expert_wanted if pooled is None else pooled) & frozenset(expert_wanted)
    capture = _Capture(sink, expert_wanted, layer_level, per_expert)
    needs_experts = bool(layer_level) or per_expert
    with ExitStack() as stack:
        for block, site in _sites(specs, layers):
            stack.callback(block.register_forward_pre_hook(_shape_hook(site), with_kwargs=True).remove)
            if router_wanted:
                router = block.get_submodule(site.spec.router)
                hook = _router_hook(site, block.get_submodule(site.spec.router_weight), sink, router_wanted)
                stack.callback(router.register_forward_pre_hook(hook, with_kwargs=True).remove)
            if needs_experts:
                capture.sites[id(site.experts)] = site
                if not site.spec.interface:
                    stack.enter_context(_hooked(block, site))
            if per_expert and site.spec.shared is not None and expert_wanted:
                _shared_capture(stack, block, site, capture)
        if any(site.spec.interface for site in capture.sites.values()):
            stack.enter_context(_selected(model))
        if capture.sites:
            token = _CAPTURES.set((*_CAPTURES.get(), capture))
            stack.callback(_CAPTURES.reset, token)
        yield


@contextmanager
def edit_experts(
    model: nn.Module,
    specs: Mapping[int, MoESpec],
    layers: Sequence[nn.Module] | Mapping[int, nn.Module],
    tap: str,
    experts: Sequence[int | str] | str,
    value: str,
    ma_abs: float,
    ma_ratio: float,
    count: Callable[[int, int], None],
) -> Iterator[None]:
    """Replace the MAs at `tap` (mlp.hidden or mlp.out) of `experts` (indices and/or "shared", or "all")
    in the MoE layers of `specs`, on the tokens routed to each; `count(layer, n)` gets every replacement.
    Only the output rows of the (token, expert) pairs that changed move; the model is untouched after."""
    if tap not in EDITABLE:
        raise ValueError(f"expert tap '{tap}' cannot be edited (allowed: {', '.join(EDITABLE)})")
    chosen = {str(e) for e in ([experts] if isinstance(experts, str | int) else experts)}
    edit = _Edit(tap, value, ma_abs, ma_ratio, count)
    with ExitStack() as stack:
        for block, site in _sites(specs, layers):
            names = set(site.spec.expert_names()) if "all" in chosen else chosen
            targets = {int(e) for e in names if e != SHARED_EXPERT}
            share = SHARED_EXPERT in names and site.spec.shared is not None
            if not targets and not share:
                continue
            stack.callback(block.register_forward_pre_hook(_shape_hook(site), with_kwargs=True).remove)
            if targets:
                edit.sites[id(site.experts)] = site
                edit.targets[id(site.experts)] = frozenset(targets)
                if not site.spec.interface:
                    stack.enter_context(_hooked(block, site))
            if share:
                _shared_edit(stack, block, site, edit)
        if any(site.spec.interface for site in edit.sites.values()):
            stack.enter_context(_selected(model))
        if edit.sites:
            token = _EDITS.set((*_EDITS.get(), edit))
            stack.callback(_EDITS.reset, token)
        yield
