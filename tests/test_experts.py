"""Mixture-of-experts capture through transformers' experts interface, on tiny random MoE models of seven
families: bit-identical logits under every experts implementation the config may select on CPU, the
per-expert tap identities, the block output rebuilt from the expert outputs, the pooled key's positions,
the router taps and load, exact restore, the weight views, and the massive intervention inside one expert.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from outlier_study.adapters.experts import MoESpec, expert_bias_view, expert_weight_view, find_moe, moe_specs
from outlier_study.adapters.taps import EXPERT_TAPS, ROUTING, expert_key, split_expert
from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.interventions.massive import expert_choice
from outlier_study.measure.experts import ROUTER_TAPS, capture_experts, edit_experts, expert_taps
from outlier_study.measure.profiler import Profiler
from outlier_study.output import expert_tables
from outlier_study.output.files import read_csv
from outlier_study.stats.massive import ma_mask
from outlier_study.stats.reducers import TapReducer
from tests.helpers import load_named, make_cfg

# Shrunk default configs: hidden 64, 2 layers, 4 experts, top-2, vocab 258 (ids inside it), float32.
_SHRINK: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 258,
    "pad_token_id": 0,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
_LATENT = {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8}
_FIELDS: dict[str, dict[str, Any]] = {  # where a family needs a field set
    "deepseek_v2": {**_LATENT, "v_head_dim": 16, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
    "deepseek_v3": {
        **_LATENT,
        "v_head_dim": 16,
        "head_dim": 8,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
    },
    "gpt_oss": {"sliding_window": 8, "layer_types": None},
    "llama4_text": {"intermediate_size_mlp": 96},
}
FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "gpt_oss", "granitemoe")
MORE = ("phimoe", "deepseek_v3")
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
ALL_TAPS = [*EXPERT_TAPS, *ROUTER_TAPS]
_MODELS: dict[str, nn.Module] = {}


def tiny_moe(model_type: str) -> nn.Module:
    """A tiny random model of `model_type` from its default config, shrunk (built once per session)."""
    if model_type not in _MODELS:
        default = AutoConfig.for_model(model_type)
        fields = {k: v for k, v in _SHRINK.items() if hasattr(default, k)} | _FIELDS.get(model_type, {})
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **fields)
        _MODELS[model_type] = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return _MODELS[model_type]


def ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@contextmanager
def implementation(model: nn.Module, name: str) -> Iterator[None]:
    original = model.config._experts_implementation
    model.set_experts_implementation(name)
    try:
        yield
    finally:
        model.set_experts_implementation(original)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits


class Collect:
    """A sink keeping every tensor it is fed (one batch), by (layer, key)."""

    def __init__(self) -> None:
        self.got: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, layer: int, key: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        assert (layer, key) not in self.got, f"two updates of {layer} {key} in one batch"
        self.got[(layer, key)] = (x.clone(), None if valid is None else valid.clone())


@contextmanager
def observed(model: nn.Module, specs: dict[int, MoESpec]) -> Iterator[dict[int, dict[str, Any]]]:
    """Test-side hooks: each MoE layer's experts inputs (x, top_k_index, top_k_weights) and its sparse
    block's input and output."""
    seen: dict[int, dict[str, Any]] = {layer: {} for layer in specs}
    handles = []
    for layer, spec in specs.items():
        block = model.model.layers[layer]

        def experts_in(_m: nn.Module, args: tuple[Any, ...], layer: int = layer) -> None:
            if len(args) >= 3:
                seen[layer]["x"], seen[layer]["idx"], seen[layer]["w"] = (a.clone() for a in args[:3])
            else:  # experts outside the interface: every token, scaled by its routing weight
                seen[layer]["scaled"] = args[0].clone()

        def block_io(_m: nn.Module, args: tuple[Any, ...], out: Any, layer: int = layer) -> None:
            seen[layer]["in"] = args[0].clone()
            out = out[0] if isinstance(out, tuple) else out
            seen[layer]["out"] = out.reshape(args[0].shape).clone()  # Llama 4 returns (B·T, H)

        handles.append(block.get_submodule(spec.experts).register_forward_pre_hook(experts_in))
        handles.append(block.get_submodule(spec.block).register_forward_hook(block_io))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def capture_all(
    model: nn.Module, x: torch.Tensor, **kwargs: Any
) -> tuple[Collect, dict[int, dict[str, Any]]]:
    specs = moe_specs(model.model.layers)
    sink = Collect()
    with (
        observed(model, specs) as seen,
        capture_experts(model, specs, sink, ALL_TAPS, model.model.layers, **kwargs),
    ):
        logits(model, x)
    return sink, seen


