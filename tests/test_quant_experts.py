"""Quantization of routed experts (fused 3-D parameters, run through transformers' experts interface) and
the quant experiment on every covered family: each expert's matrices on the grid per output channel, the
router in full precision, the experts' inputs and hidden activations quantized, GPTQ with per-expert
Hessians and its RTN fallback, exact restore; then one RTN job per covered family, GPTQ on a subset."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

import outlier_study.quant.weights as weights_module
from outlier_study.adapters import adapter_for_config
from outlier_study.adapters.taps import split_expert
from outlier_study.app import run
from outlier_study.measure.experts import capture_experts
from outlier_study.models.loader import LoadedModel, load_model
from outlier_study.models.tiny import tiny_config
from outlier_study.quant.error import quant_error
from outlier_study.quant.fake import QuantSpec, fake_quant, quantize, quantize_rows
from outlier_study.quant.targets import quant_weights
from outlier_study.quant.weights import WeightJob, quantize_weights
from tests.helpers import assert_bit_exact, hook_count, make_cfg, snapshot
from tests.test_coverage import recorded_covered

SMALL = ("dataset=embedded", "dataset.seq_len=16", "dataset.n_windows=2", "progress=false")
# Layouts: concatenated gate/up (qwen3_moe, and a shared expert with its sigmoid gate: qwen2_moe), (in, out)
# slices with interleaved gate/up and biases (gpt_oss), experts outside the interface with an nn.Linear
# router (llama4_text).
LAYOUTS = ("qwen3_moe", "qwen2_moe", "gpt_oss", "llama4_text")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def family_overrides(family: str) -> tuple[str, ...]:
    """The tiny random model of `family` (models/tiny.py's shrink, as the coverage uses), eager attention."""
    return (
        "model=tiny-mixtral",
        f"model.model_type={family}",
        f"model.name=tiny-{family}",
        "model.attn_implementation=eager",
    )


def tiny(family: str, cache: Path) -> LoadedModel:
    return load_model(make_cfg(*family_overrides(family)).model, "float32", "cpu", cache)


def ids(batch: int = 2, tokens: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def routers(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Every router weight (and shared-expert gate) of the MoE layers, copied."""
    blocks = lm.adapter.blocks(lm.model)
    out = {}
    for layer, spec in lm.adapter.moe.items():
        out[f"{layer}:{spec.router_weight}"] = lm.adapter.module(blocks[layer], spec.router_weight).weight
        if spec.shared is not None and spec.shared.gated_by:
            out[f"{layer}:{spec.shared.gated_by}"] = lm.adapter.module(
                blocks[layer], spec.shared.gated_by
            ).weight
    return {k: v.detach().clone() for k, v in out.items()}


def levels(rows: torch.Tensor) -> int:
    """The most distinct values in any row."""
    return (
        max((int(r.unique().numel()) for r in rows.reshape(-1, rows.shape[-1])), default=0)
        if rows.numel()
        else 0
    )


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("family", LAYOUTS)
def test_rtn_quantizes_every_routed_expert_per_output_channel_and_no_router(
    model_cache: Path, family: str
) -> None:
    lm = tiny(family, model_cache)
    before, router_before = snapshot(lm), routers(lm)
    experts = [t for t in quant_weights(lm.adapter, lm.model) if t.experts is not None]
    assert experts and {t.layer for t in experts} == set(lm.adapter.moe)
    blocks = lm.adapter.blocks(lm.model)
    live = {
        id(lm.adapter.module(blocks[layer], s.router_weight).weight) for layer, s in lm.adapter.moe.items()
    }
    assert not any(id(t.param) in live for t in quant_weights(lm.adapter, lm.model))  # routers: not targets
    originals = {t.param: t.out_in().detach().clone() for t in experts}
    spec = QuantSpec(w_bits=4, w_group_size=16)
    with pytest.raises(RuntimeError, match="boom"), fake_quant(lm, spec) as record:
        assert record["quant.n_routed_experts"] == sum(s.num_experts for s in lm.adapter.moe.values())
        for t in experts:
            q, w = t.out_in(), originals[t.param]
            assert q.dim() == 3 and q.shape[0] == t.experts.num_experts  # type: ignore[union-attr]
            for e in range(q.shape[0]):  # each expert's own rows and groups: RTN of that expert's slice
                assert not torch.equal(q[e], w[e])
                assert torch.equal(q[e], quantize(w[e], 4, group_size=16))  # RTN of this expert alone
                assert levels(q[e].reshape(q.shape[1], -1, 16)) <= 2**4 - 1
        assert all(torch.equal(routers(lm)[k], v) for k, v in router_before.items())
        raise RuntimeError("boom")
    assert_bit_exact(lm, before)


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("family", LAYOUTS)
def test_activation_quant_reaches_each_experts_inputs_and_hidden_not_the_router(
    model_cache: Path, family: str, granularity: str
) -> None:
    """Under W16A4 every routed expert's down_proj input is on a 4-bit grid per routed token (per sequence
    and expert with `tensor`), the experts' input per token (sequence); the router reads the full-precision
    input; hooks and implementation are the model's own again after."""
    lm = tiny(family, model_cache)
    x = ids()
    hooks, impl = hook_count(lm), lm.model.config._experts_implementation
    blocks = lm.adapter.blocks(lm.model)
    layer = min(lm.adapter.moe)
    moe = lm.adapter.moe[layer]
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def pre(_m: Any, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args[0].detach().clone())

        return pre

    hidden: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sink(_layer: int, key: str, value: torch.Tensor, valid: torch.Tensor | None) -> None:
        tap, expert = split_expert(key)
        if tap == "mlp.hidden" and expert is not None and expert.isdigit() and valid is not None:
            hidden.append((value, valid[..., 0]))

    with ExitStack() as stack:  # hooks appended after the quantizer's: they see what the matrices read
        stack.enter_context(fake_quant(lm, QuantSpec(a_bits=4, a_granularity=granularity)))
        for name in ("router", "experts"):
            module = lm.adapter.module(blocks[layer], getattr(moe, name))
            stack.callback(module.register_forward_pre_hook(keep(name)).remove)
        stack.enter_context(
            capture_experts(lm.model, lm.adapter.moe, sink, ["mlp.hidden"], blocks, pooled=())
        )
        stack.enter_context(torch.inference_mode())
        lm.model(input_ids=x, use_cache=False)
    assert hook_count(lm) == hooks and lm.model.config._experts_implementation == impl
    assert levels(inputs["router"]) > 2**4  # full precision
    experts_in = inputs["experts"]
    rows = experts_in.reshape(-1, x.shape[1], experts_in.shape[-1])  # (sequence (and expert), T, H)
    assert levels(rows if granularity == "token" else rows.reshape(rows.shape[0], -1)) <= 15
    assert hidden
    for value, valid in hidden:
        if granularity == "token":
            assert levels(value[valid]) <= 15
        else:  # one scale per sequence and expert: every routed row of a window on one grid
            for b in range(value.shape[0]):
                assert levels(value[b][valid[b]].reshape(1, -1)) <= 15


# ------------------------------------------------------------------------------------- quantization error


def test_quant_error_of_routed_experts_matches_a_direct_computation(model_cache: Path) -> None:
    """With every token routed to every expert, the error row of a fused experts parameter is
    sqrt(Σ_e ‖Q(X_e)Q(W_e)ᵀ − X_e W_eᵀ‖² / Σ_e ‖X_e W_eᵀ‖²), here computed from the experts' input alone."""
    lm = tiny("qwen3_moe", model_cache)
    blocks = lm.adapter.blocks(lm.model)
    layer = min(lm.adapter.moe)
    moe = lm.adapter.moe[layer]
    for at, spec in lm.adapter.moe.items():  # every token to every expert
        lm.adapter.module(blocks[at], spec.router).top_k = spec.num_experts
    experts = lm.adapter.module(blocks[layer], moe.experts)
    captured: list[torch.Tensor] = []
    handle = experts.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    try:
        with quant_error(lm, QuantSpec(w_bits=4, a_bits=6)) as log, torch.inference_mode():
            lm.model(input_ids=ids(), use_cache=False)
    finally:
        handle.remove()
    x = captured[0]
    sq = {"gate_up_proj": [0.0, 0.0], "down_proj": [0.0, 0.0]}

    def add(name: str, inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ref = inp @ w.T
        sq[name][0] += float((quantize(inp, 6) @ quantize(w, 4).T - ref).double().square().sum())
        sq[name][1] += float(ref.double().square().sum())
        return ref

    for e in range(moe.num_experts):
        gate, up = add("gate_up_proj", x, experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        add("down_proj", experts.act_fn(gate) * up, experts.down_proj[e].detach())
    errors = log.relative()
    for name, (err, ref) in sq.items():
        assert errors[(layer, f"{moe.experts}.{name}")] == pytest.approx((err / ref) ** 0.5, rel=1e-4)
    assert set(errors) == {(t.layer, t.path) for t in quant_weights(lm.adapter, lm.model)}


@pytest.mark.parametrize("family", LAYOUTS)
def test_quant_error_has_a_row_per_experts_parameter_in_every_layout(model_cache: Path, family: str) -> None:
    lm = tiny(family, model_cache)
    targets = {(t.layer, t.path) for t in quant_weights(lm.adapter, lm.model)}
    for bits, low, high in ((16, 0.0, 0.0), (4, 1e-6, 1.0)):
        with quant_error(lm, QuantSpec(w_bits=bits, a_bits=bits)) as log, torch.inference_mode():
            lm.model(input_ids=ids(), use_cache=False)
        errors = log.relative()
        assert set(errors) == targets
        assert all(low <= v <= high for v in errors.values()), errors


# --------------------------------------------------------------------------------------------- GPTQ


def test_gptq_uses_the_tokens_routed_to_each_expert_and_rounds_the_unrouted_ones(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer 0 of tiny qwen3_moe: each expert's gate_up Hessian is 2XᵀX/n of the inputs routed to it in
    the plain model; with one calibration token only 2 of 4 experts per layer are reached, the others are
    rounded to nearest and listed in quant.gptq.rtn_fallback."""
    lm = tiny("qwen3_moe", model_cache)
    before = snapshot(lm)
    calib = ids(2, 16, seed=3)
    block = lm.adapter.blocks(lm.model)[0]
    spec0 = lm.adapter.moe[0]
    experts0 = lm.adapter.module(block, spec0.experts)
    routed: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = experts0.register_forward_pre_hook(lambda _m, a: routed.append((a[0].clone(), a[1].clone())))
    with torch.inference_mode():
        for batch in calib.split(2):
            lm.model(input_ids=batch, use_cache=False)
    handle.remove()
    x, idx = torch.cat([r[0] for r in routed]), torch.cat([r[1] for r in routed])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = weights_module.gptq_quantize

    def spy(w: torch.Tensor, h: torch.Tensor, *args: Any) -> Any:
        seen.append((w.clone(), h.clone()))
        return real(w, h, *args)

    monkeypatch.setattr(weights_module, "gptq_quantize", spy)
    spec = QuantSpec(w_bits=4, weights="gptq")
    gptq, record = quantize_weights(WeightJob(lm, spec, None, calib, batch_size=2))
    assert gptq is not None
    for e in range(spec0.num_experts):
        w = experts0.gate_up_proj[e].detach()
        [h] = [h for sw, h in seen if torch.equal(sw, w)]
        xe = x[(idx == e).any(dim=-1)].double()
        torch.testing.assert_close(h, 2 * xe.t() @ xe / xe.shape[0], rtol=1e-5, atol=1e-6)
    assert record["quant.gptq.rtn_fallback"] == []
    assert_bit_exact(lm, before)

    one_token = ids(1, 1, seed=4)
    gptq, record = quantize_weights(WeightJob(lm, spec, None, one_token))
    assert gptq is not None
    fallback = record["quant.gptq.rtn_fallback"]
    k = int(lm.model.config.num_experts_per_tok)
    for t in (t for t in quant_weights(lm.adapter, lm.model) if t.experts is not None):
        missed = [e for e in range(t.experts.num_experts) if f"{t.layer}:{t.path}[{e}]" in fallback]
        assert len(missed) == t.experts.num_experts - k, (t.layer, t.path, fallback)
        w, q = t.out_in().detach(), gptq[t.param]
        for e in range(w.shape[0]):
            rtn = quantize_rows(w[e], 4)
            assert torch.equal(q[e], rtn) == (e in missed)
            assert levels(q[e]) <= 15
    assert_bit_exact(lm, before)


# ------------------------------------------------------------------- the experiment on every family


def _quant_job(tmp_path: Path, family: str, *overrides: str) -> dict[str, Any]:
    cfg = make_cfg("experiment=quant", *family_overrides(family), *SMALL, *overrides)
    job = run_job(cfg, tmp_path / family)
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "ok", status
    return json.loads((job / "metrics.json").read_text())


def run_job(cfg: Any, folder: Path) -> Path:
    return run(cfg, job_dir=folder)


def _expected_experts(family: str) -> int:
    return sum(s.num_experts for s in adapter_for_config(tiny_config(family)).moe.values())


@pytest.mark.parametrize("family", sorted(recorded_covered()))
def test_quant_rtn_runs_on_every_covered_family(tmp_path: Path, family: str) -> None:
    metrics = _quant_job(tmp_path, family, "quant=w4a8", "method=none", "experiment.diag_windows=1")
    assert math.isfinite(metrics["ppl"]) and metrics["ppl"] > 1
    assert metrics["quant.label"] == "W4A8" and metrics["quant.n_linears"] > 0
    assert metrics["quant.n_routed_experts"] == _expected_experts(family)
    assert 0 < metrics["quant_error.mean"] < 1


GPTQ_FAMILIES = ("llama", "gpt2", "gemma3_text", "qwen3_moe", "deepseek_v3")


@pytest.mark.parametrize("family", GPTQ_FAMILIES)
def test_quant_gptq_runs_on_a_subset(tmp_path: Path, family: str) -> None:
    metrics = _quant_job(
        tmp_path,
        family,
        "quant=w4a16",
        "quant.weights=gptq",
        "quant.gptq.calib_windows=2",
        "method=none",
        "experiment.diag_windows=1",
    )
    assert math.isfinite(metrics["ppl"]) and metrics["quant.label"] == "W4A16-GPTQ"
    assert metrics["quant.n_routed_experts"] == _expected_experts(family)
    assert metrics["quant.gptq.damp_raised"] == [] and isinstance(metrics["quant.gptq.rtn_fallback"], list)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_neox"])
def test_kv_quant_runs_where_keys_and_values_have_no_projection_of_their_own(
    tmp_path: Path, family: str
) -> None:
    """Latent attention and interleaved q/k/v: the keys and values are quantized where the attention
    function receives them, so these families need no projection of their own."""
    metrics = _quant_job(tmp_path, family, "quant=w8a8", "quant.kv_bits=8", "experiment.diag_windows=1")
    assert math.isfinite(metrics["ppl"]) and metrics["quant.label"] == "W8A8KV8"
