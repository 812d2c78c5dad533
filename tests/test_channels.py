"""Channel-wise outliers: streamed CO rule, OTC rows, k-SD channels, γ / weight-channel edits, controls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from outlier_study.app import run
from outlier_study.detect.rules import (
    channel_outliers,
    channel_statistic,
    cos_by_key,
    otc_rows,
    random_like,
    sd_channels,
)
from outlier_study.detect.select import detect_cos, detect_otc
from outlier_study.errors import ConfigError
from outlier_study.interventions import Inputs, intervene
from outlier_study.interventions.parameters import edit_gamma, edit_weight_channels
from outlier_study.measure.profiler import NO_MA, profile_channels, profile_windows
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.channels import ChannelReducer
from tests.helpers import config_error, load_named, make_cfg, typed_cfg
from tests.test_cli import cli


def _summary(x: torch.Tensor, absolute: bool = False, windows: int = 1):
    reducer = ChannelReducer(absolute)
    for part in x.chunk(windows, dim=0):
        reducer.update(part)
    return reducer.result()


def test_planted_outlier_channel_is_found_and_noisy_one_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 64, generator=g)
    x[..., 7] = 8.0 + 0.05 * torch.randn(4, 256, generator=g)  # high mean, low std: a CO
    x[..., 9] = 8.0 + 3.0 * torch.randn(4, 256, generator=g)  # high mean, high std: not one
    assert channel_outliers(_summary(x), m=4.0, beta=1 / 3).tolist() == [7]


def test_gaussian_data_has_no_channel_outliers() -> None:
    x = torch.randn(8, 128, 96, generator=torch.Generator().manual_seed(1))
    for m in (2.0, 4.0, 6.0):
        assert channel_outliers(_summary(x), m=m, beta=1 / 3).size == 0
        assert channel_outliers(_summary(x, absolute=True), m=m, beta=1 / 3).size == 0


def test_signed_rule_is_one_sided_and_absolute_catches_a_negative_shift() -> None:
    x = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(2))
    x[..., 3] = -9.0
    assert channel_outliers(_summary(x), 4.0, 1 / 3).size == 0
    assert channel_outliers(_summary(x, absolute=True), 4.0, 1 / 3).tolist() == [3]


@pytest.mark.parametrize("absolute", [False, True])
def test_streaming_equals_full_tensor_over_windows(absolute: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, 40, generator=g) * torch.linspace(0.1, 3, 40) + torch.linspace(-5, 5, 40)
    x[..., 11] = 20.0 + 0.01 * torch.randn(6, 64, generator=g)
    s = _summary(x, absolute, windows=6)
    full = (x.abs() if absolute else x).double().reshape(-1, 40)
    np.testing.assert_allclose(s.mean, full.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.std, full.std(0, correction=0).numpy(), rtol=1e-5, atol=1e-9)
    assert s.tensor_mean == pytest.approx(float(full.mean()), rel=1e-6)
    assert s.tensor_std == pytest.approx(float(full.std(correction=0)), rel=1e-6)
    expected = np.flatnonzero(
        ((full.mean(0) - full.mean()) > 4 * full.std(correction=0)).numpy()
        & (full.std(0, correction=0) < 1 / 3).numpy()
    )
    assert channel_outliers(s, 4.0, 1 / 3).tolist() == expected.tolist() == [11]


def test_masked_update_leaves_out_exactly_the_masked_entries() -> None:
    x = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(4))
    keep = torch.rand(3, 50, 8, generator=torch.Generator().manual_seed(5)) > 0.3
    reducer = ChannelReducer()
    reducer.update(x, valid=keep)
    s = reducer.result()
    for c in range(8):
        vals = x[..., c][keep[..., c]].double()
        assert s.count[c] == vals.numel()
        assert s.mean[c] == pytest.approx(float(vals.mean()), rel=1e-6)
        assert s.std[c] == pytest.approx(float(vals.std(correction=0)), rel=1e-5)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("threshold.m=0", "threshold.m"),
        ("threshold.beta=-1", "threshold.beta"),
        ("threshold.sd=[]", "threshold.sd"),
    ],
)
def test_bad_thresholds_are_refused_by_the_schema(override: str, field: str) -> None:
    assert config_error(override).startswith(f"{field}: ")


@pytest.fixture(scope="module")
def qwen(model_cache: Path) -> LoadedModel:
    return load_named("tiny-qwen2", model_cache)


@contextmanager
def constant_output_row(linear: torch.nn.Linear, row: int, value: float = 6.0) -> Iterator[None]:
    """Row `row` of the weight zeroed and its bias set to `value`: that output channel is a constant."""
    saved = (linear.weight.detach().clone(), linear.bias.detach().clone())
    try:
        with torch.no_grad():
            linear.weight[row] = 0.0
            linear.bias[row] = value
        yield
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved[0])
            linear.bias.copy_(saved[1])


def test_planted_otc_row_is_found(qwen: LoadedModel, token_ids: torch.Tensor) -> None:
    """Row 5 of layer 1's W_q set to zero with a large bias: channel 5 of x3 is a constant, hence a CO,
    while channel 5 of x2 is an ordinary channel. Exactly that row must come out as an OTC."""
    th = make_cfg("model=tiny-qwen2").threshold
    with constant_output_row(qwen.adapter.blocks(qwen.model)[1].self_attn.q_proj, 5):
        otc = detect_otc(qwen, token_ids, ["q", "k", "v"], [0, 1], th, progress=False, field_name="taps")
    assert otc[(1, "q")].tolist() == [5]
    assert all(otc[key].size == 0 for key in otc if key != (1, "q"))


def test_planted_constant_value_channel_is_a_co_of_the_attention_context(
    qwen: LoadedModel, token_ids: torch.Tensor
) -> None:
    """Attention weights sum to one, so a constant channel of V (row 3 of layer 1's W_v zeroed, bias 6)
    stays constant in the context x7 of every head that reads it: that channel is the only CO there."""
    v = qwen.adapter.blocks(qwen.model)[1].self_attn.v_proj
    th = make_cfg("model=tiny-qwen2").threshold
    with constant_output_row(v, 3):
        cos = detect_cos(qwen, token_ids, ["attn.ctx"], [0, 1, 2], th, progress=False)
    readers = qwen.model.config.num_attention_heads // qwen.model.config.num_key_value_heads  # of KV head 0
    head_dim = v.out_features // qwen.model.config.num_key_value_heads
    assert cos[(1, "attn.ctx")].tolist() == [h * head_dim + 3 for h in range(readers)]
    assert cos[(0, "attn.ctx")].size == 0 and cos[(2, "attn.ctx")].size == 0


def test_otc_excludes_channels_that_are_already_outliers_in_x2() -> None:
    cos = {
        (0, "attn.norm"): np.array([2]),
        (0, "attn.q"): np.array([2, 4, 900]),
        (0, "attn.k"): np.array([], dtype=np.int64),
        (0, "attn.v"): np.array([4]),
    }
    out = otc_rows(cos, [0], ["q", "k", "v"], "experiment.matrices")
    assert out[(0, "q")].tolist() == [4, 900]  # 900 has no input channel: counts as "not a CO in x2"
    assert out[(0, "k")].size == 0 and out[(0, "v")].tolist() == [4]
    with pytest.raises(ConfigError, match="experiment.matrices"):
        otc_rows(cos, [0], ["down"], "experiment.matrices")


def _params(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_same(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _changed(lm: LoadedModel, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: (v != before[k]).nonzero()
        for k, v in lm.model.state_dict().items()
        if not torch.equal(v, before[k])
    }


@pytest.mark.parametrize("value", ["mean", "zero"])
def test_gamma_edit_touches_exactly_the_selected_entries(tiny: LoadedModel, value: str) -> None:
    before = _params(tiny)
    block = tiny.adapter.blocks(tiny.model)[1]
    w = tiny.adapter.gamma(block, "mlp")
    gamma = w.detach().float() + tiny.adapter.gamma_offset
    with edit_gamma(tiny, {(1, "mlp"): [3, 0, 3]}, value) as log:
        changed = _changed(tiny, before)
        effective = w.detach().float() + tiny.adapter.gamma_offset
        target = float(gamma.mean()) if value == "mean" else 0.0
        assert effective[[0, 3]].tolist() == pytest.approx([target, target], abs=1e-6)
        assert len(changed) <= 1  # γ = 1 everywhere in a fresh tiny model: "mean" may change nothing
        assert all(set(idx.flatten().tolist()) <= {0, 3} for idx in changed.values())
        assert log.edited == {(1, "mlp"): [0, 3]}
    _assert_same(tiny, before)


def test_weight_channels_edit_touches_exactly_the_selected_rows_and_columns(tiny: LoadedModel) -> None:
    before = _params(tiny)
    blocks = tiny.adapter.blocks(tiny.model)
    name = "k"  # GPT-2: the middle third of the fused c_attn
    view = tiny.adapter.weight_view(blocks[0], name)
    rows = view.detach().clone()
    with edit_weight_channels(tiny, {(0, name): [1, 4]}, "out", "channel_mean"):
        after = tiny.adapter.weight_view(blocks[0], name)
        diff = (after != rows).any(dim=1).nonzero().flatten().tolist()
        assert set(diff) <= {1, 4}
        for r in (1, 4):
            assert torch.allclose(after[r], rows[r].float().mean().expand_as(after[r]).to(after.dtype))
        assert len(_changed(tiny, before)) == 1  # one parameter (c_attn for GPT-2), nothing else
    _assert_same(tiny, before)
    cols = tiny.adapter.weight_view(blocks[0], "o").detach().clone()
    with edit_weight_channels(tiny, {(0, "o"): [2]}, "in", "zero"):
        after = tiny.adapter.weight_view(blocks[0], "o")
        assert torch.count_nonzero(after[:, 2]) == 0
        assert (after != cols).any(dim=0).nonzero().flatten().tolist() == [2]  # only column 2 changed
    _assert_same(tiny, before)


def test_edits_restore_bit_exactly_on_exceptions(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    before = _params(tiny)
    logits = tiny.model(input_ids=token_ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with edit_gamma(tiny, {(0, "attn"): [1, 2], (1, "mlp"): [0]}, "zero"):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with edit_weight_channels(tiny, {(0, "q"): [0], (1, "down"): [3]}, "out", "channel_mean"):
            raise RuntimeError("boom")
    _assert_same(tiny, before)
    assert torch.equal(tiny.model(input_ids=token_ids).logits, logits)


def test_bad_edit_input_changes_nothing(tiny: LoadedModel) -> None:
    before = _params(tiny)
    with pytest.raises(ConfigError, match="intervention.matrices"):
        with edit_weight_channels(tiny, {(0, "q"): [0], (0, "nope"): [1]}, "out", "zero"):
            pass
    with pytest.raises(ConfigError, match="intervention.norm"):
        with edit_gamma(tiny, {(0, "attn"): [0], (0, "attn_post_nope"): [1]}, "zero"):
            pass
    with pytest.raises(ConfigError, match="intervention.channels"):
        with edit_gamma(tiny, {(0, "attn"): [10**6]}, "zero"):
            pass
    _assert_same(tiny, before)


def test_random_controls_match_counts_are_disjoint_and_reproducible() -> None:
    selection = {
        (0, "q"): np.array([1, 5, 7]),
        (1, "q"): np.array([], dtype=np.int64),
        (1, "k"): np.array([2]),
    }
    sizes = {(0, "q"): 32, (1, "q"): 32, (1, "k"): 16}
    a, b, c = (
        random_like(selection, sizes, 7),
        random_like(selection, sizes, 7),
        random_like(selection, sizes, 8),
    )
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    assert any(a[k].tolist() != c[k].tolist() for k in a)
    for key, chosen in selection.items():
        assert len(a[key]) == len(chosen)
        assert not set(a[key].tolist()) & set(chosen.tolist())


def test_sd_channels_and_statistics() -> None:
    w = torch.randn(200, 30, generator=torch.Generator().manual_seed(6))
    w[17] *= 20.0
    for stat in ("absmean", "absmax", "l2"):
        assert sd_channels(channel_statistic(w, stat, "out"), 6.0).tolist() == [17]
    w2 = torch.randn(30, 200, generator=torch.Generator().manual_seed(7))
    w2[:, 40] += 5.0
    assert sd_channels(channel_statistic(w2, "mean", "in"), 6.0).tolist() == [40]
    gamma = torch.ones(64)
    gamma[9] = 30.0
    assert sd_channels(channel_statistic(gamma, "absmean", "out"), 4.0).tolist() == [9]
    assert sd_channels(channel_statistic(torch.randn(500, 8), "absmean", "out"), 6.0).size == 0


def _text_ids(lm: LoadedModel, n: int) -> torch.Tensor:
    text = "The study of outliers in language models is the study of a few channels. " * 12
    return lm.tokenizer(text, return_tensors="pt").input_ids[:, :n]


def test_profile_without_mas_leaves_the_massive_elements_out(smollm2: LoadedModel) -> None:
    ids = _text_ids(smollm2, 32)
    # SmolLM2's MA: resid.pre of layer 12 carries the layer-11 MA at channel 507 of the first token.
    s = profile_channels(smollm2, ids, ["resid.pre"], [12], without_ma=("resid.pre",), progress=False)
    full, clean = s[(12, "resid.pre")], s[(12, "resid.pre" + NO_MA)]
    assert full.count[507] == clean.count[507] + 1
    left_out = full.mean[507] * full.count[507] - clean.mean[507] * clean.count[507]
    assert abs(left_out) > 10_000  # the one element left out is the MA (~23,000)
    ma_count = (
        profile_windows(smollm2, ids, ["resid.pre"], [12], progress=False).stats[(12, "resid.pre")].ma_count
    )
    assert int((full.count - clean.count).sum()) == ma_count  # the full reducer's MA count agrees


def test_gamma_intervention_edits_the_norm_output_cos_and_removes_them(smollm2: LoadedModel) -> None:
    """SmolLM2's layer-0 attention norm makes COs (paper Fig. 7); γ → mean at exactly those channels
    must remove them from x2, and the model comes back bit-exactly."""
    ids = _text_ids(smollm2, 96)
    before = _params(smollm2)
    cfg = typed_cfg(
        "experiment=perplexity", "intervention=gamma", "intervention.norm=attn", "intervention.layers=[0]"
    )
    found = cos_by_key(profile_channels(smollm2, ids, ["attn.norm"], [0], progress=False), 4.0, 1 / 3)
    planted = found[(0, "attn.norm")].tolist()
    assert planted, "SmolLM2 layer 0 should have channel-wise outliers after its first norm"
    with intervene(Inputs(smollm2, cfg.intervention, cfg.threshold, ids)) as log:
        assert log.edited == {(0, "attn"): planted}
        after = cos_by_key(profile_channels(smollm2, ids, ["attn.norm"], [0], progress=False), 4.0, 1 / 3)
        assert not set(after[(0, "attn.norm")].tolist()) & set(planted)
    _assert_same(smollm2, before)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("experiment=co", "threshold.m=0"), "threshold.m: must be > 0, got 0"),
        (("experiment=fig7", "threshold.beta=-0.1"), "threshold.beta: must be > 0, got -0.1"),
        (("experiment=table6", "threshold.sd=[4,0]"), "threshold.sd: items must be > 0, got 0.0"),
        (("experiment=table3", "experiment.matrices=[q,wq]"), "experiment.matrices: unknown matrix 'wq'"),
        (
            ("experiment=table6", "experiment.axis=rows"),
            "experiment.axis: Invalid value 'rows', expected one of",
        ),
        (
            ("experiment=table6", "experiment.targets=[qkv,attn]"),
            "experiment.targets[1]: Invalid value 'attn', expected one of [qkv, norm, mlp]",
        ),
        (
            ("experiment=perplexity", "intervention=gamma", "intervention.norm=attn_post"),
            "intervention.norm: no norm 'attn_post' in llama models (allowed: attn, mlp, both)",
        ),
        (
            ("experiment=perplexity", "intervention=weight_channels", "intervention.matrices=[q,up2]"),
            "intervention.matrices: unknown matrix 'up2'",
        ),
    ],
)
def test_bad_channel_input_is_a_config_error_and_a_failed_job(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    cfg = make_cfg("model=tiny-llama", "dataset.seq_len=16", "dataset.n_windows=1", "progress=false", *args)
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "job")
    assert str(err.value).startswith(expected)
    assert json.loads((tmp_path / "job" / "status.json").read_text())["status"] == "failed"


def test_bad_channel_input_from_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    args = ("model=tiny-gpt2", "experiment=fig9", "experiment.norm=mlp_post", "dataset.seq_len=16")
    out = cli(tmp_path, *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    expected = "error: experiment.norm: unknown norm 'mlp_post' (allowed: attn, mlp, both)"
    assert len(lines) == 1 and lines[0] == expected, out.stderr
