"""`outlier-study-collect` on real job folders: a CLI multirun with a failing job, and app.run jobs."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.output.tables import Table, latex_escape, to_html, to_latex
from outlier_study.sweep.cli import EXIT_BAD_INPUT, EXIT_NOT_ALL_OK, EXIT_OK, main
from outlier_study.sweep.collect import Pivot, collect, pivot_tables
from outlier_study.sweep.jobs import Job
from tests.helpers import make_cfg

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")  # gpt2 has no mlp.up: `taps=[mlp.up]` fails there
DATASETS = ("embedded", "local_text")
SMALL = ("dataset.n_windows=1", "dataset.seq_len=16", "progress=false")


def _csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    path.write_text("A small local corpus for the local_text dataset of the collect tests.\n" * 40)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real multirun of table2 over 3 models x 2 datasets; the gpt2 jobs fail on their tap."""
    root = tmp_path_factory.mktemp("sweep")
    _corpus(root)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "outlier_study.cli",
            "-m",
            "experiment=table2",
            f"model={','.join(MODELS)}",
            f"dataset={','.join(DATASETS)}",
            "dataset.path=corpus.txt",
            "taps=[mlp.up]",
            *SMALL,
            f"hydra.sweep.dir={root / 'multirun'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode != 0 and "tap 'mlp.up' does not exist in gpt2 models" in out.stderr, out.stderr
    return root / "multirun"


@pytest.fixture(scope="module")
def local_jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Jobs run by app.run (no .hydra/overrides.yaml): perplexity per dataset x intervention, one profile."""
    root = tmp_path_factory.mktemp("local")
    corpus = _corpus(root)
    for dataset in DATASETS:
        for intervention in ("none", "residual"):
            cfg = make_cfg(
                "experiment=perplexity",
                "model=tiny-llama",
                f"dataset={dataset}",
                f"dataset.path={corpus}",
                f"intervention={intervention}",
                *SMALL,
            )
            run(cfg, job_dir=root / "jobs" / f"ppl-{dataset}-{intervention}")
    cfg = make_cfg(
        "experiment=profile", "model=tiny-llama", "dataset=embedded", f"dataset.path={corpus}", *SMALL
    )
    run(cfg, job_dir=root / "jobs" / "profile")
    return root / "jobs"


def _job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("status.json"))


def _status(job: Path) -> dict[str, str]:
    return json.loads((job / "status.json").read_text())


def _overrides(job: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def test_collected_table2_rows_are_the_per_job_rows_in_sweep_order(sweep: Path) -> None:
    assert main([str(sweep)]) == EXIT_NOT_ALL_OK
    ok = [j for j in _job_dirs(sweep) if _status(j)["status"] == "ok"]
    assert len(ok) == 4  # tiny-llama and tiny-qwen2 on both datasets
    by_params = {(_overrides(j)["model"], _overrides(j)["dataset"]): j for j in ok}
    expected: list[list[str]] = []
    header: list[str] = []
    for model in MODELS:
        for dataset in DATASETS:
            if (model, dataset) in by_params:
                header, *rows = _csv(by_params[(model, dataset)] / "tables" / "table2.csv")
                expected += [[model, dataset, *row] for row in rows]
    collected = _csv(sweep / "collected" / "table2.csv")
    assert collected[0] == ["model", "dataset (job)", *header]
    assert collected[1:] == expected


def test_failed_job_is_listed_everywhere_and_exit_code_is_1(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(sweep)]) == EXIT_NOT_ALL_OK
    failed = [j for j in _job_dirs(sweep) if _status(j)["status"] == "failed"]
    assert sorted(_overrides(j)["model"] for j in failed) == ["tiny-gpt2"] * len(DATASETS)
    stdout = capsys.readouterr().out
    assert f"collected {4 + len(failed)} job(s)" in stdout and f"4 ok, {len(failed)} failed" in stdout
    jobs = {row[0]: row for row in _csv(sweep / "collected" / "jobs.csv")[1:]}
    metrics = _csv(sweep / "collected" / "metrics.csv")
    assert [row[metrics[0].index("status")] for row in metrics[1:]].count("failed") == len(failed)
    report = (sweep / "collected" / "report.html").read_text()
    failures = report.split('<h2 id="failed">')[1].split("<h2")[0]
    assert failures.count("Traceback (most recent call last)") == len(failed)
    for job in failed:
        error = _status(job)["error"]
        assert error.startswith("taps: ")
        name = job.relative_to(sweep).as_posix()
        assert f"FAILED: {name}: {error}" in stdout
        assert jobs[name][1] == "failed" and jobs[name][-1] == error
        assert html.escape(name) in failures and html.escape(error) in failures


def test_console_script_exit_code_for_a_sweep_with_a_failure(sweep: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "outlier_study.sweep.cli", str(sweep), "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == EXIT_NOT_ALL_OK, out.stderr
    assert (tmp_path / "c" / "report.html").is_file() and (tmp_path / "c" / "table2.tex").is_file()
    assert re.search(r"report: .*report\.html \(\d+\.\d+ [kM]B\)", out.stdout)


def test_report_embeds_every_table_and_figure(local_jobs: Path, tmp_path: Path) -> None:
    out = tmp_path / "collected"
    assert main([str(local_jobs), "--out", str(out)]) == EXIT_OK
    report = (out / "report.html").read_text()
    pngs = sorted(local_jobs.rglob("figures/**/*.png"))
    assert pngs
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert report.count("<img ") == len(uris) == len(pngs)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in pngs)
    for table in collect(local_jobs, skip=out).tables:
        assert to_html(table) in report
        assert all((out / f"{table.name}.{ext}").is_file() for ext in ("md", "csv", "tex"))
    per_job_tables = sorted(local_jobs.rglob("tables/*.csv"))
    assert per_job_tables
    for path in per_job_tables:
        assert f"<h4>tables/{path.name}</h4>" in report
    assert report.count("<h4>tables/") == len(per_job_tables)
    assert not re.search(r"""(src|href)=["']?(https?:)?//|<link|<script|@import|url\(""", report)
    sha = json.loads((local_jobs / "profile" / "env.json").read_text())["git_sha"]
    assert str(sha) in report.split('<h2 id="provenance">')[1]


