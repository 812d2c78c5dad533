"""Feed the sink the taps inside mixture-of-experts layers (through `routed.py`'s mechanism).

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
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_study.adapters.experts import MoESpec
from outlier_study.adapters.taps import EXPERT_TAPS, ROUTING, SHARED_EXPERT, expert_key
from outlier_study.measure.experts.routed import (
    CAPTURES,
    Routed,
    Site,
    activate,
    first_tensor,
    shape_hook,
    shared_modules,
    sites_of,
    watch,
)

ROUTER_TAPS: tuple[str, ...] = ("moe.router_logits", "moe.router_probs")
MOE_TAPS: frozenset[str] = frozenset(EXPERT_TAPS) | frozenset(ROUTER_TAPS)

# (layer index, key, tensor, valid mask or None): the hook sink of measure/hooks.py
Sink = Callable[[int, str, torch.Tensor, torch.Tensor | None], None]


@dataclass
class _Capture:
    sink: Sink
    taps: tuple[str, ...]  # the expert taps asked for, in forward order
    pooled: frozenset[str]  # those fed at the layer-level key too (pooled over routed pairs)
    per_expert: bool
    sites: dict[int, Site] = field(default_factory=dict)  # id(experts module) -> site

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
        _record(self, site, routed)
        return out


# ------------------------------------------------------------------ recording


def _record(capture: _Capture, site: Site, routed: Routed) -> None:
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
    sink: Sink, layer: int, tap: str, routed: Routed, shape: tuple[int, int, int, int], num: int
) -> None:
    """Every routed (token, expert) pair as (B, k, T, C): slot j holds each token's j-th routed choice."""
    b, k, t, _ = shape
    pooled = routed.like().new_zeros(shape)
    for e in routed.hit:
        tok, slot = routed.rows(e)
        pooled[tok // t, slot, tok % t] = routed.taps(e)[tap].to(pooled.dtype)
    sentinel = routed.idx >= num
    valid: torch.Tensor | None = (~sentinel).view(b, t, k).permute(0, 2, 1)[..., None]
    if pooled.device.type == "cpu" and not bool(sentinel.any()):
        valid = None  # spares the reducers a mask; on a GPU this check would wait for the device
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


def _router_hook(
    site: Site, router_weight: nn.Module, sink: Sink, taps: frozenset[str]
) -> Callable[..., None]:
    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        b, t = site.shape
        x = first_tensor(args, kwargs).reshape(b * t, -1)
        # read when the hook runs: a layerwise model holds the weight only while its layer runs
        weight, bias = router_weight.weight, getattr(router_weight, "bias", None)
        with torch.no_grad():
            logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            logits = logits.view(b, t, -1)
            if "moe.router_logits" in taps:
                sink(site.layer, "moe.router_logits", logits, None)
            if "moe.router_probs" in taps:
                probs = logits.sigmoid() if site.spec.scoring == "sigmoid" else logits.softmax(dim=-1)
                sink(site.layer, "moe.router_probs", probs, None)

    return pre


def _shared_capture(stack: ExitStack, block: nn.Module, site: Site, capture: _Capture) -> None:
    """Shared experts are ordinary linears: forward hooks, key '<tap>@shared', reshaped to (B, T, C)."""
    shared = site.spec.shared
    assert shared is not None
    parts = shared_modules(block, shared)
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
        emit("mlp.hidden", first_tensor(args, kwargs))

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
        for block, site in sites_of(specs, layers):
            stack.callback(block.register_forward_pre_hook(shape_hook(site), with_kwargs=True).remove)
            if router_wanted:
                router = block.get_submodule(site.spec.router)
                hook = _router_hook(site, block.get_submodule(site.spec.router_weight), sink, router_wanted)
                stack.callback(router.register_forward_pre_hook(hook, with_kwargs=True).remove)
            if needs_experts:
                watch(stack, block, site, capture)
            if per_expert and site.spec.shared is not None and expert_wanted:
                _shared_capture(stack, block, site, capture)
        activate(stack, model, capture, CAPTURES)
        yield
