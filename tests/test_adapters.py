"""Each adapter on a tiny random model: taps resolve, identities hold, logits unchanged."""

from __future__ import annotations

import pytest
import torch

from outlier_study.adapters import adapter_for_config
from outlier_study.adapters.taps import ATTENTION_TAPS, CANONICAL_TAPS
from outlier_study.errors import ConfigError
from outlier_study.measure.hooks import tap_hooks
from outlier_study.models.loader import LoadedModel

Captured = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]


def capture_all(lm: LoadedModel, ids: torch.Tensor) -> tuple[Captured, torch.Tensor]:
    got: Captured = {}

    def sink(layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        assert (layer, tap) not in got, f"{tap} at layer {layer} fired twice"
        got[(layer, tap)] = (x.clone(), valid)

    layers = list(range(lm.n_layers))
    with torch.no_grad(), tap_hooks(lm.model, lm.adapter, lm.adapter.available(), layers, sink):
        logits = lm.model(ids).logits
    return got, logits


def test_every_tap_fires_once_per_layer_and_logits_are_identical(
    tiny: LoadedModel, token_ids: torch.Tensor
) -> None:
    with torch.no_grad():
        plain = tiny.model(token_ids).logits
    got, hooked = capture_all(tiny, token_ids)
    assert torch.equal(plain, hooked)
    expected = {(layer, tap) for layer in range(tiny.n_layers) for tap in tiny.adapter.available()}
    assert set(got) == expected


def test_no_hook_or_attention_function_left_behind_even_on_error(
    tiny: LoadedModel, token_ids: torch.Tensor
) -> None:
    impl = tiny.model.config._attn_implementation

    def count_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.model.modules())

    before = count_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with tap_hooks(tiny.model, tiny.adapter, tiny.adapter.available(), [0], lambda *a: None):
            assert count_hooks() > before
            assert tiny.model.config._attn_implementation != impl
            raise RuntimeError("boom")
    assert count_hooks() == before
    assert tiny.model.config._attn_implementation == impl


def test_operator_identities(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    got, _ = capture_all(tiny, token_ids)
    a = tiny.adapter
    gemma = "attn.post_norm" in a.taps
    for layer in range(tiny.n_layers):
        t = {tap: got[(layer, tap)][0] for tap in a.available()}
        block = a.blocks(tiny.model)[layer]
        if "mlp.up" in a.taps:
            assert torch.equal(t["mlp.hidden"], t["mlp.act"] * t["mlp.up"])
            down = block.mlp.down_proj
        else:
            assert torch.equal(t["mlp.hidden"], t["mlp.act"])
            down = block.mlp.c_proj
        assert torch.equal(t["mlp.out"], down(t["mlp.hidden"]))
        attn_add = t["attn.post_norm"] if gemma else t["attn.out"]
        mlp_add = t["mlp.post_norm"] if gemma else t["mlp.out"]
        assert torch.equal(t["resid.mid"], t["resid.pre"] + attn_add)
        assert torch.equal(t["resid.post"], t["resid.mid"] + mlp_add)
        for side in ("attn", "mlp"):
            norm = block.get_submodule(a.norms[side].module)
            gamma = norm.weight.float() + a.gamma_offset
            rebuilt = t[f"{side}.norm_std"].float() * gamma
            if getattr(norm, "bias", None) is not None:
                rebuilt = rebuilt + norm.bias
            torch.testing.assert_close(
                rebuilt.to(t[f"{side}.norm"].dtype), t[f"{side}.norm"], rtol=1e-5, atol=1e-6
            )
        if layer + 1 < tiny.n_layers:
            assert torch.equal(t["resid.post"], got[(layer + 1, "resid.pre")][0])


def test_qkv_taps_are_the_projections(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    got, _ = capture_all(tiny, token_ids)
    block = tiny.adapter.blocks(tiny.model)[1]
    x2 = got[(1, "attn.norm")][0]
    if tiny.adapter.family == "gpt2":
        q, k, v = block.attn.c_attn(x2).chunk(3, dim=-1)
    else:
        q, k, v = block.self_attn.q_proj(x2), block.self_attn.k_proj(x2), block.self_attn.v_proj(x2)
    assert torch.equal(got[(1, "attn.q")][0], q)
    assert torch.equal(got[(1, "attn.k")][0], k)
    assert torch.equal(got[(1, "attn.v")][0], v)


def test_attention_probs_match_eager_attention_weights(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    got, _ = capture_all(tiny, token_ids)
    impl = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tiny.model(token_ids, output_attentions=True)
    finally:
        tiny.model.set_attn_implementation(impl)
    for layer, weights in enumerate(out.attentions):
        probs, valid = got[(layer, "attn.probs")]
        torch.testing.assert_close(probs, weights, rtol=1e-5, atol=1e-6)
        scores = got[(layer, "attn.scores")][0]
        assert scores.shape == probs.shape
        full = valid.expand_as(probs)
        assert torch.all(probs[~full] == 0)  # masked entries get no probability ...
        assert full.sum() < full.numel()  # ... and there are masked entries (causal)
        assert not torch.any(torch.triu(full[0, 0], diagonal=1))  # no future position is ever valid


@pytest.mark.parametrize(
    ("alias", "gated", "gpt2"),
    [
        ("x1", "resid.pre", "resid.pre"),
        ("x9", "attn.out", "attn.out"),
        ("y4", "mlp.up", "mlp.hidden"),
        ("y6", "mlp.hidden", "mlp.hidden"),
        ("attn.in", "resid.pre", "resid.pre"),
        ("mlp.in", "resid.mid", "resid.mid"),
    ],
)
def test_paper_aliases_resolve_per_family(tiny: LoadedModel, alias: str, gated: str, gpt2: str) -> None:
    expected = gpt2 if tiny.adapter.family == "gpt2" else gated
    assert tiny.adapter.canonical(alias) == expected


def test_default_taps_skip_attention_maps_and_keep_forward_order(tiny: LoadedModel) -> None:
    taps = tiny.arch.taps(None)
    assert not set(taps) & ATTENTION_TAPS
    assert taps == sorted(taps, key=CANONICAL_TAPS.index)
    assert tiny.arch.taps(["y7", "x1"]) == ["resid.pre", "mlp.out"]


def test_bad_taps_and_layers_are_config_errors(tiny: LoadedModel) -> None:
    with pytest.raises(ConfigError, match=r"taps: unknown tap 'mlp.nope'.*allowed: .*resid.pre"):
        tiny.arch.taps(["mlp.nope"])
    if tiny.adapter.family == "gpt2":
        with pytest.raises(ConfigError, match=r"taps: tap 'mlp.up' does not exist in gpt2 models"):
            tiny.arch.taps(["mlp.up"])
    elif tiny.adapter.family == "llama":
        with pytest.raises(ConfigError, match="tap 'mlp.post_norm' does not exist in llama models"):
            tiny.arch.taps(["mlp.post_norm"])
    with pytest.raises(ConfigError, match=r"layers: layer 3 out of range \(allowed: 0..2\)"):
        tiny.arch.layers([0, 3])
    assert tiny.arch.layers([-1, 0]) == [0, 2]


def test_out_of_scope_family_is_a_config_error_with_the_reason() -> None:
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match=r"model: model_type 'mamba' is not measured here: state-space"):
        adapter_for_config(AutoConfig.for_model("mamba"))