def test_pivot_cells_are_each_jobs_perplexity(local_jobs: Path, tmp_path: Path) -> None:
    """Experiment `perplexity` pivots to rows = dataset, columns = intervention ('none' is 'original')."""
    assert main([str(local_jobs), "--out", str(tmp_path)]) == EXIT_OK
    header, *rows = _csv(tmp_path / "intervention_ppl.csv")
    assert header == ["dataset", "original", "residual"]
    assert [row[0] for row in rows] == list(DATASETS)
    for row in rows:
        for column, intervention in (("original", "none"), ("residual", "residual")):
            metrics = json.loads((local_jobs / f"ppl-{row[0]}-{intervention}" / "metrics.json").read_text())
            assert row[header.index(column)] == f"{metrics['ppl']:.3f}"
    # the other tables of these jobs: lead columns come from the configs (no overrides.yaml here)
    metrics_header = _csv(tmp_path / "metrics.csv")[0]
    assert metrics_header[:4] == ["dataset", "experiment", "intervention", "status"]


def test_a_pivot_splits_into_one_table_per_other_varying_parameter(local_jobs: Path) -> None:
    """Rows = intervention, columns = experiment: the dataset, which also varies, gets a table each."""
    pivot = Pivot("perplexity", "p", rows="intervention", columns="experiment", value="ppl", digits=2)
    jobs = collect(local_jobs).jobs
    tables = {t.name: t for t in pivot_tables(jobs, [pivot])}
    assert sorted(tables) == [f"p__dataset-{d}" for d in DATASETS]
    for dataset in DATASETS:
        table = tables[f"p__dataset-{dataset}"]
        assert table.header == ("intervention", "perplexity") and f"dataset={dataset}" in table.caption
        for intervention, cell in table.rows:
            metrics = json.loads((local_jobs / f"ppl-{dataset}-{intervention}" / "metrics.json").read_text())
            assert cell == f"{metrics['ppl']:.2f}"


