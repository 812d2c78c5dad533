"""Fake quantization, SmoothQuant, Hadamard rotation and the `quant` experiment on tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from outlier_study.app import run
from outlier_study.data.windows import disjoint_starts
from outlier_study.errors import ConfigError
from outlier_study.interventions.treatment import Inputs
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.models.loader import LoadedModel, load_model
from outlier_study.quant.error import quant_error
from outlier_study.quant.fake import ActivationQuantizer, QuantSpec, fake_quant, qmax, quantize
from outlier_study.quant.methods import METHODS
from outlier_study.quant.orthogonal import randomized_rotation
from outlier_study.quant.rotation import rotate
from outlier_study.quant.smoothquant import calibrate, smooth
from tests.helpers import config_error, load_named, make_cfg, typed_cfg

TOL = 1e-4  # max |Δlogits| / max |logits| for the exact (pre-quantization) equivalences, float32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 40), generator=_gen(0))


def perturbed(name: str, cache: Path, *overrides: str) -> LoadedModel:
    """A fresh tiny model whose norms have non-trivial γ (and β): random init leaves them at 1 (0), which
    would make folding them a no-op that no test could catch."""
    cfg = make_cfg(f"model={name}", *overrides)
    lm = load_model(cfg.model, "float32", "cpu", cache)
    g = _gen(1)
    with torch.no_grad():
        for pname, p in lm.model.named_parameters():
            if p.dim() == 1 and ("norm" in pname or ".ln_" in pname or "ln_f" in pname):
                if pname.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return lm


def logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=ids, use_cache=False).logits


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict(keep_vars=True).items()}


def assert_bit_exact(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key].detach(), value), key


def hook_count(lm: LoadedModel) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())


# ---------------------------------------------------------------------------------------------- quantizer


def _reference_scale(x: torch.Tensor, bits: int, granularity: str, group: int) -> torch.Tensor:
    """max|x| / qmax of each element's group, broadcast to x's shape (computed apart from quantize)."""
    q = qmax(bits)
    if granularity == "tensor":
        return (x.abs().amax(dim=(1, 2), keepdim=True) / q).expand_as(x)
    if granularity == "group":
        width = x.shape[-1]
        out = torch.empty_like(x)
        for s in range(0, width, group):
            out[..., s : s + group] = x[..., s : s + group].abs().amax(dim=-1, keepdim=True) / q
        return out
    return (x.abs().amax(dim=-1, keepdim=True) / q).expand_as(x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("granularity", ["channel", "group", "token", "tensor"])
def test_quantize_error_within_half_a_step(bits: int, granularity: str) -> None:
    g = _gen(bits)
    if granularity in ("channel", "group"):  # an (out, in) weight; 50 columns: the last group of 16 is short
        x = torch.randn(24, 50, generator=g) * torch.logspace(-2, 1, 24)[:, None]
    else:  # (batch, tokens, channels) activations with an outlier channel
        x = torch.randn(3, 17, 40, generator=g)
        x[..., 5] *= 60.0
    group = 16
    q = quantize(
        x,
        bits,
        group_size=group if granularity == "group" else None,
        per_sample=granularity == "tensor",
    )
    scale = _reference_scale(x, bits, granularity, group)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert torch.all((q - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-12)
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # on the grid
    assert levels.abs().max() <= qmax(bits) + 1e-3
    assert (q - x).abs().max() > 0  # it did quantize


def test_quantize_granularities_are_independent_per_token_and_per_sample() -> None:
    x = torch.randn(2, 9, 32, generator=_gen(3))
    x[1] *= 100.0  # a loud second sequence must not change the first one's scales
    assert torch.equal(quantize(x, 4)[0], quantize(x[:1], 4)[0])
    assert torch.equal(quantize(x, 4, per_sample=True)[0], quantize(x[:1], 4, per_sample=True)[0])
    per_token, per_tensor = quantize(x, 4), quantize(x, 4, per_sample=True)
    assert not torch.equal(per_token, per_tensor)


def test_quantize_never_modifies_its_input_and_16_bits_is_off() -> None:
    x = torch.randn(4, 33, generator=_gen(4))
    x[0] = 0.0  # an all-zero row quantizes to zeros, not nan
    original = x.clone()
    for kwargs in ({}, {"group_size": 8}, {"per_sample": True}):
        out = quantize(x, 4, **kwargs)
        assert torch.equal(x, original)
        assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(33))
    assert quantize(x, 16) is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_half_precision_keeps_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(5, 64, generator=_gen(5)).to(dtype)
    q = quantize(x, 8)
    assert q.dtype == dtype and torch.isfinite(q).all()
    assert (q.float() - x.float()).abs().max() <= x.float().abs().max() / qmax(8)


# ----------------------------------------------------------------------------------------- fake quant


def test_fake_quant_hooks_leave_every_linear_input_unchanged(model_cache: Path, ids: torch.Tensor) -> None:
    """An observer that runs before the quantizer keeps each input and a copy; after the forward pass the
    input tensors the model handed to its linears still hold their original values."""
    for name in ("tiny-llama", "tiny-gpt2"):
        lm = load_named(name, model_cache)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def observe(module: torch.nn.Module, args: tuple[Any, ...], seen: list = seen) -> None:
            seen.append((args[0], args[0].clone()))

        handles = [
            m.register_forward_pre_hook(observe, prepend=True) for _, _, m in lm.adapter.linears(lm.model)
        ]
        try:
            with fake_quant(lm, QuantSpec(w_bits=4, a_bits=4, kv_bits=4)):
                logits(lm, ids)
        finally:
            for h in handles:
                h.remove()
        assert len(seen) == len(lm.adapter.linears(lm.model))
        for tensor, copy in seen:
            assert torch.equal(tensor, copy)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3"])
def test_fake_quant_restores_bit_exactly_also_after_an_error(
    model_cache: Path, ids: torch.Tensor, name: str
) -> None:
    lm = load_named(name, model_cache)
    before, hooks, ref = snapshot(lm), hook_count(lm), logits(lm, ids)
    spec = QuantSpec(w_bits=4, a_bits=8, kv_bits=4, w_group_size=16)
    with fake_quant(lm, spec) as record:
        quantized = logits(lm, ids)
        assert record["quant.n_linears"] == len(lm.adapter.linears(lm.model))
        lin = lm.adapter.linears(lm.model)[0][2]
        assert not torch.equal(lin.weight, before[_param_key(lm, lin)])  # the weights really are quantized
    assert not torch.equal(quantized, ref)
    assert_bit_exact(lm, before)
    assert hook_count(lm) == hooks
    with pytest.raises(RuntimeError, match="boom"), fake_quant(lm, spec):
        raise RuntimeError("boom")
    assert_bit_exact(lm, before)
    assert hook_count(lm) == hooks
    assert torch.equal(logits(lm, ids), ref)


def _param_key(lm: LoadedModel, module: torch.nn.Module) -> str:
    return next(n for n, m in lm.model.named_modules() if m is module) + ".weight"


def test_fake_quant_of_conv1d_weights_is_per_output_channel(model_cache: Path) -> None:
    """GPT-2's Conv1D stores (in, out): each output column must get its own scale, not each input row."""
    lm = load_named("tiny-gpt2", model_cache)
    conv = lm.model.transformer.h[0].mlp.c_fc
    original = conv.weight.detach().clone()
    with fake_quant(lm, QuantSpec(w_bits=4)):
        q = conv.weight.detach().clone()
    expected = quantize(original.t(), 4).t()  # rows of the (out, in) view
    assert torch.equal(q, expected)