# ---------------------------------------------------------------- finding the MoE block


def test_find_moe_reads_the_layout() -> None:
    mixtral = find_moe(tiny_moe("mixtral").model.layers[0])
    assert mixtral is not None
    assert (mixtral.block, mixtral.experts, mixtral.router, mixtral.shared) == (
        "mlp",
        "mlp.experts",
        "mlp.gate",
        None,
    )
    assert (mixtral.num_experts, mixtral.hidden, mixtral.intermediate) == (4, 64, 96)
    assert mixtral.has_gate and mixtral.is_concatenated and not mixtral.is_transposed and mixtral.interface
    oss = find_moe(tiny_moe("gpt_oss").model.layers[1])
    assert oss is not None and oss.router == "mlp.router"
    assert oss.is_transposed and oss.has_bias and not oss.is_concatenated and oss.custom_gate
    assert expert_taps(oss) == ["mlp.gate", "mlp.up", "mlp.hidden", "mlp.out"]  # no separate act(gate)
    qwen2 = find_moe(tiny_moe("qwen2_moe").model.layers[0])
    assert qwen2 is not None and qwen2.shared is not None
    assert (qwen2.shared.path, qwen2.shared.gated_by) == ("mlp.shared_expert", "mlp.shared_expert_gate")
    assert (qwen2.shared.gate, qwen2.shared.up, qwen2.shared.down) == ("gate_proj", "up_proj", "down_proj")
    deepseek = tiny_moe("deepseek_v2").model.layers
    assert find_moe(deepseek[0]) is None  # first_k_dense_replace: a dense MLP
    spec = find_moe(deepseek[1])
    assert spec is not None and spec.shared is not None and spec.shared.path == "mlp.shared_experts"
    granite = find_moe(tiny_moe("granitemoe").model.layers[0])
    assert granite is not None and granite.block == "block_sparse_moe"
    assert find_moe(tiny_moe("deepseek_v3").model.layers[1]).scoring == "sigmoid"  # type: ignore[union-attr]


def test_dense_layers_have_no_moe() -> None:
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, vocab_size=258)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    assert moe_specs(model.model.layers) == {}


# ---------------------------------------------------------------- measuring without changing


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES + MORE)
def test_logits_bit_identical_and_config_restored(family: str, impl: str) -> None:
    model = tiny_moe(family)
    x = ids()
    with implementation(model, impl):
        reference = logits(model, x)
        sink, _ = capture_all(model, x)
        assert model.config._experts_implementation == impl
        assert torch.equal(logits(model, x), reference)
        again = Collect()
        specs = moe_specs(model.model.layers)
        with capture_experts(model, specs, again, ALL_TAPS, model.model.layers):
            assert model.config._experts_implementation == "outlier_experts_" + impl
            assert torch.equal(logits(model, x), reference)
    layer = next(iter(specs))
    assert (layer, "mlp.hidden") in sink.got and (layer, expert_key("mlp.out", 0)) in sink.got
    assert (layer, ROUTING) in sink.got and (layer, "moe.router_probs") in sink.got


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_tap_identities(family: str) -> None:
    """On the tokens routed to each expert: mlp.gate/up are x·W_gateᵀ, x·W_upᵀ (+bias) with the weight
    views, mlp.hidden = act(gate)·up where separable, mlp.out = hidden·W_downᵀ (+bias)."""
    model = tiny_moe(family)
    sink, seen = capture_all(model, ids())
    for layer, spec in moe_specs(model.model.layers).items():
        block = model.model.layers[layer]
        experts = block.get_submodule(spec.experts)
        b, t = seen[layer]["in"].shape[:2]
        x = seen[layer]["x"].view(b, t, -1)
        for e in range(spec.num_experts):
            mask = sink.got[(layer, expert_key("mlp.hidden", e))][1]
            assert mask is not None
            routed = mask[..., 0]
            assert int(routed.sum()) == int((seen[layer]["idx"] == e).sum())
            if not routed.any():
                continue
            got = {tap: sink.got[(layer, expert_key(tap, e))][0][routed] for tap in expert_taps(spec)}
            xe = x[routed]
            for name, tap in (("gate", "mlp.gate"), ("up", "mlp.up")):
                w, bias = expert_weight_view(block, spec, name, e), expert_bias_view(block, spec, name, e)
                want = xe @ w.T + (0 if bias is None else bias)
                torch.testing.assert_close(got[tap], want, rtol=1e-5, atol=1e-6)
            if spec.separable:
                torch.testing.assert_close(got["mlp.hidden"], experts.act_fn(got["mlp.gate"]) * got["mlp.up"])
                torch.testing.assert_close(got["mlp.act"], experts.act_fn(got["mlp.gate"]))
            down, bias = expert_weight_view(block, spec, "down", e), expert_bias_view(block, spec, "down", e)
            want = got["mlp.hidden"] @ down.T + (0 if bias is None else bias)
            torch.testing.assert_close(got["mlp.out"], want, rtol=1e-5, atol=1e-6)
            assert not (sink.got[(layer, expert_key("mlp.out", e))][0][~routed]).any()  # masked rows: zeros


