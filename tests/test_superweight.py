"""Super weights: per-window peaks, the candidate rule on a planted super weight, the `superweight`
experiment and its ablations against random controls, and `superweight_keep` under quantization."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from outlier_study.app import run
from outlier_study.context import Context
from outlier_study.data import build_windows, load_corpus
from outlier_study.detect.superweight import Y6, detect_super_weights, weight_rank
from outlier_study.experiments import EXPERIMENTS
from outlier_study.models.loader import LoadedModel
from outlier_study.quant.fake import QuantSpec, fake_quant, quantize
from outlier_study.quant.superweight_keep import keep_super_weights
from outlier_study.stats.massive import ma_mask, window_medians
from outlier_study.stats.peaks import PeakReducer
from tests.helpers import assert_bit_exact, hook_count, load_named, make_cfg, snapshot, typed_cfg

RULE = SimpleNamespace(ma_abs=100.0, ma_ratio=1000.0)  # the default MA rule
LAYER, ROW, COL = 1, 5, 7  # where the super weight is planted: W_down[ROW, COL] of layer 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def planted(model_cache: Path) -> LoadedModel:
    """tiny-llama with a super weight: gate and up rows COL of layer 1 scaled up make a y6 spike in input
    channel COL of its down projection, and W_down[ROW, COL] = 4 turns it into a y7 spike in channel ROW."""
    lm = load_named("tiny-llama", model_cache)
    block = lm.adapter.blocks(lm.model)[LAYER]
    with torch.no_grad():
        for name in ("gate", "up"):
            lm.adapter.weight_view(block, name)[COL] *= 300.0
        lm.adapter.weight_view(block, "down")[ROW, COL] = 4.0
    return lm


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ peaks


def test_peaks_stream_each_windows_largest_value_and_median() -> None:
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    x[1, 3, 2] = -50.0
    x[4, 0, 5] = float("nan")  # never a peak
    valid = torch.ones(5, 7, 6, dtype=torch.bool)
    valid[2, :, 0] = False
    x[2, 1, 0] = 99.0  # excluded by the mask: not window 2's peak
    reducer = PeakReducer()
    reducer.update(x[:2], 0, valid[:2])  # windows arrive in batches
    reducer.update(x[2:], 2, valid[2:])
    peaks = reducer.result()
    assert [p.window for p in peaks] == [0, 1, 2, 3, 4]
    for p in peaks:
        a = x[p.window].abs().nan_to_num(-1.0).masked_fill(~valid[p.window], -1.0)
        token, channel = divmod(int(a.argmax()), 6)
        assert (p.token, p.channel, p.value) == (token, channel, float(x[p.window, token, channel]))
    assert peaks[1].value == -50.0
    assert [p.median for p in peaks[:4]] == window_medians(x[:4].abs()).tolist()
    assert peaks[1].massive(10.0, 20.0) and not peaks[1].massive(60.0, 20.0)


# --------------------------------------------------------------------------------------- candidate rule


def test_planted_super_weight_is_the_only_candidate(planted: LoadedModel, ids: torch.Tensor) -> None:
    found, peaks = detect_super_weights(planted, ids, list(range(planted.n_layers)), RULE)
    assert [(sw.layer, sw.row, sw.col) for sw in found] == [(LAYER, ROW, COL)]
    [sw] = found
    assert sw.windows == (0, 1, 2) and sw.y7_massive == 3
    assert all(p.channel == COL for p in peaks[(LAYER, Y6)])
    assert 0.9 < sw.share <= 1.01  # the planted weight makes (nearly) all of the y7 spike
    view = planted.adapter.weight_view(planted.adapter.blocks(planted.model)[LAYER], "down")
    rank = weight_rank(view, ROW, COL)
    assert (rank.value, rank.row_rank, rank.col_rank) == (4.0, 1, 1)
    view = view.detach().clone()
    view[ROW, 0] = -9.0  # a larger |w| in its row: rank 2 there, still 1 in its column
    assert (weight_rank(view, ROW, COL).row_rank, weight_rank(view, ROW, COL).col_rank) == (2, 1)
    none, _ = detect_super_weights(planted, ids, [0, 2], RULE)  # the other layers hold no MA at y6
    assert none == []


def _context(lm: LoadedModel, job_dir: Path, *overrides: str) -> Context:
    cfg = typed_cfg(
        "experiment=superweight",
        "model=tiny-llama",
        "dataset.seq_len=32",
        "dataset.n_windows=3",
        "experiment.random_seeds=2",
        "progress=false",
        *overrides,
    )
    windows = build_windows(cfg.dataset, lm.tokenizer, load_corpus(cfg.dataset))
    layers = list(range(lm.n_layers))
    return Context(cfg=cfg, lm=lm, windows=windows, taps=[], layers=layers, job_dir=job_dir)


def test_experiment_finds_ablates_and_restores_the_planted_weight(
    planted: LoadedModel, tmp_path: Path
) -> None:
    ctx = _context(planted, tmp_path)
    before, hooks = snapshot(planted), hook_count(planted)
    metrics = EXPERIMENTS.get("superweight").run(ctx)
    assert_bit_exact(planted, before)
    assert hook_count(planted) == hooks
    assert metrics["n_candidates"] == 1
    assert (metrics[f"layer{LAYER}.row"], metrics[f"layer{LAYER}.col"]) == (ROW, COL)
    original = metrics["ppl_original"]
    for kind in ("weight_zero", "weight_scale", "row_zero", "col_zero"):
        effect = abs(metrics[f"layer{LAYER}.{kind}.ppl"] - original)
        control = abs(metrics[f"layer{LAYER}.{kind}.random_mean"] - original)
        assert effect > 10 * control, (
            kind
        )  # the cause, not a detector: random ones of the same matrix do little
    [row] = [r for r in _csv(tmp_path / "tables" / "superweight.csv")]
    assert (row["layer"], row["i (y7 channel)"], row["j (y6 channel)"]) == (str(LAYER), str(ROW), str(COL))
    assert row["at its layer"].startswith("TMA") and row["MA of channel i born at"].startswith(f"{LAYER} ")
    ablation = _csv(tmp_path / "tables" / "superweight_ablation.csv")
    assert [r["ablation"] for r in ablation] == ["W[i, j] → 0", "W[i, j] × 2", "row i → 0", "column j → 0"]
    assert (tmp_path / "figures" / "superweight.png").stat().st_size > 0
    record = json.loads((tmp_path / "perplexity.json").read_text())
    assert record["schema"] == "outlier-study/perplexity" and record["extra"]["seeds"] == [0, 1]
    labels = [e["label"] for e in record["evaluations"]]
    assert len(labels) == 1 + 4 * 3 and len(set(labels)) == len(labels)
    assert {e["setting"].get("seed") for e in record["evaluations"] if e["setting"].get("control")} == {0, 1}
    found = json.loads((tmp_path / "super_weights.json").read_text())
    assert found["intervention.weights"] == f"[{{layer:{LAYER},matrix:down,row:{ROW},col:{COL}}}]"


def _csv(path: Path) -> list[dict[str, str]]:
    from outlier_study.output.files import read_csv

    return read_csv(path)


def test_experiment_job_on_a_model_without_candidates(tmp_path: Path) -> None:
    """A random tiny model has no MA at y6: the job still writes every table, with no ablation run."""
    job = run(
        make_cfg(
            "experiment=superweight",
            "model=tiny-gpt2",
            "dataset.seq_len=24",
            "dataset.n_windows=2",
            "progress=false",
        ),
        tmp_path / "job",
    )
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["n_candidates"] == 0 and metrics["ppl_original"] > 1
    assert len(_csv(job / "tables" / "superweight_layers.csv")) == 3
    assert _csv(job / "tables" / "superweight.csv") == []
    assert len(json.loads((job / "perplexity.json").read_text())["evaluations"]) == 1


# ------------------------------------------------------------------------------------ superweight_keep


def _down_io(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The planted layer's down projection: its input as the model makes it, and its output."""
    module = lm.adapter.module(lm.adapter.blocks(lm.model)[LAYER], lm.adapter.down)
    seen: list[torch.Tensor] = []
    pre = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()), prepend=True)
    post = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        pre.remove()
        post.remove()
    return seen[0], seen[1]


