"""Reach the inside of mixture-of-experts layers through transformers' experts interface.

In transformers 5 a MoE layer's routed experts are one module with 3-D parameters, run by the experts
implementation its config names (`config._experts_implementation`: eager, batched_mm, grouped_mm, …).
This module registers, under a derived name, an implementation that first calls the ORIGINAL one
with the untouched inputs (so the forward pass and the logits stay bit-identical) and then recomputes,
for every expert hit, its MLP taps on the tokens routed to it. It is selected only while a capture or edit is
active; the config's own implementation is restored on exit, errors included. No method is replaced:
the router, the shared experts and the decoder layer are read with ordinary forward hooks, and so are
experts that do not dispatch through the interface (Llama 4: every token through every expert, its input
scaled by its routing weight), whose taps are then on those scaled inputs.

Capture (`capture.py`) and the massive intervention (`edit.py`) are the two users of this mechanism: each
registers its sites and, per call, gets the routing with every hit expert's taps recomputed once
(`Routed`); edits run first, so measurement sees what they changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from outlier_study.adapters.experts import MoESpec, SharedSpec

_PREFIX = "outlier_experts_"


@dataclass
class Site:
    """One MoE layer inside an active capture or edit; `shape` is (B, T) of the batch in flight."""

    layer: int
    spec: MoESpec
    experts: nn.Module
    shape: tuple[int, int] = (0, 0)


class User(Protocol):
    """A capture or an edit: its sites by id(experts module), and what it does with one call's routing."""

    sites: dict[int, Site]

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor: ...


EDITS: ContextVar[tuple[Any, ...]] = ContextVar("outlier_study_expert_edits", default=())
CAPTURES: ContextVar[tuple[Any, ...]] = ContextVar("outlier_study_expert_captures", default=())


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


def _active(module: nn.Module) -> list[tuple[User, Site]]:
    """The active users of this experts module with their site, edits first: measurement sees what they
    changed."""
    key = id(module)
    return [(u, u.sites[key]) for u in (*EDITS.get(), *CAPTURES.get()) if key in u.sites]


def _run(users: list[tuple[User, Site]], routed: Routed, out: torch.Tensor) -> torch.Tensor:
    for user, site in users:
        out = user.apply(site, routed, out)
    return out


def _capturing_forward(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    impl = str(module.config._experts_implementation).removeprefix(_PREFIX)  # type: ignore[union-attr]
    out = _original_function(module, impl)(module, *args, **kwargs)
    users = _active(module)
    if not users:
        return out
    with torch.no_grad():
        x, idx, w = _routing_args(args, kwargs)
        return _run(users, Routed(module, users[0][1].spec, idx, w, x), out)


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


class Routed:
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

    def with_inputs(self, like: torch.Tensor) -> Routed:
        """The same routing over other inputs shaped as `like()` (e.g. those inputs quantized)."""
        x, scaled = (like, None) if self.scaled is None else (None, like)
        other = Routed(self.module, self.spec, self.idx, self.w, x=x, scaled=scaled)
        other._rows = self._rows
        return other

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

    def replace_hidden(self, e: int, new: torch.Tensor) -> torch.Tensor:
        """Expert e's down_proj input becomes `new` (its routed rows; its taps follow). Returns, per row, how
        much what the routing weight multiplies moves: down(new) − down(old), bias-free without a post
        norm."""
        taps = self.taps(e)
        new_out = self.down(e, new)
        if self.spec.has_post_expert_norm:
            delta = self.post(new_out) - self.post(taps["mlp.out"])
        else:
            delta = self.down(e, new - taps["mlp.hidden"], bias=False)
        taps["mlp.hidden"], taps["mlp.out"] = new, new_out
        return delta

    def add_rows(self, out: torch.Tensor, e: int, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The experts' output with `delta` (rows of expert e's routed pairs) added at `rows` of those pairs,
        weighted as the experts weigh that expert's output."""
        tok = self.rows(e)[0]
        weights = self.out_weights(e)
        contribution = delta[rows] if weights is None else delta[rows] * weights[rows, None].to(delta.dtype)
        return out.index_add(0, self.out_rows(e, tok[rows]), contribution.to(out.dtype))

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


# ------------------------------------------------------------------ hooks on ordinary modules


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def shape_hook(site: Site) -> Callable[..., None]:
    """The decoder layer's input is (B, T, H): the shape every flat (N, ·) tensor inside it comes back to."""

    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = first_tensor(args, kwargs)
        site.shape = (int(x.shape[0]), int(x.shape[1]))

    return pre


def shared_modules(block: nn.Module, shared: SharedSpec) -> dict[str, nn.Module]:
    mlp = block.get_submodule(shared.path)
    return {
        part: mlp.get_submodule(getattr(shared, part))
        for part in ("gate", "up", "down")
        if getattr(shared, part)
    }


# ------------------------------------------------------------------ sites, and experts outside the interface


def sites_of(
    specs: Mapping[int, MoESpec], layers: Sequence[nn.Module] | Mapping[int, nn.Module]
) -> list[tuple[nn.Module, Site]]:
    out = []
    for layer, spec in sorted(specs.items()):
        block = layers[layer]
        out.append((block, Site(layer, spec, block.get_submodule(spec.experts))))
    return out


# Experts outside the interface (Llama 4: every token through every expert, its input scaled by its
# routing weight) are read with forward hooks instead: the router's, which keeps the routing of the call,
# and the experts', which sees their input and may replace their output. One pair per experts module,
# shared by every active capture and edit.
_ROUTING_OF: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(experts) -> (top_k_index, weights)
_HOOKED: dict[int, list[Any]] = {}  # id(experts) -> [users, handles]


def _router_routing(site: Site, router_weight: nn.Module) -> Callable[..., None]:
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
    users = _active(module)
    if not users:
        return None
    with torch.no_grad():
        site = users[0][1]
        idx, w = _ROUTING_OF.pop(id(module))
        scaled = args[0].view(site.spec.num_experts, idx.shape[0], -1)
        new = _run(users, Routed(module, site.spec, idx, w, scaled=scaled), output)
    return None if new is output else new


@contextmanager
def _hooked(block: nn.Module, site: Site) -> Iterator[None]:
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


def watch(stack: ExitStack, block: nn.Module, site: Site, user: User) -> None:
    """`user` is served at this site (experts outside the interface through their hooks)."""
    user.sites[id(site.experts)] = site
    if not site.spec.interface:
        stack.enter_context(_hooked(block, site))


def activate(stack: ExitStack, model: nn.Module, user: User, users: ContextVar[tuple[Any, ...]]) -> None:
    """Make `user` (with its sites watched) active until `stack` closes: the capturing implementation
    selected where a site dispatches through the interface, `user` appended to `users`."""
    if any(site.spec.interface for site in user.sites.values()):
        stack.enter_context(_selected(model))
    if user.sites:
        token = users.set((*users.get(), user))
        stack.callback(users.reset, token)
