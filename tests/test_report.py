"""What a user reads first: the profile's MA tracks, the paper's findings against a run, and the report laid
out like the paper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outlier_study.app import run
from outlier_study.output.files import read_csv, write_csv, write_json
from outlier_study.output.summary import ma_tracks
from outlier_study.sweep.claims import CLAIMS, findings
from outlier_study.sweep.cli import main
from outlier_study.sweep.collect import collect
from outlier_study.sweep.jobs import read_job
from tests.helpers import make_cfg

TOPK = ("layer", "tap", "rank", "value", "window", "token", "channel", "token_text", "is_ma")


def _row(layer: int, tap: str, value: float, token: int = 0, channel: int = 7, window: int = 0) -> dict:
    return dict(zip(TOPK, (layer, tap, 1, value, window, token, channel, "<s>", 1), strict=True))


def test_a_carried_ma_is_one_track_with_its_birth_source_and_cancellation() -> None:
    rows = [
        _row(2, "mlp.hidden", 900.0, channel=31),  # the y6 spike ...
        _row(2, "mlp.out", 5000.0),  # ... becomes the y7 MA in residual channel 7
        _row(2, "resid.post", 5002.0),  # then the residual stream carries it
        *(_row(layer, tap, 5000.0 + layer) for layer in range(3, 6) for tap in ("resid.mid", "resid.post")),
        _row(6, "resid.pre", 5010.0, window=1),  # the same position in another window: its peak
        _row(6, "mlp.out", -4990.0),  # layer 6's MLP cancels it
        _row(4, "mlp.hidden", 300.0, channel=12),  # a y6 spike that makes nothing: a track of its own
        {**_row(3, "resid.post", 9.0), "is_ma": 0},  # not an MA: ignored
    ]
    tracks = ma_tracks(rows)
    assert len(tracks) == 2
    carried, lone = tracks
    channel, token, _, windows, born, source, span, peak, cancelled = carried.row()
    assert (channel, token, windows) == (7, 0, "0 1")
    assert born == "layer 2 mlp.out (+5000.00)" and source == "channel 31 (+900.00)"
    assert span == "2–6" and peak == "layer 6 resid.pre (+5010.00)"
    assert cancelled == "layer 6 mlp.out (-4990.00)"
    assert lone.row()[4] == "layer 4 mlp.hidden (+300.00)" and lone.source is None


def _job(root: Path, name: str, experiment: str, metrics: dict, events: list[list] | None = None) -> None:
    job = root / name
    write_json(job / "status.json", {"status": "ok"})
    write_json(job / "metrics.json", metrics)
    write_json(job / "env.json", {"experiment": {"name": experiment, "paper": "", "description": ""}})
    if events is not None:
        header = ["window", "layer", "site", "token", "channel", "value", "kind", "branch_value"]
        write_csv(job / "ma_events.csv", header, events)


def test_findings_are_computed_from_the_job_files(tmp_path: Path) -> None:
    """Each verdict follows from the numbers in the folder: change the numbers and the verdict changes."""
    _job(
        tmp_path,
        "t1",
        "table1",
        {"tma_count": 3, "fma_count": 40},
        [[0, 4, "resid.mid", 0, 7, 900, "TMA", 900], [0, 2, "resid.post", 0, 7, 800, "TMA", 800]],
    )
    _job(tmp_path, "t2", "table2", {"ppl_original": 10.0, "ppl_y6_zero": 15.0, "ppl_y7_zero": 900.0})
    _job(tmp_path, "t45", "table45", {"max_abs_y7_layer1_original": 2000.0, "max_abs_y7_layer1_removed": 3.0})
    _job(tmp_path, "f9", "fig9", {"co_total.original.attn.norm": 5, "co_total.gamma_mean.attn.norm": 5})
    jobs = collect(tmp_path).jobs
    by_experiment = {}
    for job in jobs:
        by_experiment.setdefault(
            json.loads((job.path / "env.json").read_text())["experiment"]["name"], []
        ).append((job.name, job))
    verdicts = {(f.claim.experiment, f.claim.text[:20]): f for f in findings(by_experiment)}
    first, fake = (v for k, v in verdicts.items() if k[0] == "table1")
    assert first.verdict == "agrees" and "MLP of layer 2" in first.measured  # layer 2 comes before layer 4
    assert fake.verdict == "agrees" and first.job == "t1"
    assert verdicts[("table2", CLAIMS[4].text[:20])].verdict == "differs"  # y6 → zero only 1.5×
    assert next(v for k, v in verdicts.items() if k[0] == "table45").verdict == "agrees"
    assert next(v for k, v in verdicts.items() if k[0] == "fig9").verdict == "differs"  # 5 → 5
    assert all(v.verdict == "not run" for k, v in verdicts.items() if k[0] in ("fig4", "fig8", "table3"))


@pytest.fixture(scope="module")
def paper_items(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    for experiment in ("table2", "table1", "fig4"):
        cfg = make_cfg(
            f"experiment={experiment}",
            "model=tiny-llama",
            "dataset.seq_len=32",
            "dataset.n_windows=2",
            "progress=false",
        )
        run(cfg, job_dir=root / experiment)
    return root


def test_the_report_follows_the_papers_order_with_findings_first(paper_items: Path, tmp_path: Path) -> None:
    assert main([str(paper_items), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.html").read_text()
    positions = [
        report.index(f'<h2 id="{anchor}"')
        for anchor in (
            "setup",
            "failed",
            "claims",
            "item-table1",
            "item-fig4",
            "item-table2",
            "collected",
            "provenance",
        )
    ]
    assert positions == sorted(positions)
    assert "Table 2 — token-level perplexity" in report  # the item's title comes from the job's env.json
    claims = report[report.index('<h2 id="claims"') : report.index('<h2 id="item-table1"')]
    assert claims.count("<tr>") == 1 + len(CLAIMS)  # every claim once: three answered, the others not run
    assert claims.count(">not run<") == len(
        [c for c in CLAIMS if c.experiment not in ("table1", "table2", "fig4")]
    )
    section = report[report.index('<h2 id="item-table2"') : report.index('<h2 id="collected"')]
    assert section.index("<h4>tables/table2.csv</h4>") < section.index("<details>")  # its own table open


def test_a_jobs_experiment_is_recorded_with_its_paper_item(paper_items: Path) -> None:
    job = read_job(paper_items / "table2", paper_items)
    assert job.env is not None and job.env["experiment"]["paper"] == "Table 2"
    assert read_csv(paper_items / "table2" / "tables" / "table2.csv")[0]["dataset"] == "embedded"