def test_shared_input_cache_matches_one_quantizer_per_linear(model_cache: Path, ids: torch.Tensor) -> None:
    """q/k/v and gate/up reuse one quantization of their shared input; it must equal quantizing each."""
    lm = load_named("tiny-llama", model_cache)
    with fake_quant(lm, QuantSpec(a_bits=4)):
        cached = logits(lm, ids)
    handles = [
        m.register_forward_pre_hook(ActivationQuantizer(4, "token"))
        for _, _, m in lm.adapter.linears(lm.model)
    ]
    try:
        separate = logits(lm, ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cached, separate)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"w_bits": 1}, "quant.w_bits"),
        ({"a_bits": 17}, "quant.a_bits"),
        ({"kv_bits": 0}, "quant.kv_bits"),
        ({"w_bits": 8.5}, "quant.w_bits"),
        ({"w_group_size": 0}, "quant.w_group_size"),
        ({"a_granularity": "channel"}, "quant.a_granularity"),
    ],
)
def test_bad_quant_settings_are_one_line_errors(kwargs: dict[str, Any], field: str) -> None:
    line = config_error("experiment=quant", *(f"quant.{k}={v}" for k, v in kwargs.items()))
    assert line.startswith(f"{field}: ") and "\n" not in line


def test_quant_labels() -> None:
    assert QuantSpec().label == "W16A16" and not QuantSpec().active
    assert QuantSpec(w_bits=4, a_bits=8).label == "W4A8"
    assert QuantSpec(w_bits=4, a_bits=4, kv_bits=4).label == "W4A4KV4"
    assert QuantSpec(w_bits=4, w_group_size=128).label == "W4A16g128"
    assert QuantSpec(w_group_size=128).label == "W16A16"  # nothing is quantized, so no group either