@pytest.mark.parametrize("family", FAMILIES)
def test_block_output_is_the_weighted_sum_of_expert_outputs(family: str) -> None:
    """Σ_e routing weight · mlp.out@e (+ the shared experts, gated where the family gates them) is the
    sparse block's output."""
    model = tiny_moe(family)
    sink, seen = capture_all(model, ids())
    for layer, spec in moe_specs(model.model.layers).items():
        block = model.model.layers[layer]
        weights, routed = sink.got[(layer, ROUTING)]
        assert routed is not None
        total = torch.zeros_like(seen[layer]["out"])
        for e in range(spec.num_experts):
            out = sink.got[(layer, expert_key("mlp.out", e))][0]
            total += torch.where(routed[..., e : e + 1], weights[..., e : e + 1] * out, 0.0)
        if spec.shared is not None:
            shared = sink.got[(layer, expert_key("mlp.out", "shared"))][0]
            if spec.shared.gated_by:
                gate = block.get_submodule(spec.shared.gated_by)
                with torch.inference_mode():
                    shared = torch.sigmoid(gate(seen[layer]["in"])) * shared
            total += shared
        torch.testing.assert_close(total, seen[layer]["out"], rtol=1e-5, atol=1e-6)


def test_pooled_key_holds_every_routed_pair_in_slot_order() -> None:
    """The pooled (B, k, T, C) tensor: slot j of token t is the expert top_k_index[t, j]'s row."""
    model = tiny_moe("qwen3_moe")
    sink, seen = capture_all(model, ids())
    for layer in moe_specs(model.model.layers):
        pooled, valid = sink.got[(layer, "mlp.hidden")]
        assert valid is None
        b, k, t, _ = pooled.shape
        idx = seen[layer]["idx"].view(b, t, k)
        for window in range(b):
            for token in range(t):
                for slot in range(k):
                    e = int(idx[window, token, slot])
                    per_expert = sink.got[(layer, expert_key("mlp.hidden", e))][0]
                    assert torch.equal(pooled[window, slot, token], per_expert[window, token])