@pytest.mark.parametrize("keep_activations", [False, True])
def test_keeping_super_weights_is_the_same_map_unquantized(
    planted: LoadedModel, ids: torch.Tensor, keep_activations: bool
) -> None:
    found, _ = detect_super_weights(planted, ids, list(range(planted.n_layers)), RULE)
    before, hooks = snapshot(planted), hook_count(planted)
    with torch.no_grad():
        reference = planted.model(ids).logits
    with keep_super_weights(planted, found, keep_activations, (RULE.ma_abs, RULE.ma_ratio)) as record:
        assert hook_count(planted) == hooks + 1 + keep_activations
        with torch.no_grad():
            kept = planted.model(ids).logits
    assert record.summary("method", detail=False)["method.super_weights"] == f"{LAYER}:{ROW},{COL}"
    assert torch.allclose(kept, reference, rtol=1e-4, atol=1e-4)
    assert_bit_exact(planted, before)
    assert hook_count(planted) == hooks


def test_kept_weight_is_full_precision_and_out_of_its_rows_scale(
    planted: LoadedModel, ids: torch.Tensor
) -> None:
    found, _ = detect_super_weights(planted, ids, list(range(planted.n_layers)), RULE)
    w = planted.adapter.weight_view(planted.adapter.blocks(planted.model)[LAYER], "down").detach().clone()
    held_out = w.clone()
    held_out[ROW, COL] = 0.0
    expected_w = quantize(held_out, 4, group_size=16)
    expected_w[ROW, COL] = w[ROW, COL]
    spec = QuantSpec(w_bits=4, a_bits=8, w_group_size=16)
    for keep_activations in (False, True):
        with (
            keep_super_weights(planted, found, keep_activations, (RULE.ma_abs, RULE.ma_ratio)),
            fake_quant(planted, spec),
        ):
            x, out = _down_io(planted, ids)  # x: the input before any hook of the down projection
        mas = (
            ma_mask(x, RULE.ma_abs, RULE.ma_ratio)[..., COL]
            if keep_activations
            else torch.zeros_like(x[..., COL], dtype=torch.bool)
        )
        held = torch.where(mas, x[..., COL], 0.0)
        rest = x.clone()
        rest[..., COL] -= held
        expected = F.linear(quantize(rest, 8), expected_w) + held.unsqueeze(-1) * expected_w[:, COL]
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-3), keep_activations
        assert bool(mas.any()) == keep_activations  # the held MAs exist: the check is not vacuous
    plain = quantize(w, 4, group_size=16)  # without keeping it, the super weight sets its group's scale
    assert (plain[ROW, :16] == 0).sum() > (expected_w[ROW, :16] == 0).sum()


def test_quant_job_with_superweight_keep(tmp_path: Path) -> None:
    job = run(
        make_cfg(
            "experiment=quant",
            "model=tiny-llama",
            "quant=w4a16",
            "quant.w_group_size=16",
            "method=superweight_keep",
            "method.calib_windows=2",
            "dataset.seq_len=24",
            "dataset.n_windows=2",
            "experiment.diag_windows=1",
            "progress=false",
        ),
        tmp_path / "job",
    )
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["method"] == "superweight_keep" and metrics["quant.label"] == "W4A16g16"
    assert metrics["method.super_weights"] == "none" and metrics["ppl"] > 1  # random tiny: nothing to keep
    assert len(json.loads((job / "calibration.json").read_text())["starts"]) == 2