# ------------------------------------------------------------------------------------------ orthogonal


@pytest.mark.parametrize("n", [1, 7, 64, 96, 160, 576])
def test_randomized_rotation_is_orthogonal_and_fast_path_matches(n: int) -> None:
    rot = randomized_rotation(n, seed=3)
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(2, 5, n, generator=_gen(n), dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ q, atol=1e-10)
    assert torch.equal(randomized_rotation(n, seed=3).matrix(), q)  # seeded


# ------------------------------------------------------------------------------ equivalence and restore


MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


@pytest.mark.parametrize("name", [*MODELS, "tiny-gpt2", "tiny-gemma3"])
def test_smoothquant_is_an_equivalence_and_restores_bit_exactly(
    model_cache: Path, ids: torch.Tensor, name: str
) -> None:
    lm = perturbed(name, model_cache)
    ref, before, hooks = logits(lm, ids), snapshot(lm), hook_count(lm)
    act_max = calibrate(lm, torch.randint(0, 256, (3, 32), generator=_gen(9)))
    assert_bit_exact(lm, before)  # calibration only observes
    assert hook_count(lm) == hooks
    with smooth(lm, act_max, 0.5) as record:
        smoothed = logits(lm, ids)
        norm = lm.adapter.blocks(lm.model)[0].get_submodule(lm.adapter.norms["attn"].module)
        assert not torch.equal(norm.weight, before[_param_key(lm, norm)])  # scales really were folded
        assert record["smoothquant.max_scale_spread"] > 1.0
    assert rel_diff(smoothed, ref) <= TOL
    assert_bit_exact(lm, before)
    with pytest.raises(RuntimeError, match="boom"), smooth(lm, act_max, 0.8):
        raise RuntimeError("boom")
    assert_bit_exact(lm, before)
    assert torch.equal(logits(lm, ids), ref)


ROTATION_CASES = [
    ("tiny-llama",),
    ("tiny-qwen2",),
    ("tiny-mistral",),
    # tied embeddings, hidden 96 = 32·3 and intermediate 160 = 32·5: the Kronecker path on both sides
    ("tiny-llama", "+model.arch.tie_word_embeddings=true", "+model.arch.hidden_size=96"),
]


@pytest.mark.parametrize("case", ROTATION_CASES, ids=["llama", "qwen2", "mistral", "llama-tied-96"])
def test_rotation_is_an_equivalence_and_restores_bit_exactly(
    model_cache: Path, ids: torch.Tensor, case: tuple[str, ...]
) -> None:
    lm = perturbed(*case[:1], model_cache, *case[1:])
    model = lm.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    assert tied == (len(case) > 1)
    ref, before, hooks = logits(lm, ids), snapshot(lm), hook_count(lm)
    with rotate(lm, seed=1) as record:
        rotated = logits(lm, ids)
        assert not torch.equal(emb.weight, before[_param_key(lm, emb)])
        q_proj = lm.adapter.blocks(model)[0].self_attn.q_proj
        assert not torch.equal(q_proj.weight, before[_param_key(lm, q_proj)])
        assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
        assert record["rotation.untied_lm_head"] == tied
        assert hook_count(lm) == hooks + lm.n_layers  # the online rotation before every down_proj
    assert rel_diff(rotated, ref) <= TOL
    assert_bit_exact(lm, before)
    assert hook_count(lm) == hooks
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with pytest.raises(RuntimeError, match="boom"), rotate(lm, seed=2):
        raise RuntimeError("boom")
    assert_bit_exact(lm, before)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert torch.equal(logits(lm, ids), ref)