def test_experts_outside_the_interface_through_hooks() -> None:
    """Llama 4 runs every token through every expert, its input scaled by its routing weight (0 where not
    routed): read with forward hooks, the same keys come out, and the block output is the shared expert's
    plus the sum of the expert outputs."""
    model = tiny_moe("llama4_text")
    x = ids()
    reference = logits(model, x)
    sink, seen = capture_all(model, x)
    assert torch.equal(logits(model, x), reference)
    specs = moe_specs(model.model.layers)
    assert specs and not any(spec.interface for spec in specs.values())
    for layer, spec in specs.items():
        block = model.model.layers[layer]
        weights, routed = sink.got[(layer, ROUTING)]
        assert routed is not None and bool((routed.sum(-1) == model.config.num_experts_per_tok).all())
        b, t = routed.shape[:2]
        scaled = seen[layer]["scaled"].view(spec.num_experts, b, t, -1)
        total = sink.got[(layer, expert_key("mlp.out", "shared"))][0].clone()
        for e in range(spec.num_experts):
            mask = routed[..., e]
            got = {tap: sink.got[(layer, expert_key(tap, e))][0] for tap in expert_taps(spec)}
            gate = scaled[e][mask] @ expert_weight_view(block, spec, "gate", e).T
            torch.testing.assert_close(got["mlp.gate"][mask], gate)
            torch.testing.assert_close(got["mlp.hidden"], got["mlp.act"] * got["mlp.up"])
            down = expert_weight_view(block, spec, "down", e)
            torch.testing.assert_close(got["mlp.out"][mask], got["mlp.hidden"][mask] @ down.T)
            total += got["mlp.out"]
        torch.testing.assert_close(total, seen[layer]["out"], rtol=1e-5, atol=1e-6)
        pooled, _ = sink.got[(layer, "mlp.hidden")]
        assert pooled.shape[:3] == (b, model.config.num_experts_per_tok, t)


def test_profiler_folds_the_pooled_key_and_maps_tokens_back() -> None:
    """One update per window batch over all routed pairs: medians and MA counts per window, the top
    entry's token mapped back from slot·T + token; per-expert keys get reducers on first use."""
    profiler = Profiler(["mlp.hidden"], [0], lambda _tap: TapReducer(top_k=2, ma_abs=100.0), experts=True)
    pooled = torch.full((2, 2, 5, 3), 0.5)
    pooled[1, 1, 3, 2] = 5000.0  # window 1, slot 1, token 3, channel 2
    profiler.sink(0, "mlp.hidden", pooled, None)
    valid = torch.zeros(2, 5, 1, dtype=torch.bool)
    valid[1, 3] = True
    profiler.sink(0, "mlp.hidden@1", pooled[:, 1], valid)
    stats = profiler.result()
    s = stats[(0, "mlp.hidden")]
    assert (s.n_windows, s.n_elements, s.ma_count) == (2, 60, 1)
    assert (s.top[0].window, s.top[0].token, s.top[0].channel) == (1, 3, 2)
    assert s.window_medians == [0.5, 0.5]
    e1 = stats[(0, "mlp.hidden@1")]
    assert (e1.n_windows, e1.n_elements, e1.top[0].token) == (2, 3, 3)
    assert e1.window_medians[1] == 0.5 and e1.window_medians[0] != e1.window_medians[0]  # no token: nan


def test_router_taps_and_load() -> None:
    for family in ("mixtral", "gpt_oss", "deepseek_v3"):
        model = tiny_moe(family)
        specs = moe_specs(model.model.layers)
        outputs: dict[int, Any] = {}

        def keep(_m: nn.Module, _a: Any, out: Any, layer: int, into: dict[int, Any] = outputs) -> None:
            into[layer] = out

        handles = [
            model.model.layers[layer]
            .get_submodule(spec.router)
            .register_forward_hook(lambda m, a, out, layer=layer: keep(m, a, out, layer))
            for layer, spec in specs.items()
        ]
        try:
            sink, seen = capture_all(model, ids())
        finally:
            for h in handles:
                h.remove()
        for layer, spec in specs.items():
            got, _ = sink.got[(layer, "moe.router_logits")]
            b, t, num = got.shape
            assert num == spec.num_experts
            assert torch.equal(got.view(b * t, num), outputs[layer][0].float())  # the router's own logits
            probs, _ = sink.got[(layer, "moe.router_probs")]
            want = got.sigmoid() if spec.scoring == "sigmoid" else got.softmax(-1)
            assert torch.equal(probs, want)
            weights, routed = sink.got[(layer, ROUTING)]
            counts = torch.bincount(seen[layer]["idx"].flatten(), minlength=num)
            assert torch.equal(routed.sum(dim=(0, 1)), counts)  # type: ignore[union-attr]
            idx, w = seen[layer]["idx"], seen[layer]["w"]
            assert torch.equal(weights.view(b * t, num).gather(1, idx), w)


