"""GPTQ weights (`quant.weights=gptq`): the algorithm's properties, the layer-by-layer pipeline, how it
composes with the methods, what it restores and what the quant experiment records.

llm-compressor's GPTQ cannot be installed next to the project's transformers, so the comparison with it
is a one-off script (scripts/gptq_reference.py: identical weights on tiny-llama); these tests check the
properties that pin the algorithm down instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from outlier_study.adapters.experts import find_moe
from outlier_study.adapters.linears import weight_out_in
from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.interventions.edits import reversible
from outlier_study.interventions.treatment import Inputs
from outlier_study.models.loader import LoadedModel
from outlier_study.quant import weights as weights_module
from outlier_study.quant.error import quant_error
from outlier_study.quant.fake import QuantSpec, fake_quant, qmax, quantize, snap, weight_scale
from outlier_study.quant.gptq import GPTQSettings, gptq_quantize
from outlier_study.quant.layerwise import capture_layer_calls, hessians, run_layer
from outlier_study.quant.methods import METHODS
from outlier_study.quant.targets import quant_weights
from outlier_study.quant.weights import WeightJob, quantize_weights
from tests.helpers import config_error, load_named, make_cfg, snapshot, typed_cfg


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture()
def calib() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=_gen(3))


def _objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the layer-output error GPTQ minimizes (up to the factor 2/n in H)."""
    d = (w - q).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


