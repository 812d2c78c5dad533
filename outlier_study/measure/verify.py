"""Check a derived adapter against the model it describes: one forward with every tap hooked.

The tap table is only as good as the dataflow it claims, so this runs the identities that tie the taps
together (the residual adds, the gated product, the down projection, the norms' γ, q/k/v as projections
of the attention input) and that hooking changes no logit. Used by the coverage test on a tiny model of
every family, and by anyone adding a family to the deviation tables.
"""

from __future__ import annotations

import torch

from outlier_study.adapters import deviations
from outlier_study.adapters.base import Adapter
from outlier_study.adapters.taps import ATTENTION_TAPS
from outlier_study.measure.hooks import tap_hooks

Taps = dict[str, torch.Tensor]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def capture(model: torch.nn.Module, adapter: Adapter, ids: torch.Tensor) -> tuple[dict[int, Taps], list[str]]:
    """Every tap of every layer (clones), and the taps that fired more than once."""
    got: dict[int, Taps] = {}
    twice: list[str] = []

    def sink(layer: int, tap: str, x: torch.Tensor, _valid: torch.Tensor | None) -> None:
        if tap in got.setdefault(layer, {}):
            twice.append(f"{tap}@{layer}")
        got[layer][tap] = x.detach().clone()

    layers = list(range(len(adapter.blocks(model))))
    with torch.no_grad(), tap_hooks(model, adapter, adapter.available(), layers, sink):
        model(ids)
    return got, twice


def _residual(adapter: Adapter, layer: int, block: torch.nn.Module, t: Taps) -> list[str]:
    names = adapter.residual_branches()
    a, m, *later = (t[n] for n in names)
    scale = adapter.output_scale_of(block)
    if adapter.parallel:
        out = adapter.residual_sum(layer, t["resid.pre"], [a, m, *later], scale)
        return [] if _close(t["resid.post"], out) else ["resid.post != resid.pre + attn + mlp"]
    attn_add, mlp_add = adapter.adds(layer)
    bad = []
    if not _close(t["resid.mid"], attn_add(t["resid.pre"], a)):
        bad.append(f"resid.mid != resid.pre + {names[0]}")
    if not _close(t["resid.post"], adapter.finish(mlp_add(t["resid.mid"], m), later, scale)):
        bad.append(f"resid.post != resid.mid + {' + '.join(names[1:])}")
    return bad


def _mlp(adapter: Adapter, block: torch.nn.Module, t: Taps) -> list[str]:
    bad = []
    sub_norm = deviations.MLP_SUB_NORM.get(adapter.family)
    product = (lambda h: adapter.module(block, sub_norm)(h)) if sub_norm else (lambda h: h)
    if {"mlp.act", "mlp.up"} <= set(t) and not _close(t["mlp.hidden"], product(t["mlp.act"] * t["mlp.up"])):
        bad.append("mlp.hidden != mlp.act * mlp.up")
    if "mlp.up" not in t and "mlp.act" in t and not _close(t["mlp.hidden"], t["mlp.act"]):
        bad.append("mlp.hidden != mlp.act")
    down = adapter.module(block, adapter.down)
    if not _close(t["mlp.out"], down(t["mlp.hidden"])):
        bad.append("mlp.out != down(mlp.hidden)")
    return bad


def _norms(adapter: Adapter, block: torch.nn.Module, t: Taps) -> list[str]:
    bad = []
    for side in ("attn", "mlp"):
        if f"{side}.norm_std" not in t:
            continue
        norm = adapter.module(block, adapter.taps[f"{side}.norm"].module)
        weight = getattr(norm, "weight", None)
        rebuilt = t[f"{side}.norm_std"].float()
        if weight is not None:
            rebuilt = rebuilt * (weight.float() + adapter.gamma_offset)
        if getattr(norm, "bias", None) is not None:
            rebuilt = rebuilt + norm.bias.float()
        if not _close(rebuilt, t[f"{side}.norm"]):
            bad.append(f"{side}.norm != {side}.norm_std · γ")
    return bad


def _projections(adapter: Adapter, block: torch.nn.Module, t: Taps) -> list[str]:
    source = t.get("attn.norm", t["resid.pre"])
    bad = []
    for tap, weight in (("attn.q", "q"), ("attn.k", "k"), ("attn.v", "v")):
        if tap not in t or weight not in adapter.weights or "kv_a" in adapter.weights:
            continue
        spec = adapter.weights[weight]
        module = adapter.module(block, spec.module)
        full = module(source)
        part = full[..., spec.start : spec.stop]
        if not _close(t[tap], part):
            bad.append(f"{tap} != {weight} projection of the attention input")
    return bad


def verify(model: torch.nn.Module, adapter: Adapter, ids: torch.Tensor) -> list[str]:
    """The identities that fail (empty: the adapter describes the model), hooked logits included."""
    layers = list(range(len(adapter.blocks(model))))
    with torch.no_grad():
        plain = model(ids).logits
        with tap_hooks(model, adapter, adapter.available(), layers, lambda *a: None):
            hooked = model(ids).logits
    got, twice = capture(model, adapter, ids)
    problems = [f"fired twice: {', '.join(twice)}"] if twice else []
    if not torch.equal(plain, hooked):
        problems.append("hooked logits differ from unhooked ones")
    blocks = adapter.blocks(model)
    for layer, t in sorted(got.items()):
        expected = [tap for tap in adapter.available() if adapter.has_tap(layer, tap)]
        missing = [tap for tap in expected if tap not in t and tap not in ATTENTION_TAPS]
        if missing:
            problems.append(f"layer {layer}: taps never fired: {', '.join(missing)}")
            continue
        block = blocks[layer]
        found = _residual(adapter, layer, block, t) + _norms(adapter, block, t)
        found += _projections(adapter, block, t)
        if layer not in adapter.moe:
            found += _mlp(adapter, block, t)
        problems += [f"layer {layer}: {p}" for p in found]
        nxt = got.get(layer + 1)
        if nxt is not None and not torch.equal(t["resid.post"], nxt["resid.pre"]):
            problems.append(f"layer {layer}: resid.post != next layer's resid.pre")
    return problems
