"""`run(cfg)` end to end on tiny models: the results layout, and bad input failing cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.models.tiny import byte_tokenizer
from outlier_study.output.files import read_csv
from tests.helpers import TINY_MODELS, make_cfg

SMALL = ("dataset.seq_len=48", "dataset.n_windows=3", "dataset.batch_size=2", "progress=false")


def run_job(tmp_path: Path, *overrides: str) -> Path:
    return run(make_cfg(*SMALL, *overrides), job_dir=tmp_path / "job")


@pytest.mark.parametrize("model", TINY_MODELS)
def test_profile_writes_the_results_layout(tmp_path: Path, model: str) -> None:
    job = run_job(tmp_path, f"model={model}")
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    env = json.loads((job / "env.json").read_text())
    assert env["model"]["model_type"] and env["packages"]["torch"]
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["tokens"] == 3 * 48 and metrics["n_layers"] == 3
    rows = read_csv(job / "layer_stats.csv")
    taps = {r["tap"] for r in rows}
    assert len({(r["layer"], r["tap"]) for r in rows}) == 3 * len(taps) == 3 * metrics["n_taps"]
    top = read_csv(job / "topk.csv")
    assert {int(r["window"]) for r in top} <= {0, 1, 2}
    assert all(0 <= int(r["token"]) < 48 for r in top)
    channels = np.load(job / "channels.npz")
    assert channels["0/resid.pre/mean"].shape == channels["0/resid.pre/std"].shape
    assert (job / "figures" / "layer_tops.png").stat().st_size > 1000
    assert list((job / "figures").glob("surface_resid.post_layer*.png"))
    assert (job / "tables" / "massive_activations.md").exists()
    assert (job / ".hydra" / "config.yaml").exists()
    windows = json.loads((job / "windows.json").read_text())
    assert windows["seq_len"] == 48 and len(windows["starts"]) == 3


def test_profile_without_figures_writes_the_same_tables_and_no_plot(tmp_path: Path) -> None:
    with_plots = run_job(tmp_path / "a", "model=tiny-llama")
    tables_only = run_job(tmp_path / "b", "model=tiny-llama", "experiment.figures=false")
    assert not (tables_only / "figures").exists() or not any((tables_only / "figures").iterdir())
    for name in ("layer_stats.csv", "topk.csv"):
        assert (tables_only / name).read_bytes() == (with_plots / name).read_bytes()


def test_topk_positions_point_at_the_recorded_values(tmp_path: Path) -> None:
    """Re-run the model and read the activation at each recorded (window, token, channel)."""
    from outlier_study.measure.hooks import tap_hooks
    from outlier_study.models.loader import load_model

    cfg = make_cfg(*SMALL, "model=tiny-qwen2", "taps=[resid.post,mlp.hidden,attn.probs]")
    job = run(cfg, job_dir=tmp_path / "job")
    lm = load_model(cfg.model, "float32", "cpu", cfg.paths.model_cache)
    assert len(json.loads((job / "windows.json").read_text())["starts"]) == 3
    from outlier_study.data import build_windows

    windows = build_windows(cfg.dataset, lm.tokenizer)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    with (
        torch.no_grad(),
        tap_hooks(
            lm.model,
            lm.adapter,
            ["resid.post", "mlp.hidden", "attn.probs"],
            [0, 1, 2],
            lambda layer, tap, x, v: seen.__setitem__((layer, tap), x.clone()),
        ),
    ):
        lm.model(windows.input_ids)
    for r in read_csv(job / "topk.csv"):
        x = seen[(int(r["layer"]), r["tap"])]
        if r["tap"] == "attn.probs":
            value = x[int(r["window"]), int(r["head"]), int(r["token"]), int(r["channel"])]
        else:
            value = x[int(r["window"]), int(r["token"]), int(r["channel"])]
        assert float(value) == pytest.approx(float(r["value"]), rel=1e-5, abs=1e-7)


def test_text_and_token_are_consistent(tmp_path: Path) -> None:
    job = run_job(tmp_path, "model=tiny-llama")
    tok = byte_tokenizer()
    for r in read_csv(job / "topk.csv")[:20]:
        text = tok.decode([int(r["token_id"])]).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        assert r["token_text"] == text


BAD_INPUT = [
    (("model=tiny-llama", "taps=[mlp.nope]"), "taps: unknown tap 'mlp.nope'"),
    (("model=tiny-gpt2", "taps=[mlp.up]"), "taps: tap 'mlp.up' does not exist in gpt2"),
    (("model=tiny-llama", "dataset=local_text"), "dataset.path"),
    (("model=tiny-llama", "dataset.seq_len=0"), "dataset.seq_len: must be > 0"),
    (("model=tiny-llama", "dataset.seq_len=5000"), "dataset.seq_len"),
    (("model=tiny-llama", "dataset.n_windows=0"), "dataset.n_windows: must be > 0"),
    (("model=tiny-llama", "layers=[7]"), "layers: layer 7 out of range"),
    (("model=tiny-llama", "threshold.ma_abs=0"), "threshold.ma_abs: must be > 0"),
    (("model=tiny-llama", "threshold.ma_ratio=-1"), "threshold.ma_ratio: must be > 0"),
    (("model=tiny-llama", "model.model_type=nope"), "model.model_type"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT)
def test_bad_input_fails_with_a_named_field_and_no_ok_status(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_job(tmp_path, *overrides)
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["status"] == "failed" and message.split(":")[0] in status["error"]
    assert not (tmp_path / "job" / "metrics.json").exists()


def test_text_too_short_for_one_window(tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("only a few words")
    with pytest.raises(ConfigError, match="dataset.n_windows|dataset.seq_len"):
        run_job(tmp_path, "model=tiny-llama", "dataset=local_text", f"dataset.path={text}")