def _correlated(rows: int, cols: int, tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few outlier channels."""
    g = _gen(1)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    x[:, :3] *= 20
    return w, 2 * x.t() @ x / tokens


def _on_grid(q: torch.Tensor, w: torch.Tensor, bits: int, group: int | None) -> None:
    """Every weight is level · step with an integer level in ±qmax (re-snapping changes nothing)."""
    scale = weight_scale(w.float(), bits, group)
    assert torch.equal(snap(q.float(), scale, bits), q.float())
    assert (q.float() / scale).abs().max() <= qmax(bits) + 1e-4


# ----------------------------------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("group", [None, 8, 12, 64])
def test_weight_scale_and_snap_are_rtns_grid(group: int | None) -> None:
    w = torch.randn(6, 40, generator=_gen(0))
    assert torch.equal(snap(w, weight_scale(w, 4, group)), quantize(w, 4, group_size=group))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "act_order"), [(None, False), (None, True), (16, False), (12, True)])
def test_gptq_with_identity_hessian_is_rtn_bit_for_bit(
    group: int | None, act_order: bool, dtype: torch.dtype
) -> None:
    """H = I: no input is correlated with another, so no error has anywhere to go."""
    w = torch.randn(10, 48, generator=_gen(2)).to(dtype)
    settings = GPTQSettings(block_size=20, act_order=act_order)
    result = gptq_quantize(w, torch.eye(48), 4, group, settings)
    assert result.weight.dtype == dtype
    assert torch.equal(result.weight, quantize(w, 4, group_size=group))


@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, None, False), (4, None, True), (3, 16, True)])
def test_gptq_beats_rtn_on_correlated_inputs_and_stays_on_the_grid(
    bits: int, group: int | None, act_order: bool
) -> None:
    w, h = _correlated(12, 64)
    q = gptq_quantize(w, h, bits, group, GPTQSettings(block_size=16, act_order=act_order)).weight
    _on_grid(q, w, bits, group)
    assert _objective(w, q, h) < 0.9 * _objective(w, quantize(w, bits, group_size=group), h)


def test_gptq_block_size_does_not_change_the_result() -> None:
    """Lazy batches only reorder when the updates are applied."""
    w, h = _correlated(8, 50)
    one = gptq_quantize(w, h, 4, None, GPTQSettings(block_size=1)).weight
    many = gptq_quantize(w, h, 4, None, GPTQSettings(block_size=128)).weight
    odd = gptq_quantize(w, h, 4, None, GPTQSettings(block_size=7)).weight
    assert (one != many).float().mean() < 0.01 and (odd != many).float().mean() < 0.01


def test_gptq_rows_are_independent_so_stacked_linears_match_separate_ones() -> None:
    w, h = _correlated(12, 40)
    stacked = gptq_quantize(w, h, 4).weight
    separate = torch.cat([gptq_quantize(w[:5], h, 4).weight, gptq_quantize(w[5:], h, 4).weight])
    assert torch.equal(stacked, separate)


def test_gptq_dead_inputs_are_rounded_to_nearest_and_singular_hessians_get_more_damping() -> None:
    w, h = _correlated(6, 16)
    h[4, :] = h[:, 4] = 0  # input 4 was zero on every token
    result = gptq_quantize(w, h, 4)
    assert result.dead_columns == 1
    assert torch.equal(result.weight[:, 4], quantize(w, 4)[:, 4])
    singular = torch.ones(16, 16)  # rank 1: H + λ·I with a tiny λ does not factor in float64
    raised = gptq_quantize(w, singular - 1e-3 * torch.eye(16), 4, None, GPTQSettings(damp=1e-6))
    assert raised.damp > 1e-6
    _on_grid(raised.weight, w, 4, None)


# ------------------------------------------------------------------------------------ layer by layer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3", "tiny-qwen3-moe"])
def test_layers_run_one_by_one_reproduce_the_model(model_cache: Path, calib: torch.Tensor, name: str) -> None:
    """What each layer is called with (masks, position embeddings) is captured per layer, so running
    the layers on their own gives the hidden states of a whole forward."""
    lm = load_named(name, model_cache)
    blocks = list(lm.adapter.blocks(lm.model))
    seen: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            for batch in calib.split(2):
                lm.model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    calls = capture_layer_calls(lm, calib, 2)
    hidden = calls.hidden
    for layer, block in enumerate(blocks):
        hidden = [run_layer(block, h, call) for h, call in zip(hidden, calls.calls[layer], strict=True)]
    for mine, full in zip(hidden, seen, strict=True):
        torch.testing.assert_close(mine, full, rtol=0, atol=1e-6)


def _job(lm: LoadedModel, spec: QuantSpec, calib: torch.Tensor, **gptq: Any) -> Any:
    options = typed_cfg("experiment=quant", *(f"quant.gptq.{k}={v}" for k, v in gptq.items())).quant.gptq
    return WeightJob(lm, spec, options, calib, batch_size=2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-gemma3"])
def test_gptq_quantizes_exactly_what_rtn_quantizes(model_cache: Path, calib: torch.Tensor, name: str) -> None:
    """Every decoder linear (GPT-2's Conv1D, shared experts) and every routed experts parameter, nothing
    else: the router stays in full precision; the model comes back as it was."""
    lm = load_named(name, model_cache)
    before = snapshot(lm)
    spec = QuantSpec(w_bits=4, w_group_size=16, weights="gptq")
    gptq, record = quantize_weights(_job(lm, spec, calib))
    rtn, _ = quantize_weights(WeightJob(lm, QuantSpec(w_bits=4, w_group_size=16)))
    assert gptq is not None and rtn is not None and set(gptq) == set(rtn)
    targets = quant_weights(lm.adapter, lm.model)
    assert set(gptq) == {t.param for t in targets}
    assert {t.param for t in targets if t.experts is None} == {
        m.weight for _, _, m in lm.adapter.linears(lm.model)
    }
    assert sum(t.experts is not None for t in targets) == 2 * len(lm.adapter.moe)
    for block in lm.adapter.blocks(lm.model):
        moe = find_moe(block)
        if moe is not None:
            router = lm.adapter.module(block, moe.router_weight)
            assert router.weight not in gptq
    for t in targets:
        _on_grid(gptq[t.param], t.out_in().detach(), 4, 16)
    assert record["quant.gptq.rtn_fallback"] == [] and record["quant.gptq.damp_raised"] == []
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_gptq_output_error_is_below_rtns_for_every_linear(model_cache: Path, calib: torch.Tensor) -> None:
    """‖Ŵ X − W X‖ on the calibration windows, X the inputs of the unquantized model, linear by linear."""
    lm = load_named("tiny-llama", model_cache)
    spec = QuantSpec(w_bits=4, weights="gptq")
    gptq, _ = quantize_weights(_job(lm, spec, calib))
    errors = {}
    for weights in (None, gptq):
        with quant_error(lm, spec, weights) as log, torch.inference_mode():
            lm.model(input_ids=calib, use_cache=False)
        errors["rtn" if weights is None else "gptq"] = log.relative()
    for key, rtn in errors["rtn"].items():
        assert errors["gptq"][key] < rtn, key


@pytest.mark.parametrize("method", ["rotation", "smoothquant", "massive_y6"])
def test_gptq_calibrates_each_layer_on_what_the_quantized_model_feeds_it(
    model_cache: Path, calib: torch.Tensor, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hessians GPTQ uses for layer 1 are those of layer 1's inputs in the model with the method
    applied (its hooks active: the online rotation before down_proj, MA replacement) and layer 0 already
    holding its GPTQ weights."""
    lm = load_named("tiny-llama", model_cache)
    seen: dict[int, torch.Tensor] = {}
    real = weights_module.gptq_quantize

    def spy(w: torch.Tensor, h: torch.Tensor, *args: Any) -> Any:
        seen[len(seen)] = h.clone()
        return real(w, h, *args)

    monkeypatch.setattr(weights_module, "gptq_quantize", spy)
    treatment = METHODS.get(method)
    options = typed_cfg("experiment=quant", f"method={method}").method
    spec = QuantSpec(w_bits=4, weights="gptq")
    with treatment.apply(Inputs(lm, options, make_cfg().threshold, calib, 2)):
        gptq, _ = quantize_weights(_job(lm, spec, calib))
        layer0 = [m for layer, _, m in lm.adapter.linears(lm.model) if layer == 0]
        layer1 = [m for layer, _, m in lm.adapter.linears(lm.model) if layer == 1]
        groups_per_layer = len(seen) // lm.n_layers
        with reversible() as edits:
            for module in layer0:
                edits.set_data(module.weight, gptq[module.weight])
            with hessians(layer1) as log, torch.inference_mode():
                for batch in calib.split(2):
                    lm.model(input_ids=batch, use_cache=False)
        expected = [log.hessian(group[0]) for group in log.groups()]
    got = [seen[groups_per_layer + i] for i in range(groups_per_layer)]
    assert len(expected) == len(got) == 4  # q/k/v, o, gate/up, down
    for mine, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ composition, restore


def test_method_then_gptq_then_fake_quant_restores_bit_exactly(
    model_cache: Path, calib: torch.Tensor
) -> None:
    lm = load_named("tiny-llama", model_cache)
    before = snapshot(lm)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())
    options = typed_cfg("experiment=quant", "method=rotation").method
    spec = QuantSpec(w_bits=4, a_bits=8, weights="gptq")
    with pytest.raises(RuntimeError, match="boom"):
        with METHODS.get("rotation").apply(Inputs(lm, options, make_cfg().threshold)):
            gptq, _ = quantize_weights(_job(lm, spec, calib))
            with fake_quant(lm, spec, gptq):
                lin = lm.adapter.linears(lm.model)[0][2]
                assert torch.equal(weight_out_in(lin), gptq[lin.weight])
                raise RuntimeError("boom")
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())