def test_restored_after_an_error_inside_the_block_and_inside_the_forward() -> None:
    model = tiny_moe("olmoe")
    specs = moe_specs(model.model.layers)
    x = ids()
    reference = logits(model, x)
    original = model.config._experts_implementation
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_experts(model, specs, Collect(), ALL_TAPS, model.model.layers),
    ):
        raise RuntimeError("boom")
    assert model.config._experts_implementation == original

    def failing(*_args: Any) -> None:
        raise ValueError("sink failed")

    with (
        pytest.raises(ValueError, match="sink failed"),
        capture_experts(model, specs, failing, ALL_TAPS, model.model.layers),
    ):
        logits(model, x)
    assert model.config._experts_implementation == original
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, x), reference)


def test_nested_capture_and_edit_restore_in_turn() -> None:
    model = tiny_moe("mixtral")
    specs = moe_specs(model.model.layers)
    original = model.config._experts_implementation
    with edit_experts(
        model, specs, model.model.layers, "mlp.hidden", "all", "zero", 100.0, 1000.0, lambda *_: None
    ):
        selected = model.config._experts_implementation
        assert selected.startswith("outlier_experts_") and selected in ALL_EXPERTS_FUNCTIONS
        with capture_experts(model, specs, Collect(), ALL_TAPS, model.model.layers):
            assert model.config._experts_implementation == selected  # not wrapped twice
            logits(model, ids())
        assert model.config._experts_implementation == selected
    assert model.config._experts_implementation == original


# ---------------------------------------------------------------- weight views


@pytest.mark.parametrize("family", ("mixtral", "gpt_oss", "qwen2_moe"))
def test_expert_weight_view_shares_storage_and_matches(family: str) -> None:
    model = tiny_moe(family)
    layer = 1
    block = model.model.layers[layer]
    spec = find_moe(block)
    assert spec is not None
    experts = block.get_submodule(spec.experts)
    e, inter = 2, spec.intermediate
    fused = experts.gate_up_proj[e]
    if spec.is_transposed:  # gpt-oss: (H, 2I) interleaved [g0, u0, g1, u1, ...]
        gate, up, down = fused[:, 0::2].T, fused[:, 1::2].T, experts.down_proj[e].T
    else:
        gate, up, down = fused[:inter], fused[inter:], experts.down_proj[e]
    for name, want in (("gate", gate), ("up", up), ("down", down)):
        view = expert_weight_view(block, spec, name, e)
        assert view.shape == want.shape and torch.equal(view, want)
        param = experts.gate_up_proj if name != "down" else experts.down_proj
        assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        with torch.no_grad():
            before = view[3, 5].item()
            view[3, 5] = 42.0
            assert want[3, 5].item() == 42.0  # a write through the view lands in the parameter
            view[3, 5] = before
    if spec.shared is not None:
        shared = block.get_submodule(spec.shared.path)
        assert expert_weight_view(block, spec, "gate", "shared") is shared.gate_proj.weight
        assert expert_weight_view(block, spec, "down", "shared") is shared.down_proj.weight
    with pytest.raises(ValueError, match="out of range"):
        expert_weight_view(block, spec, "up", spec.num_experts)
    with pytest.raises(ValueError, match="unknown expert matrix"):
        expert_weight_view(block, spec, "qkv", 0)


# ---------------------------------------------------------------- the massive intervention in one expert


@contextmanager
def planted(model: nn.Module, layer: int, expert: int | str, tap: str, channel: int) -> Iterator[None]:
    """Scale the weights so that `expert`'s y6 (gate and up rows) or y7 (a down row) at `channel` is huge
    on the tokens routed to it; the weights are restored after."""
    block = model.model.layers[layer]
    spec = find_moe(block)
    assert spec is not None
    names = ("gate", "up") if tap == "mlp.hidden" else ("down",)
    scale = 1e3 if tap == "mlp.hidden" else 1e6
    saved = {}
    with torch.no_grad():
        for name in names:
            view = expert_weight_view(block, spec, name, expert)
            saved[name] = view[channel].clone()
            view[channel] *= scale
    try:
        yield
    finally:
        with torch.no_grad():
            for name, row in saved.items():
                expert_weight_view(block, spec, name, expert)[channel] = row