@pytest.mark.parametrize("name", ["tiny-gpt-neox", "tiny-qwen3-moe"])
def test_rotation_refuses_other_architectures(model_cache: Path, name: str) -> None:
    """Parallel blocks and fused experts are not rotated yet (GPT-2 and Gemma3: tests/test_rotation.py)."""
    lm = load_named(name, model_cache)
    cfg = typed_cfg("experiment=quant", "method=rotation", f"model={name}")
    rotation = METHODS.get("rotation")
    assert rotation.check is not None
    with pytest.raises(ConfigError) as err:
        rotation.check(cfg.method, cfg, lm.arch)
    assert err.value.field == "method.name"
    assert "(allowed: none, massive_y6" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("alpha", ["-0.1", "1.5", "nan"])
def test_smoothquant_alpha_outside_unit_interval_is_refused(alpha: str) -> None:
    with pytest.raises(ConfigError) as err:
        typed_cfg("experiment=quant", "method=smoothquant", f"method.alpha={alpha}")
    assert err.value.field == "method.alpha" and "\n" not in str(err.value)


def test_rotation_spreads_a_planted_outlier_channel(model_cache: Path, ids: torch.Tensor) -> None:
    """The point of rotating: with one loud residual channel, per-token 4-bit activations lose the quiet
    ones; the rotated model's q/k/v input (the loud channel spread over all) quantizes with less error."""
    lm = perturbed("tiny-llama", model_cache)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[:, 7] *= 20.0
    spec = QuantSpec(a_bits=4)
    with quant_error(lm, spec) as plain:
        logits(lm, ids)
    with rotate(lm), quant_error(lm, spec) as rotated:
        logits(lm, ids)
    key = (0, "self_attn.q_proj")
    assert rotated.relative()[key] < plain.relative()[key]


# ---------------------------------------------------------------------------------- quantization error


def test_quant_error_is_zero_at_16_bits_and_grows_with_fewer_bits(
    model_cache: Path, ids: torch.Tensor
) -> None:
    lm = load_named("tiny-qwen2", model_cache)
    errors = {}
    for bits in (16, 8, 4):
        with quant_error(lm, QuantSpec(w_bits=bits, a_bits=bits)) as log:
            logits(lm, ids)
        errors[bits] = log.relative()
    n = len(lm.adapter.linears(lm.model))
    assert all(len(e) == n for e in errors.values())
    assert all(v == 0 for v in errors[16].values())
    assert all(0 < errors[8][k] < errors[4][k] < 1 for k in errors[8])


def test_quant_error_matches_a_direct_computation(model_cache: Path, ids: torch.Tensor) -> None:
    lm = load_named("tiny-llama", model_cache)
    down = lm.model.model.layers[1].mlp.down_proj
    captured: list[torch.Tensor] = []
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    try:
        with quant_error(lm, QuantSpec(w_bits=4, a_bits=6)) as log:
            logits(lm, ids)
    finally:
        handle.remove()
    x, w = captured[0], down.weight.detach()
    ref = F.linear(x, w)
    q = F.linear(quantize(x, 6), quantize(w, 4))
    expected = float((q - ref).norm() / ref.norm())
    assert log.relative()[(1, "mlp.down_proj")] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------- method registry