def test_gptq_failing_midway_leaves_the_model_as_it_was(
    model_cache: Path, calib: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_named("tiny-llama", model_cache)
    before = snapshot(lm)
    calls = {"n": 0}
    real = weights_module.gptq_quantize

    def fail_late(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 5:  # after layer 0's weights are in place
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(weights_module, "gptq_quantize", fail_late)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_weights(_job(lm, QuantSpec(w_bits=4, weights="gptq"), calib))
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------- config, results


def test_quant_labels_name_the_weight_quantizer() -> None:
    assert QuantSpec(w_bits=4, weights="gptq").label == "W4A16-GPTQ"
    assert QuantSpec(w_bits=4, a_bits=8, w_group_size=128, weights="gptq").label == "W4A8g128-GPTQ"
    assert QuantSpec(weights="gptq").label == "W16A16"  # no weight is quantized
    assert QuantSpec(w_bits=4).summary()["quant.weights"] == "rtn"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("quant.weights=awq", "quant.weights"),
        ("quant.gptq.damp=0", "quant.gptq.damp"),
        ("quant.gptq.damp=2", "quant.gptq.damp"),
        ("quant.gptq.block_size=0", "quant.gptq.block_size"),
        ("quant.gptq.calib_windows=0", "quant.gptq.calib_windows"),
        ("quant.gptq.act_order=maybe", "quant.gptq.act_order"),
        ("quant.gptq.groups=8", "quant.gptq.groups"),
    ],
)
def test_bad_gptq_settings_are_one_line_errors(override: str, field: str) -> None:
    line = config_error("experiment=quant", "quant=w4a16", override)
    assert line.startswith(f"{field}: ") and "\n" not in line