def _edited_run(
    model: nn.Module,
    layer: int,
    tap: str,
    expert: int | str,
    value: str = "zero",
    rule: tuple[float, float] = (100.0, 1000.0),
) -> tuple[Collect, Collect, dict[int, dict[str, Any]], dict[int, int], torch.Tensor]:
    """The unedited capture, then the edited one (capture inside the edit), the replacements counted."""
    specs = {layer: moe_specs(model.model.layers)[layer]}
    x = ids(seed=3)
    before, after, counted = Collect(), Collect(), {}
    with (
        observed(model, specs) as plain,
        capture_experts(model, specs, before, EXPERT_TAPS, model.model.layers),
    ):
        reference = logits(model, x)
    plain = copy.copy(plain)

    def count(lay: int, n: int) -> None:
        counted[lay] = counted.get(lay, 0) + n

    with (
        observed(model, specs) as seen,
        edit_experts(model, specs, model.model.layers, tap, [expert], value, *rule, count),
        capture_experts(model, specs, after, EXPERT_TAPS, model.model.layers),
    ):
        edited = logits(model, x)
    assert not torch.equal(edited, reference)
    assert torch.equal(logits(model, x), reference)  # restored bit-exactly
    return before, after, {"plain": plain[layer], "edited": seen[layer]}, counted, reference  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("family", "tap"),
    [
        ("mixtral", "mlp.hidden"),
        ("mixtral", "mlp.out"),
        ("gpt_oss", "mlp.hidden"),
        ("gpt_oss", "mlp.out"),
        ("llama4_text", "mlp.hidden"),
    ],
)
def test_massive_in_one_expert_moves_only_its_routed_rows(family: str, tap: str) -> None:
    """Only the (token, expert) rows whose y6/y7 held an MA change, by routing weight · the change the
    edit makes to the expert's output; the measurement inside the edit sees the edited tensor."""
    model = tiny_moe(family)
    layer, expert, channel = 0, 1, 5
    rule = (10.0, 100.0) if (family, tap) == ("gpt_oss", "mlp.hidden") else (100.0, 1000.0)  # clamped SwiGLU
    with planted(model, layer, expert, tap, channel):
        before, after, seen, counted, _ = _edited_run(model, layer, tap, expert, rule=rule)
    key = expert_key(tap, expert)
    x, valid = before.got[(layer, key)]
    assert valid is not None
    routed = valid[..., 0]
    want = x.clone()
    for window in range(x.shape[0]):  # the MA rule on each window's routed rows of this expert
        rows = x[window][routed[window]]
        mask = ma_mask(rows[None], *rule)[0]
        want[window][routed[window]] = torch.where(mask, 0.0, rows)
    replaced = int((want != x).sum())
    assert replaced > 0 and counted == {layer: replaced}
    assert torch.equal(after.got[(layer, key)][0], want)  # measurement sees the edit
    changed_rows = (want != x).any(dim=-1)
    out_before, out_after = seen["plain"]["out"], seen["edited"]["out"]
    assert torch.equal(out_after[~changed_rows], out_before[~changed_rows])  # untouched rows: bit-identical
    assert not torch.equal(out_after[changed_rows], out_before[changed_rows])
    for other in range(4):  # other experts see the same tokens and compute the same values
        if other != expert:
            assert torch.equal(
                after.got[(layer, expert_key(tap, other))][0], before.got[(layer, expert_key(tap, other))][0]
            )
    block = model.model.layers[layer]
    spec = find_moe(block)
    assert spec is not None
    weights, _ = before.got[(layer, ROUTING)]
    w = weights[..., expert] if spec.interface else routed.float()  # Llama 4 weighs the expert's input
    with torch.no_grad():
        down = expert_weight_view(block, spec, "down", expert)
        delta = want - x if tap == "mlp.out" else (want - x) @ down.T
    torch.testing.assert_close(out_after, out_before + w[..., None] * delta, rtol=1e-5, atol=1e-4)


