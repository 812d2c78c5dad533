"""QuaRot's rotations on tiny random models: R2 (per head, folded), R3 (queries and keys after RoPE,
online, read by the KV quantizer), GPT-2's LayerNorms turned into RMSNorms, Gemma3's post-norms online."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from outlier_study.models.loader import LoadedModel
from outlier_study.quant.attention_inputs import QKV, attention_inputs
from outlier_study.quant.fake import QuantSpec, fake_quant, quantize
from outlier_study.quant.rotation import Rotations, head_dim, rotate
from tests.helpers import assert_bit_exact, hook_count, snapshot
from tests.test_quant import TOL, logits, perturbed, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _state(lm: LoadedModel) -> tuple[dict[str, torch.Tensor], int, str, list[type]]:
    """What a restore must give back: every tensor, the hooks, the attention implementation, the modules."""
    types = [type(m) for m in lm.model.modules()]
    return snapshot(lm), hook_count(lm), lm.model.config._attn_implementation, types


def _assert_restored(lm: LoadedModel, state: tuple[dict[str, torch.Tensor], int, str, list[type]]) -> None:
    before, hooks, impl, types = state
    assert_bit_exact(lm, before)
    assert hook_count(lm) == hooks
    assert lm.model.config._attn_implementation == impl
    assert [type(m) for m in lm.model.modules()] == types


# (model, extra hooks per layer: R4's pre-hook, and one per post-norm rotated online)
FAMILIES = [("tiny-llama", 1), ("tiny-gpt2", 1), ("tiny-gemma3", 3), ("tiny-phi3", 1), ("tiny-qwen3", 1)]


@pytest.mark.parametrize(("name", "hooks_per_layer"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_rotation_is_exact_and_restores_bit_exactly(
    model_cache: Path, ids: torch.Tensor, name: str, hooks_per_layer: int
) -> None:
    lm = perturbed(name, model_cache)  # non-trivial γ and β: folding them is not a no-op
    ref, state = logits(lm, ids), _state(lm)
    with rotate(lm, seed=1) as record:
        rotated = logits(lm, ids)
        assert hook_count(lm) == state[1] + hooks_per_layer * lm.n_layers
        assert lm.model.config._attn_implementation != state[2]  # R3 runs in the attention function
        norms = [m for m in lm.model.modules() if isinstance(m, nn.LayerNorm)]
        assert not norms  # GPT-2's LayerNorms (ln_f too) are RMSNorms for the block
    assert rel_diff(rotated, ref) <= TOL
    assert record["rotation.layernorm_to_rms"] == (name == "tiny-gpt2")
    assert record["rotation.post_norms_online"] == (
        "attn_post, mlp_post" if name == "tiny-gemma3" else "none"
    )
    hd = head_dim(lm.model.config)  # 16, Qwen3's default 128
    assert record["rotation.head"] == record["rotation.qk_online"] == f"diag(±1)·(H{hd} ⊗ R1)"
    _assert_restored(lm, state)
    with pytest.raises(RuntimeError, match="boom"), rotate(lm, seed=2):
        raise RuntimeError("boom")
    _assert_restored(lm, state)
    assert torch.equal(logits(lm, ids), ref)


def test_gpt2_stream_is_mean_zero_under_rotation(model_cache: Path, ids: torch.Tensor) -> None:
    """The centered writers make every residual state mean-zero before Q: rotated back by Qᵀ, each layer's
    input has mean 0 (what lets the LayerNorms become RMSNorms)."""
    lm = perturbed("tiny-gpt2", model_cache)
    q = Rotations.seeded(lm, 0).residual.matrix().float()
    seen: list[torch.Tensor] = []
    block = lm.adapter.blocks(lm.model)[2]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with rotate(lm, seed=0):
            logits(lm, ids)
    finally:
        handle.remove()
    stream = seen[0] @ q.T
    assert stream.mean(-1).abs().max() <= 1e-5 * stream.abs().max()


def test_r2_rotates_every_value_head_and_o_proj_undoes_it(model_cache: Path, ids: torch.Tensor) -> None:
    """v_proj's output of each (GQA) kv head arrives multiplied by R2; o_proj's output is the plain one
    rotated by the residual Q: the fold is exact."""
    lm = perturbed("tiny-llama", model_cache)
    attn = lm.adapter.blocks(lm.model)[1].self_attn
    rot = Rotations.seeded(lm, 3)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        hooks = [
            attn.v_proj.register_forward_hook(lambda m, a, o: got.__setitem__("v", o.detach())),
            attn.o_proj.register_forward_hook(lambda m, a, o: got.__setitem__("o", o.detach())),
        ]
        try:
            logits(lm, ids)
        finally:
            for h in hooks:
                h.remove()
        return got["v"], got["o"]

    v, o = outputs()
    with rotate(lm, seed=3):
        v_rot, o_rot = outputs()
    hd = rot.head.size
    r2 = rot.head.matrix().float()
    heads = v.unflatten(-1, (-1, hd))
    assert heads.shape[-2] == lm.model.config.num_key_value_heads == 2
    assert torch.allclose(v_rot.unflatten(-1, (-1, hd)), heads @ r2, atol=1e-5)
    assert not torch.allclose(v_rot, v, atol=1e-2)
    assert torch.allclose(o_rot, o @ rot.residual.matrix().float(), atol=1e-5)


def _observer(store: list[QKV]) -> object:
    def transform(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        if getattr(module, "layer_idx", 0) == 0:
            store.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return q, k, v

    return transform


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_r3_rotates_post_rope_queries_and_keys_and_keeps_the_scores(
    model_cache: Path, ids: torch.Tensor, name: str
) -> None:
    lm = perturbed(name, model_cache)
    plain: list[QKV] = []
    rotated: list[QKV] = []
    with attention_inputs(lm.model, _observer(plain)):  # type: ignore[arg-type]
        logits(lm, ids)
    with rotate(lm, seed=4), attention_inputs(lm.model, _observer(rotated)):  # type: ignore[arg-type]
        logits(lm, ids)
    (q, k, _), (q_rot, k_rot, _) = plain[0], rotated[0]
    h3 = Rotations.seeded(lm, 4).qk.matrix().float()
    assert torch.allclose(k_rot, k @ h3, atol=1e-5) and torch.allclose(q_rot, q @ h3, atol=1e-5)
    assert not torch.allclose(k_rot, k, atol=1e-2)
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2)
    scores_rot = q_rot @ k_rot.repeat_interleave(groups, 1).transpose(-1, -2)
    assert rel_diff(scores_rot, scores) <= TOL


def test_kv_quantization_reads_the_rotated_keys(model_cache: Path, ids: torch.Tensor) -> None:
    """A planted outlier channel in layer 0's keys: 4-bit per-token-and-head keys lose the quiet channels;
    the KV quantizer receives the R3-rotated keys (outlier spread over the head) and errs less."""
    lm = perturbed("tiny-llama", model_cache)
    with torch.no_grad():
        # kv head 0, channel 3 (RoPE mixes it with its pair, channel 11)
        lm.model.model.layers[0].self_attn.k_proj.weight[3] *= 30.0
    spec = QuantSpec(kv_bits=4)

    def key_error() -> float:
        seen_in: list[QKV] = []
        seen_out: list[QKV] = []
        with attention_inputs(lm.model, _observer(seen_in)):  # type: ignore[arg-type]
            with fake_quant(lm, spec), attention_inputs(lm.model, _observer(seen_out)):  # type: ignore[arg-type]
                logits(lm, ids)
        k, kq = seen_in[0][1], seen_out[0][1]
        assert torch.equal(kq, quantize(k, 4))  # one scale per token and head, on what the function gets
        return float((kq - k)[:, 0].norm() / k[:, 0].norm())

    plain = key_error()
    with rotate(lm):
        rotated = key_error()
    assert rotated < 0.75 * plain  # were the keys quantized before R3, both errors would be equal
