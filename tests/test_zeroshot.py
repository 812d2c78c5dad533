"""Zero-shot accuracy through lm-evaluation-harness on the in-memory model (eval.*), with the local task of
tests/data/lm_eval_tasks (a 12-question multiple-choice jsonl), and the 2048-token WikiText-2 preset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from outlier_study.app import run
from outlier_study.interventions import Inputs
from outlier_study.measure.zeroshot import ZeroShot, prepare_tasks
from outlier_study.models.loader import LoadedModel, load_model
from outlier_study.quant.fake import fake_quant, spec_from_config
from outlier_study.quant.methods import METHODS
from outlier_study.sweep.collect import collect, is_pivot, pivot_tables
from outlier_study.sweep.jobs import Job
from outlier_study.sweep.wandb_records import read_run
from tests.helpers import REPO, assert_bit_exact, hook_count, make_cfg, snapshot, typed_cfg

TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
EVAL = ("eval.tasks=[outlier_mc]", f"eval.include_path={TASKS}")
W2A4 = ("quant=w4a4", "quant.w_bits=2")  # low enough to flip some of the tiny model's answers
# The y6 elements above 4x their tensor's median |a| set to zero: a change the tiny model's answers feel.
MASSIVE = ("intervention=massive", "intervention.tap=y6", "intervention.value=zero")
LOW_MA = ("threshold.ma_abs=0.01", "threshold.ma_ratio=4")


@pytest.fixture(autouse=True)
def from_the_repo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The task's data_files path is relative (HF datasets reads it from the working directory); tiny
    models gain nothing from threads on a shared CPU."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _docs() -> list[dict[str, Any]]:
    lines = (TASKS / "outlier_mc.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@torch.no_grad()
def direct_accuracy(lm: LoadedModel) -> tuple[float, float]:
    """acc and acc_norm by hand: for each question, the choice whose continuation ' <choice>' after the
    prompt has the highest summed log-likelihood (acc_norm: divided by the choice's length in characters)."""
    hits, norm_hits, docs = 0, 0, _docs()
    for doc in docs:
        prompt = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ids = lm.tokenizer(prompt + " " + choice, add_special_tokens=False, return_tensors="pt").input_ids
            n = len(lm.tokenizer(" " + choice, add_special_tokens=False).input_ids)
            logp = torch.log_softmax(lm.model(ids[:, :-1]).logits.float(), dim=-1)[0, -n:]
            scores.append(float(logp.gather(-1, ids[0, -n:, None]).sum()))
        best = max(range(len(scores)), key=scores.__getitem__)
        norm = max(range(len(scores)), key=lambda i: scores[i] / len(doc["choices"][i]))
        hits, norm_hits = hits + (best == doc["label"]), norm_hits + (norm == doc["label"])
    return hits / len(docs), norm_hits / len(docs)


def _zeroshot(lm: LoadedModel, *overrides: str) -> ZeroShot:
    cfg = typed_cfg("experiment=quant", *EVAL, *overrides)
    return ZeroShot(lm, cfg.eval, prepare_tasks(cfg.eval), seed=0)


def _scores(zs: ZeroShot) -> tuple[float, float]:
    scores = zs.evaluate().scores["outlier_mc"]
    return scores["acc"], scores["acc_norm"]


def test_lm_evals_accuracy_is_the_direct_log_likelihood_comparison_with_and_without_quantization(
    model_cache: Path,
) -> None:
    """lm-eval scores the model as the hooks leave it: its acc and acc_norm equal a direct computation on
    the plain model and under W2A4 fake quantization, the two differ, and the model comes back bit-exact."""
    cfg = make_cfg("model=tiny-llama")
    lm = load_model(cfg.model, "float32", "cpu", model_cache)
    before = snapshot(lm)
    zs = _zeroshot(lm)
    plain = _scores(zs)
    assert plain == direct_accuracy(lm)
    with fake_quant(lm, spec_from_config(typed_cfg("experiment=quant", *W2A4).quant)):
        quantized = _scores(zs)
        assert quantized == direct_accuracy(lm)
    assert quantized != plain
    assert _scores(zs) == plain  # nothing of the quantization stays behind
    assert_bit_exact(lm, before)
    assert hook_count(lm) == 0


def test_rotation_keeps_its_untied_head_while_lm_eval_runs_and_restores_the_model(model_cache: Path) -> None:
    """HFLM ties the word embeddings when it is built: built before the method (as the experiments do),
    rotation's untied lm_head stays untied while lm-eval scores (rotation is exact: the answers stay)."""
    cfg = typed_cfg("model=tiny-llama", "+model.arch.tie_word_embeddings=true", "experiment=quant")
    cfg.method = typed_cfg("experiment=quant", "method=rotation").method
    lm = load_model(cfg.model, "float32", "cpu", model_cache)
    head, emb = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert head.weight is emb.weight
    before = snapshot(lm)
    zs = _zeroshot(lm)
    plain = _scores(zs)
    with METHODS.get("rotation").apply(Inputs(lm, cfg.method, cfg.threshold)):
        assert head.weight is not emb.weight
        assert _scores(zs) == plain
        assert head.weight is not emb.weight
    assert head.weight is emb.weight
    assert_bit_exact(lm, before)


def _job(
    tmp_path: Path, name: str, *overrides: str, small: tuple[str, ...] = ("dataset.seq_len=48",)
) -> tuple[Path, dict[str, Any]]:
    cfg = make_cfg("model=tiny-llama", *small, "dataset.n_windows=2", "progress=false", *overrides)
    job = run(cfg, tmp_path / name)
    return job, json.loads((job / "metrics.json").read_text())


def test_quant_jobs_record_the_scores_in_metrics_tables_and_the_collected_pivots(tmp_path: Path) -> None:
    job, plain = _job(tmp_path, "none", "experiment=quant", *EVAL)
    _, quantized = _job(tmp_path, "w2a4", "experiment=quant", *W2A4, *EVAL)
    assert plain["eval.outlier_mc.acc"] == 0.25 and plain["eval.outlier_mc.n_samples"] == 12
    assert 0 < plain["eval.outlier_mc.acc_stderr"] < 1 and "eval.outlier_mc.acc_norm_stderr" in plain
    assert quantized["eval.outlier_mc.acc"] != plain["eval.outlier_mc.acc"]
    assert plain["eval.lm_eval"] and plain["eval.tasks"] == ["outlier_mc"] and plain["eval.limit"] is None
    assert plain["eval.num_fewshot"] == 0 and plain["eval.batch_size"] == 1
    assert plain["eval.include_path"] == str(TASKS)
    record = json.loads((job / "zeroshot.json").read_text())
    assert record["setting"] == "none W16A16" and record["scores"]["outlier_mc"]["acc"] == 0.25
    assert record["protocol"]["task_versions"] == {"outlier_mc": 1.0}
    header, *rows = (job / "tables" / "zeroshot.csv").read_text().splitlines()
    assert header == "setting,task,metric,value,stderr,n_samples"
    assert [r.split(",")[2] for r in rows] == ["acc", "acc_norm"]
    tables = {t.name: t for t in collect(tmp_path).tables}
    [name] = [n for n in tables if n.startswith("quant_eval_outlier_mc_acc_norm")]
    assert is_pivot(name) and not is_pivot("zeroshot")
    cells = {c for row in tables[name].rows for c in row[1:]}
    assert f"{plain['eval.outlier_mc.acc_norm']:.4f}" in cells
    assert f"{quantized['eval.outlier_mc.acc_norm']:.4f}" in cells


def test_an_intervention_gets_an_accuracy_column_and_its_counts_stay_the_perplexitys(tmp_path: Path) -> None:
    _, original = _job(tmp_path, "none", "experiment=perplexity", *LOW_MA, *EVAL)
    _, removed = _job(tmp_path, "massive", "experiment=perplexity", *LOW_MA, *MASSIVE, *EVAL)
    _, alone = _job(tmp_path, "massive-alone", "experiment=perplexity", *LOW_MA, *MASSIVE)
    assert removed["eval.outlier_mc.acc_norm"] != original["eval.outlier_mc.acc_norm"]
    assert removed["intervention.changed_total"] == alone["intervention.changed_total"] > 0
    assert removed["ppl"] == alone["ppl"]
    assert not any(k.startswith("eval.") for k in alone)


def test_collect_builds_one_pivot_per_score_beside_the_perplexity_one() -> None:
    jobs = []
    for quant in ("none", "w8a8"):
        for method in ("none", "smoothquant"):
            overrides = {"experiment": "quant", "quant": quant, "method": method}
            acc = 0.5 + 0.1 * len(jobs)
            metrics = {"ppl": 10.0, "eval.limit": 4, "eval.piqa.acc": acc, "eval.piqa.acc_stderr": 0.1}
            metrics |= {"eval.piqa.n_samples": 4, "eval.piqa.acc_norm": acc / 2}
            name = f"{quant}_{method}"
            jobs.append(Job(Path(name), name, "ok", overrides=overrides, metrics=metrics))
    tables = {t.name: t for t in pivot_tables(jobs)}
    assert sorted(tables) == ["quant_eval_piqa_acc", "quant_eval_piqa_acc_norm", "quant_ppl"]
    acc = tables["quant_eval_piqa_acc"]
    assert acc.header == ("method", "W16A16", "W8A8") and "lm-eval piqa acc" in acc.caption
    assert acc.rows == (("none", "0.5000", "0.7000"), ("smoothquant", "0.6000", "0.8000"))


def test_wandb_summary_and_tables_carry_the_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA", "CACHE", "CONFIG"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    job, metrics = _job(tmp_path, "wandb", "experiment=quant", *EVAL, "logger=wandb", "logger.mode=offline")
    wandb_run = read_run(job / "wandb")
    scores = {k: v for k, v in metrics.items() if k.startswith("eval.outlier_mc.")}
    assert len(scores) == 5 and all(wandb_run.summary[k] == v for k, v in scores.items())
    assert "tables/zeroshot" in wandb_run.summary


def test_the_2048_token_wikitext2_preset_runs_and_is_recorded(tmp_path: Path) -> None:
    preset = typed_cfg("dataset=wikitext2_2048").dataset
    assert (preset.name, preset.seq_len, preset.n_windows, str(preset.sampling)) == (
        "wikitext2",
        2048,
        100,
        "contiguous",
    )
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = Heading = \n\n Some article text about outliers , with spaces before commas . \n" * 90)
    overrides = ("dataset=wikitext2_2048", f"dataset.path={raw}", "+model.arch.max_position_embeddings=2048")
    job, metrics = _job(tmp_path, "w2048", "experiment=quant", "quant=w8a8", *overrides, small=())
    assert metrics["dataset.seq_len"] == 2048 and metrics["dataset.n_windows"] == 2
    assert metrics["n_tokens"] == 2 * 2047
    assert json.loads((job / "perplexity.json").read_text())["protocol"]["seq_len"] == 2048
    header, row = (job / "tables" / "quant.csv").read_text().splitlines()
    assert header == "dataset,seq_len,method,W8A8" and row.startswith("wikitext2,2048,none,")


@pytest.mark.real
def test_smollm2_through_lm_eval_is_the_direct_computation_and_beats_chance(smollm2: LoadedModel) -> None:
    """The real tokenizer (BPE, not bytes) and model: lm-eval's scores are the direct comparison's."""
    before = snapshot(smollm2)
    acc, acc_norm = _scores(_zeroshot(smollm2))
    assert (acc, acc_norm) == direct_accuracy(smollm2)
    assert acc >= 0.5  # 12 easy questions of 2-4 choices: chance is 0.33
    assert_bit_exact(smollm2, before)