def test_massive_at_the_shared_experts() -> None:
    model = tiny_moe("qwen2_moe")
    layer, channel = 1, 7
    with planted(model, layer, "shared", "mlp.hidden", channel):
        before, after, seen, counted, _ = _edited_run(model, layer, "mlp.hidden", "shared", "mean")
    key = expert_key("mlp.hidden", "shared")
    x, got = before.got[(layer, key)][0], after.got[(layer, key)][0]
    mask = ma_mask(x, 100.0, 1000.0)
    means = x.reshape(x.shape[0], -1).mean(dim=1)[:, None, None]
    assert int(mask.sum()) > 0 and counted == {layer: int(mask.sum())}
    torch.testing.assert_close(got, torch.where(mask, means, x))
    for e in range(4):  # routed experts untouched
        assert torch.equal(
            after.got[(layer, expert_key("mlp.out", e))][0], before.got[(layer, expert_key("mlp.out", e))][0]
        )
    rows = mask.any(dim=-1)
    assert torch.equal(seen["edited"]["out"][~rows], seen["plain"]["out"][~rows])


def test_expert_option_is_checked_against_the_model() -> None:
    spec = find_moe(tiny_moe("mixtral").model.layers[0])
    shared = find_moe(tiny_moe("qwen2_moe").model.layers[0])
    mixtral = SimpleNamespace(family="mixtral", moe={0: spec, 1: spec})
    qwen2 = SimpleNamespace(family="qwen2_moe", moe={0: shared, 1: shared})
    dense = SimpleNamespace(family="llama", moe={})
    assert expert_choice(mixtral, None, "mlp.hidden", "intervention.expert") is None  # type: ignore[arg-type]
    assert expert_choice(mixtral, 3, "mlp.out", "intervention.expert") == "3"  # type: ignore[arg-type]
    assert expert_choice(qwen2, "shared", "mlp.hidden", "intervention.expert") == "shared"  # type: ignore[arg-type]
    cases = [
        (
            mixtral,
            "4",
            "mlp.hidden",
            "intervention.expert: no expert '4' in mixtral models (allowed: 0..3, all, null)",
        ),
        (mixtral, "shared", "mlp.hidden", "no expert 'shared' in mixtral models"),
        (qwen2, "x", "mlp.hidden", "(allowed: 0..3, shared, all, null)"),
        (
            dense,
            "0",
            "mlp.hidden",
            "intervention.expert: llama models have no mixture-of-experts layers (allowed: null)",
        ),
        (
            mixtral,
            "all",
            "resid.post",
            "experts are edited at mlp.hidden (y6) or mlp.out (y7), not resid.post",
        ),
    ]
    for adapter, value, tap, message in cases:
        with pytest.raises(ConfigError) as err:
            expert_choice(adapter, value, tap, "intervention.expert")  # type: ignore[arg-type]
        assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the profile tables


def test_expert_tables_from_streamed_statistics() -> None:
    """Per-expert reducers fed by the capture give the expert-MA and router-load tables."""
    model = tiny_moe("mixtral")
    specs = moe_specs(model.model.layers)
    layer, expert, channel = 0, 1, 5
    profiler = Profiler(list(EXPERT_TAPS), list(specs), lambda _t: TapReducer(3, 100.0, 1000.0), experts=True)
    x = ids(seed=3)
    with (
        planted(model, layer, expert, "mlp.hidden", channel),
        capture_experts(model, specs, profiler.sink, EXPERT_TAPS, model.model.layers),
    ):
        logits(model, x)
    stats = profiler.result()
    layer_level, per_expert, routing = expert_tables.split_stats(stats)
    assert {split_expert(k[1])[1] for k in per_expert} == {"0", "1", "2", "3"}
    assert set(routing) == {(0, ROUTING), (1, ROUTING)}
    table = expert_tables.expert_ma_table(per_expert, x.numpy(), str, 100.0, 1000.0)
    mine = [r for r in table.rows if r[:3] == ("0", "1", "mlp.hidden")]
    assert len(mine) == 1 and int(mine[0][3]) == per_expert[(0, "mlp.hidden@1")].ma_count > 0
    assert mine[0][8] == str(channel) and mine[0][9] == "1"
    top = per_expert[(0, "mlp.hidden@1")].top[0]
    assert layer_level[(0, "mlp.hidden")].top[0].token == top.token  # the pooled key points at the token
    load = expert_tables.router_load_table(routing, int(x.numel()))
    counts = [int(r[2]) for r in load.rows if r[0] == "0"]
    assert len(counts) == 4 and sum(counts) == 2 * x.numel()  # top-2: every token routed twice
    rows = expert_tables.expert_stat_rows(per_expert)
    assert rows[0][:3] == (0, "mlp.gate", "0") and {r[2] for r in rows} == {"0", "1", "2", "3"}