def test_every_method_restores_the_model(model_cache: Path, ids: torch.Tensor) -> None:
    lm = perturbed("tiny-llama", model_cache)
    cfg = make_cfg("model=tiny-llama")
    before, hooks, ref = snapshot(lm), hook_count(lm), logits(lm, ids)
    for name, method in METHODS.items():
        typed = typed_cfg("experiment=quant", f"method={name}")
        inputs = Inputs(lm, typed.method, cfg.threshold, ids if method.calibrated else None)
        if method.check is not None:
            method.check(typed.method, typed, lm.arch)
        with method.apply(inputs) as record:
            logits(lm, ids)
            assert isinstance(record.summary("method", detail=False), dict)
        assert_bit_exact(lm, before)
        assert hook_count(lm) == hooks
    assert torch.equal(logits(lm, ids), ref)
    with pytest.raises(ConfigError) as err:
        METHODS.get("nope")
    assert err.value.field == "method.name"


# ----------------------------------------------------------------------------------- calibration data


def test_disjoint_starts_never_overlap_the_taken_windows() -> None:
    taken = [0, 64, 128]
    contiguous = disjoint_starts(1000, taken, 64, 5, "contiguous", 0, "method.calib_windows")
    assert contiguous == [192, 256, 320, 384, 448]
    taken = [10, 300, 310, 700]
    for sampling in ("contiguous", "random"):
        starts = disjoint_starts(1000, taken, 50, 8, sampling, 1, "method.calib_windows")
        assert len(starts) == len(set(starts)) == 8
        for s in starts:
            assert s + 50 <= 1000
            assert all(s + 50 <= t or t + 50 <= s for t in taken)
            assert all(s + 50 <= o or o + 50 <= s for o in starts if o != s)
    with pytest.raises(ConfigError) as err:
        disjoint_starts(300, [0], 64, 5, "contiguous", 0, "method.calib_windows")
    assert err.value.field == "method.calib_windows"


# ------------------------------------------------------------------------------------------ experiment


CALIBRATED = {"method=smoothquant", "method=gamma_smooth"}


def _job(tmp_path: Path, *overrides: str) -> tuple[Path, dict[str, Any]]:
    """A tiny quant job; calibrated methods get 4 calibration windows (a key the others do not have)."""
    calib = ("method.calib_windows=4",) if CALIBRATED & set(overrides) else ()
    cfg = make_cfg(
        "experiment=quant",
        "model=tiny-llama",
        "dataset.seq_len=48",
        "dataset.n_windows=3",
        "progress=false",
        *calib,
        *overrides,
    )
    job = run(cfg, tmp_path / "_".join(o.replace("=", "-") for o in overrides))
    return job, json.loads((job / "metrics.json").read_text())


