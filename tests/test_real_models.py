"""The embedded real checkpoints: SmolLM2-135M shows massive activations; Gemma3-270M overflows float16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from outlier_study.app import run
from outlier_study.data import build_windows, load_corpus
from outlier_study.detect.superweight import detect_super_weights
from outlier_study.interventions.weights import Target, edit_weights
from outlier_study.measure.hooks import tap_hooks
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.measure.profiler import profile_windows
from outlier_study.models.loader import LoadedModel
from outlier_study.output.files import read_csv
from outlier_study.output.stat_tables import is_massive_entry as is_massive
from tests.helpers import make_cfg

pytestmark = pytest.mark.real


def test_smollm2_has_massive_activations_in_middle_layers(smollm2: LoadedModel, wikitext: Path) -> None:
    from outlier_study.data import build_windows

    cfg = make_cfg(
        "dataset=wikitext2", f"dataset.path={wikitext}", "dataset.seq_len=256", "dataset.n_windows=2"
    )
    windows = build_windows(cfg.dataset, smollm2.tokenizer)
    n = smollm2.n_layers
    middle = list(range(n // 4, 3 * n // 4))
    prof = profile_windows(smollm2, windows.input_ids, ["resid.post"], middle, progress=False)
    found = [
        (layer, e)
        for layer in middle
        for e in prof.stats[(layer, "resid.post")].top
        if is_massive(e, prof.stats[(layer, "resid.post")], 100.0, 1000.0)
    ]
    assert found, "no massive activation in SmolLM2's middle-layer residual stream"
    layer, entry = max(found, key=lambda le: le[1].abs)
    # The reported position holds the reported value in a fresh forward pass.
    seen: list[torch.Tensor] = []
    with (
        torch.no_grad(),
        tap_hooks(
            smollm2.model, smollm2.adapter, ["resid.post"], [layer], lambda *a: seen.append(a[2].clone())
        ),
    ):
        smollm2.model(windows.input_ids[entry.window : entry.window + 1])
    assert float(seen[0][0, entry.token, entry.channel]) == pytest.approx(entry.value, rel=1e-5)


def test_smollm2_profile_job_reports_mas(tmp_path: Path, smollm2: LoadedModel) -> None:
    job = run(
        make_cfg(
            "dataset.seq_len=128",
            "dataset.n_windows=2",
            "taps=[resid.pre,resid.mid,resid.post,mlp.hidden,mlp.out]",
            "progress=false",
        ),
        job_dir=tmp_path / "job",
    )
    rows = read_csv(job / "tables" / "massive_activations.csv")
    assert rows and all(abs(float(r["value"])) > 100 for r in rows)
    assert json.loads((job / "metrics.json").read_text())["ma_count_total"] > 0
    # SmolLM2's known MA: residual channel 507 of the first token, born in an MLP from a y6 spike and
    # carried by the residual stream for many layers.
    [track] = [
        r for r in read_csv(job / "tables" / "ma_tracks.csv") if r["channel"] == "507" and r["token"] == "0"
    ]
    assert " mlp.out " in track["born"] and track["from y6"].startswith("channel ")
    first, last = (int(x) for x in track["carried through layers"].split("–"))
    assert last - first >= 10


def test_gemma3_float16_reports_overflow_instead_of_crashing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = run(
        make_cfg(
            "model=gemma3-270m",
            "dtype=float16",
            "dataset.seq_len=128",
            "dataset.n_windows=2",
            "taps=[resid.post]",
            "progress=false",
            "experiment.plot3d.max_tokens=8",
        ),
        job_dir=tmp_path / "job",
    )
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["inf_count_total"] + metrics["nan_count_total"] > 0
    captured = capsys.readouterr()
    [warning] = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert "overflow of float16" in warning and "tables/nonfinite.md" in warning
    assert "Non-finite activations per tap" in captured.out
    rows = read_csv(job / "tables" / "nonfinite.csv")
    assert [r["tap"] for r in rows] == ["resid.post"]
    assert (
        sum(int(r["inf"]) + int(r["nan"]) for r in rows)
        == metrics["inf_count_total"] + metrics["nan_count_total"]
    )
    assert metrics["nonfinite.resid.post.nan"] == int(rows[0]["nan"])
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    for r in read_csv(job / "layer_stats.csv"):
        if r["statistic"] in ("max_abs", "top1_abs") and r["value"] not in ("nan",):
            assert float(r["value"]) <= torch.finfo(torch.float16).max  # only finite values enter statistics


def test_smollm2_super_weight_is_found_and_zeroing_it_breaks_the_model(smollm2: LoadedModel) -> None:
    """SmolLM2's super weight: layer 11's W_down[507, 1229] turns the y6 spike in channel 1229 of the first
    token into the MA of residual channel 507; zeroing that one weight of 884,736 wrecks perplexity."""
    cfg = make_cfg("dataset.seq_len=128", "dataset.n_windows=2")
    windows = build_windows(cfg.dataset, smollm2.tokenizer, load_corpus(cfg.dataset))
    found, _ = detect_super_weights(smollm2, windows.input_ids, list(range(smollm2.n_layers)), cfg.threshold)
    assert (11, 507, 1229) in [(sw.layer, sw.row, sw.col) for sw in found]
    original = evaluate_perplexity(smollm2, windows.input_ids, progress=False).ppl
    with edit_weights(smollm2, [Target(11, "down", 507, 1229)], "zero"):
        broken = evaluate_perplexity(smollm2, windows.input_ids, progress=False).ppl
    assert broken > 3 * original
    assert evaluate_perplexity(smollm2, windows.input_ids, progress=False).ppl == original  # restored