# ---------------------------------------------------------------- through the app, on the tiny MoE configs

SMALL = ("dataset.seq_len=32", "dataset.n_windows=3", "dataset.batch_size=2", "progress=false")


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_profile_of_a_moe_model_writes_the_expert_tables(tmp_path: Path, model: str) -> None:
    job = run(make_cfg(*SMALL, f"model={model}"), job_dir=tmp_path / "job")
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    assert "@" not in "".join(r["tap"] for r in read_csv(job / "layer_stats.csv"))
    assert all(0 <= int(r["token"]) < 32 for r in read_csv(job / "topk.csv"))  # pooled keys mapped back
    rows = read_csv(job / "expert_stats.csv")
    experts = {r["expert"] for r in rows}
    assert {"0", "1", "2", "3"} <= experts
    assert ("shared" in experts) == (model == "tiny-deepseek-v3")
    load = read_csv(job / "tables" / "moe_router_load.csv")
    tokens = 3 * 32
    for layer in {r["layer"] for r in load}:
        routed = sum(int(r["tokens_routed"]) for r in load if r["layer"] == layer)
        shares = sum(float(r["token_share"]) for r in load if r["layer"] == layer)
        assert routed % tokens == 0 and routed // tokens >= 1  # every token routed to k experts
        assert abs(shares - routed / tokens) < 1e-3  # the shares sum to k
    assert (job / "tables" / "moe_expert_mas.md").exists()
    metrics = json.loads((job / "metrics.json").read_text())
    assert "expert_ma_count_total" in metrics


def test_massive_in_one_expert_through_the_app(tmp_path: Path) -> None:
    overrides = (*SMALL, "model=tiny-qwen3-moe", "experiment=perplexity", "intervention=massive")
    job = run(make_cfg(*overrides, "intervention.expert=1", "intervention.tap=y7"), job_dir=tmp_path / "job")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["intervention.tap"] == "mlp.out@1"
    with pytest.raises(ConfigError, match=r"intervention.expert: no expert '9' in qwen3_moe models"):
        run(make_cfg(*overrides, "intervention.expert=9"), job_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_router_taps_on_a_stack_with_dense_layers_are_measured_in_its_moe_layers(tmp_path: Path) -> None:
    """DeepSeek-V3 keeps its first layer dense: the router taps exist in the MoE layers only."""
    cfg = make_cfg(
        "model=tiny-deepseek-v3",
        "taps=[moe.router_logits,resid.post]",
        "dataset=embedded",
        "dataset.seq_len=16",
        "dataset.n_windows=2",
        "progress=false",
    )
    job = run(cfg, job_dir=tmp_path / "job")
    rows = read_csv(job / "layer_stats.csv")
    count = {
        (int(r["layer"]), r["tap"]): float(r["value"])
        for r in rows
        if r["statistic"] == "n_elements" and r["tap"] in ("moe.router_logits", "resid.post")
    }
    assert count[(1, "moe.router_logits")] > 0 and count[(0, "moe.router_logits")] == 0  # layer 0 is dense
    assert count[(0, "resid.post")] > 0


def test_massive_intervention_on_a_stack_with_dense_layers(tmp_path: Path) -> None:
    """DeepSeek-V3's router taps live in its MoE layers only: the taps an intervention may replace are
    still found (this raised a KeyError), and y6 is replaced inside the experts."""
    adapter = load_named("tiny-deepseek-v3", tmp_path / "cache").adapter
    assert "moe.router_logits" in adapter.available()
    assert "moe.router_logits" not in adapter.editable_taps() and "mlp.out" in adapter.editable_taps()
    overrides = (*SMALL, "model=tiny-deepseek-v3", "experiment=perplexity", "intervention=massive")
    overrides += ("intervention.tap=y6", "threshold.ma_abs=0.00001", "threshold.ma_ratio=4")
    job = run(make_cfg(*overrides), job_dir=tmp_path / "job")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["intervention.changed_total"] > 0