def test_quant_experiment_writes_its_results(tmp_path: Path) -> None:
    job, metrics = _job(tmp_path, "quant=w4a8", "method=smoothquant")
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    for name in ("quant", "quant_error", "kurtosis"):
        assert (job / "tables" / f"{name}.md").is_file() and (job / "tables" / f"{name}.csv").is_file()
    assert (job / "figures" / "quant_error.png").stat().st_size > 0
    assert (
        metrics["quant"] == "w4a8" and metrics["quant.label"] == "W4A8" and metrics["method"] == "smoothquant"
    )
    assert metrics["ppl"] > 1 and metrics["calib_windows"] == 4 and metrics["method.alpha"] == 0.5
    assert 0 < metrics["quant_error.mean"] < 1
    calib = json.loads((job / "calibration.json").read_text())
    evaluation = json.loads((job / "windows.json").read_text())
    text_len = evaluation["seq_len"]
    for s in calib["starts"]:
        assert all(s + text_len <= e or e + text_len <= s for e in evaluation["starts"])
    header = (job / "tables" / "quant.csv").read_text().splitlines()[0]
    assert header == "dataset,seq_len,method,W4A8"
    co_layers = json.loads((job / "perplexity.json").read_text())["extra"]["co_layers"]
    assert isinstance(co_layers, list) and set(co_layers) <= {0, 1, 2}  # tiny-llama has 3 layers


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "model=tiny-gpt2",
            "quant=w4a4",
            "quant.kv_bits=4",
            "quant.a_granularity=tensor",
            "method=smoothquant",
        ),
        ("model=tiny-gemma3", "quant=w8a8", "quant.w_group_size=16", "method=massive_y6"),
        ("model=tiny-gemma3", "quant=w4a4", "quant.kv_bits=4", "method=rotation"),
    ],
    ids=["gpt2-smoothquant-kv4", "gemma3-massive-grouped", "gemma3-rotation-kv4"],
)
def test_quant_experiment_runs_on_other_architectures(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    job, metrics = _job(tmp_path, *overrides)
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    assert metrics["ppl"] > 1 and 0 < metrics["quant_error.mean"] < 1
    n_linears = len((job / "tables" / "quant_error.csv").read_text().splitlines()) - 1
    assert n_linears == 3 * (4 if "model=tiny-gpt2" in overrides else 7)


def test_quant_experiment_equivalent_methods_keep_full_precision_perplexity(tmp_path: Path) -> None:
    """W16A16: none is the plain model's perplexity; smoothquant and rotation change it only by rounding."""
    _, plain = _job(tmp_path, "quant=none", "method=none")
    cfg = make_cfg("model=tiny-llama", "dataset.seq_len=48", "dataset.n_windows=3")
    lm = load_model(cfg.model, "float32", "cpu", cfg.paths.model_cache)
    from outlier_study.data import build_windows, load_corpus

    windows = build_windows(cfg.dataset, lm.tokenizer, load_corpus(cfg.dataset))
    direct = evaluate_perplexity(lm, windows.input_ids, progress=False)
    assert plain["ppl"] == direct.ppl
    _, rotated = _job(tmp_path, "quant=none", "method=rotation")  # smoothquant: the test above and logits
    assert rotated["ppl"] == pytest.approx(plain["ppl"], rel=1e-4)
    assert plain["quant_error.mean"] == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("method=smoothquant", "method.alpha=1.5"), "method.alpha"),
        (("method=smoothquant", "method.calib_windows=100000"), "method.calib_windows"),
        (("method=massive_y6", "method.value=median"), "method.value"),
        (("method.name=nope",), "method.name"),
        (("quant=w4a4", "quant.a_bits=1"), "quant.a_bits"),
        (("experiment.diag_windows=0",), "experiment.diag_windows"),
    ],
)
def test_quant_experiment_bad_input_fails_the_job(
    tmp_path: Path, overrides: tuple[str, ...], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _job(tmp_path, *overrides)
    assert err.value.field == field and "\n" not in str(err.value)
    [status] = tmp_path.glob("*/status.json")
    assert json.loads(status.read_text())["status"] == "failed"


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "outlier_study.cli", *args, f"paths.output_root={tmp_path}", "progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_bad_quant_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """As a user sees it (the other bad inputs are checked in-process above, the CLI path is shared)."""
    out = cli(tmp_path, "experiment=quant", "model=tiny-gpt-neox", "method=rotation", "dataset.seq_len=32")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    expected = "error: method.name: rotation does not apply to gpt_neox models: its attention and MLP run in"
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    allowed = lines[0].rsplit("(allowed: ", 1)[1]
    assert "smoothquant" in allowed and "rotation" not in allowed


def test_gamma_smooth_edits_the_norm_output_cos_of_smollm2(smollm2, ids: torch.Tensor) -> None:
    """SmolLM2 has COs after its norms (paper Fig. 7): γ smoothing must edit some γ entries, and only while
    its block runs; an unknown norm is a one-line error naming method.norm."""
    cfg = typed_cfg("experiment=quant", "method=gamma_smooth")
    text_ids = smollm2.tokenizer(
        "Outliers live in a few channels of a norm's output. " * 8, return_tensors="pt"
    )
    calib = text_ids.input_ids[:, :64]
    before = snapshot(smollm2)
    gamma_smooth = METHODS.get("gamma_smooth")
    with gamma_smooth.apply(Inputs(smollm2, cfg.method, cfg.threshold, calib)) as record:
        assert record.summary("method", detail=False)["method.changed_total"] > 0
    assert_bit_exact(smollm2, before)
    bad = typed_cfg("experiment=quant", "method=gamma_smooth", "method.norm=ffn")
    with pytest.raises(ConfigError) as err:
        gamma_smooth.check(bad.method, bad, smollm2.arch)
    assert err.value.field == "method.norm"