def test_a_row_options_own_keys_label_its_rows_instead_of_splitting_the_table() -> None:
    """A sweep over methods where only some have a key (`method.alpha`): one table per dataset still, with
    a row per method setting."""
    settings = [("none", None), ("smoothquant", "0.5"), ("smoothquant", "0.8")]
    jobs = []
    for dataset in ("a", "b"):
        for quant in ("w8a8", "w4a8"):
            for method, alpha in settings:
                overrides = {"experiment": "quant", "dataset": dataset, "quant": quant, "method": method}
                if alpha is not None:
                    overrides["method.alpha"] = alpha
                name = "_".join(overrides.values())
                ppl = 10.0 + len(jobs)
                jobs.append(Job(Path(name), name, "ok", overrides=overrides, metrics={"ppl": ppl}))
    pivot = Pivot("quant", "q", rows="method", columns="quant", value="ppl", digits=1, row_order=("none",))
    tables = {t.name: t for t in pivot_tables(jobs, [pivot])}
    assert sorted(tables) == ["q__dataset-a", "q__dataset-b"]
    table = tables["q__dataset-a"]
    assert table.header == ("method", "w8a8", "w4a8")
    assert table.rows == (
        ("none", "10.0", "13.0"),
        ("smoothquant (alpha=0.5)", "11.0", "14.0"),
        ("smoothquant (alpha=0.8)", "12.0", "15.0"),
    )


def test_latex_escapes_specials_and_arrows() -> None:
    assert latex_escape("ppl_y6 50% a&b y6 → mean") == r"ppl\_y6 50\% a\&b y6 $\rightarrow$ mean"
    assert latex_escape(r"#1 $x {y} ~ ^ \ |") == (
        r"\#1 \$x \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{} \textbar{}"
    )
    tex = to_latex(Table("t", ("a_b", "v%"), (("x & y", "1.5"), ("z", "2"))))
    assert "\\begin{tabular}{lr}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "a\\_b & v\\% \\\\" in tex and "x \\& y & 1.5 \\\\" in tex


def test_collected_latex_of_a_real_sweep_is_escaped(sweep: Path, tmp_path: Path) -> None:
    main([str(sweep), "--out", str(tmp_path)])
    table2 = (tmp_path / "table2.tex").read_text()
    assert r"y6 $\rightarrow$ mean" in table2 and "→" not in table2
    metrics = (tmp_path / "metrics.tex").read_text()
    assert r"ppl\_original" in metrics and "ppl_original" not in metrics


def test_collecting_twice_gives_identical_output(sweep: Path, tmp_path: Path) -> None:
    main([str(sweep), "--out", str(tmp_path)])
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    main([str(sweep), "--out", str(tmp_path)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert {"table2.md", "table2.csv", "table2.tex", "metrics.csv", "jobs.csv", "report.html"} <= set(first)


def test_one_job_folder_is_a_sweep_of_one(local_jobs: Path) -> None:
    job = local_jobs / "profile"
    assert main([str(job)]) == EXIT_OK
    [row] = _csv(job / "collected" / "jobs.csv")[1:]
    assert row[:2] == ["profile", "ok"]
    assert _csv(job / "collected" / "massive_activations.csv") == _csv(
        job / "tables" / "massive_activations.csv"
    )


def test_bad_sweep_dir_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == EXIT_BAD_INPUT
    assert main([str(tmp_path / "absent")]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"error: SWEEP_DIR: no job folders (a folder holding status.json) under '{tmp_path}'",
        f"error: SWEEP_DIR: '{tmp_path / 'absent'}' is not a folder",
    ]


def test_a_failing_app_run_job_is_collected_as_failed(tmp_path: Path) -> None:
    """A job that stopped on bad input (app.run directly, so no overrides.yaml) still shows its error."""
    cfg = make_cfg("experiment=profile", "model=tiny-llama", "taps=[nope]", *SMALL)
    with pytest.raises(ConfigError):
        run(cfg, job_dir=tmp_path / "bad")
    collection = collect(tmp_path)
    [job] = collection.jobs
    assert job.status == "failed" and "taps:" in job.error and not collection.all_ok