def _run(tmp_path: Path, *overrides: str) -> tuple[Path, dict[str, Any]]:
    cfg = make_cfg(
        "experiment=quant",
        "model=tiny-llama",
        "dataset.seq_len=48",
        "dataset.n_windows=3",
        "progress=false",
        *overrides,
    )
    job = run(cfg, tmp_path / "_".join(o.replace("=", "-") for o in overrides))
    return job, json.loads((job / "metrics.json").read_text())


def test_quant_experiment_records_gptq(tmp_path: Path) -> None:
    job, metrics = _run(
        tmp_path,
        "quant=w4a8",
        "quant.weights=gptq",
        "quant.gptq.calib_windows=3",
        "quant.gptq.act_order=true",
        "method=smoothquant",
        "method.calib_windows=2",
    )
    assert metrics["quant.label"] == "W4A8-GPTQ" and metrics["quant.weights"] == "gptq"
    assert metrics["quant.gptq.damp"] == 0.01 and metrics["quant.gptq.act_order"] is True
    assert metrics["quant.gptq.block_size"] == 128 and metrics["quant.gptq.group_size"] is None
    assert metrics["quant.gptq.calib_windows"] == 3 and metrics["calib_windows"] == 2
    assert metrics["quant.gptq.method_windows_shared"] == 2  # contiguous: the method's 2 are GPTQ's first 2
    assert metrics["quant.gptq.calib_activations"] == "full precision"
    assert (job / "tables" / "quant.csv").read_text().splitlines()[0] == "dataset,seq_len,method,W4A8-GPTQ"
    calib = json.loads((job / "calibration.json").read_text())
    evaluation = json.loads((job / "windows.json").read_text())
    text_len = evaluation["seq_len"]
    assert calib["gptq"]["starts"][:2] == calib["starts"]
    for s in calib["gptq"]["starts"]:
        assert all(s + text_len <= e or e + text_len <= s for e in evaluation["starts"])
    ppl = json.loads((job / "perplexity.json").read_text())
    assert ppl["extra"]["gptq_calibration_starts"] == calib["gptq"]["starts"]
    [evaluation_row] = ppl["evaluations"]
    assert evaluation_row["setting"]["quant.gptq.act_order"] is True


def test_quant_experiment_too_many_gptq_windows_fails_the_job(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, "quant=w4a16", "quant.weights=gptq", "quant.gptq.calib_windows=100000", "method=none")
    assert err.value.field == "quant.gptq.calib_windows"
