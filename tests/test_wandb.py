"""`logger=wandb` on real jobs, checked by reading the written `run-*.wandb` back against the disk."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from outlier_study.app import run
from outlier_study.config import CONF_DIR
from outlier_study.output.files import read_csv
from outlier_study.sweep.tracker import wandb_key
from outlier_study.sweep.wandb_records import OfflineRun, find_runs, main, read_run
from tests.helpers import make_cfg

# Two taps keep the job short (two figures); low MA thresholds give the MA table rows to compare.
JOB = (
    "model=tiny-llama",
    "experiment=profile",
    "taps=[resid.post,mlp.hidden]",
    "dataset.seq_len=32",
    "dataset.n_windows=2",
    "threshold.ma_abs=0.05",
    "threshold.ma_ratio=4",
    "progress=false",
    "logger=wandb",
)
CLI = [sys.executable, "-m", "outlier_study.cli"]


def same(a: Any, b: Any) -> bool:
    """Equality that counts NaN equal to NaN (a statistic of an empty selection)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def wandb_dirs(root: Path) -> dict[str, str]:
    """W&B's own folders (artifact staging, cache, credentials) kept under the test's tmp dir."""
    return {
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_CONFIG_DIR": str(root / "config"),
    }


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """For in-process jobs: W&B folders under tmp, and every variable the tracker sets restored at the end."""
    home = tmp_path_factory.mktemp("wandb_home")
    patch = pytest.MonkeyPatch()
    for name, value in {**wandb_dirs(home), "HF_HUB_OFFLINE": "1"}.items():
        patch.setenv(name, value)
    for name in ("WANDB_MODE", "WANDB_ERROR_REPORTING"):  # set-then-delete records them for undo
        patch.setenv(name, os.environ.get(name, ""))
        patch.delenv(name)
    yield home
    import wandb

    wandb.teardown()
    patch.undo()


class Listener:
    """A TCP server on 127.0.0.1 that every W&B endpoint and HTTP proxy is pointed at; counts connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return self.connections

    def env(self, home: Path) -> dict[str, str]:
        """The test's environment with nothing of the user's W&B or proxy settings, all aimed here."""
        keep = {
            k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and "proxy" not in k.lower()
        }
        proxies = {k: self.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
        proxies |= {k.lower(): v for k, v in proxies.items()}
        endpoints = {"WANDB_BASE_URL": self.url, "WANDB_APP_URL": self.url}
        return {**keep, **proxies, **endpoints, **wandb_dirs(home), "HF_HUB_OFFLINE": "1"}


@dataclass
class Sweep:
    root: Path  # paths.output_root
    out: subprocess.CompletedProcess[str]
    jobs: list[Path]
    connections: int


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A 2-job multirun through the CLI (one process, basic launcher) while the listener counts."""
    cwd = tmp_path_factory.mktemp("sweep")
    listener = Listener()
    try:
        out = subprocess.run(
            [*CLI, "-m", *[a for a in JOB if not a.startswith("dataset.n_windows")], "dataset.n_windows=1,2"],
            cwd=cwd,
            env=listener.env(cwd / "wandb_home"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        connections = listener.close()
    jobs = sorted(p.parent for p in (cwd / "outputs").rglob("status.json"))
    return Sweep(cwd / "outputs", out, jobs, connections)


@dataclass
class Job:
    dir: Path
    run: OfflineRun


@pytest.fixture(scope="module")
def job(sweep: Sweep) -> Job:
    """The sweep's first job, read back from its run-*.wandb."""
    assert sweep.out.returncode == 0, sweep.out.stderr
    return Job(sweep.jobs[0], read_run(sweep.jobs[0] / "wandb"))


def test_history_rows_carry_layer_stats_csv(job: Job) -> None:
    rows = {row["layer"]: row for row in job.run.history if "layer" in row}
    disk = read_csv(job.dir / "layer_stats.csv")
    assert sorted(rows) == sorted({int(r["layer"]) for r in disk}) == [0, 1, 2]
    for r in disk:
        assert same(rows[int(r["layer"])][wandb_key(r["tap"], r["statistic"])], float(r["value"])), r
    for layer, row in rows.items():
        logged = {k for k in row if not k.startswith("_") and k != "layer"}
        assert logged == {wandb_key(r["tap"], r["statistic"]) for r in disk if int(r["layer"]) == layer}
    taps = {r["tap"] for r in disk}
    # every tap's charts use the layer as x-axis
    assert job.run.step_metrics == {wandb_key(tap, "*"): "layer" for tap in taps}


def test_summary_equals_metrics_json(job: Job) -> None:
    metrics = json.loads((job.dir / "metrics.json").read_text())
    assert all(same(job.run.summary[k], v) for k, v in metrics.items())
    media = ("tables/", "figures/")
    extra = {
        k for k in job.run.summary if not k.startswith("_") and k not in metrics and not k.startswith(media)
    }
    assert extra == set()  # per-layer statistics stay in the history, not in the summary


def test_config_equals_composed_config_on_disk(job: Job) -> None:
    on_disk = OmegaConf.to_container(OmegaConf.load(job.dir / ".hydra" / "config.yaml"), resolve=True)
    assert job.run.config == on_disk
    assert job.run.config["logger"]["mode"] is None  # null: WANDB_MODE decides, and the tests unset it ...
    assert json.loads((job.dir / "tracker.json").read_text())["mode"] == "offline"  # ... so offline it was


def test_tables_and_images_equal_the_files_on_disk(job: Job) -> None:
    tables = sorted((job.dir / "tables").glob("*.csv"))
    figures = sorted((job.dir / "figures").glob("*.png"))
    assert tables and len(figures) >= 2
    logged = {k for row in job.run.history for k in row if k.startswith(("tables/", "figures/"))}
    assert logged == {wandb_key("tables", p.stem) for p in tables} | {
        wandb_key("figures", p.stem) for p in figures
    }
    for path in tables:
        with path.open(newline="") as fh:
            header, *rows = list(csv.reader(fh))
        table = json.loads(job.run.media(wandb_key("tables", path.stem)).read_text())
        assert table["columns"] == header and len(table["data"]) == len(rows) > 0
        for logged_row, row in zip(table["data"], rows, strict=True):
            for cell, text in zip(logged_row, row, strict=True):
                assert cell == (float(text) if isinstance(cell, int | float) else text), (cell, text)
    for path in figures:
        media = job.run.media(wandb_key("figures", path.stem))
        assert media.read_bytes() == path.read_bytes()
        assert str(media.relative_to(job.run.files_dir)) in job.run.files


def test_reader_command_prints_the_run(job: Job, capsys: Any) -> None:
    main([str(job.dir)])
    [printed] = [json.loads(capsys.readouterr().out)]
    assert printed["run_id"] == job.run.run_id and printed["history_rows"] == len(job.run.history)
    assert printed["summary"]["tokens"] == json.loads((job.dir / "metrics.json").read_text())["tokens"]


@pytest.mark.parametrize("blocked", ["logger.dir", "WANDB_DATA_DIR"])
def test_wandb_failure_keeps_the_results_and_status_ok(
    wandb_home: Path, tmp_path: Path, blocked: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A regular file where W&B needs a folder: at start (run dir) or mid-run (table staging)."""
    (tmp_path / "file").write_text("not a folder")
    overrides = list(JOB)
    if blocked == "logger.dir":
        overrides.append(f"logger.dir={tmp_path / 'file' / 'wandb'}")
    else:
        monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "file" / "data"))
    job_dir = run(make_cfg(*overrides), job_dir=tmp_path / "job")
    assert json.loads((job_dir / "status.json").read_text())["status"] == "ok"
    assert json.loads((job_dir / "metrics.json").read_text())["n_layers"] == 3
    assert len(read_csv(job_dir / "layer_stats.csv")) > 0
    assert (job_dir / "figures" / "layer_tops.png").stat().st_size > 1000
    tracker = json.loads((job_dir / "tracker.json").read_text())
    assert tracker["status"] == "failed" and tracker["error"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logger=wandb failed" in line]
    assert len(warnings) == 1
    if blocked == "WANDB_DATA_DIR":  # failed after start: the run was still finished, as failed
        written = read_run(job_dir / "wandb")
        assert written.exit_code == 1
        assert (written.group, written.name) == ("profile", "job")  # no Hydra: experiment, job folder


def test_offline_jobs_make_no_network_connection(sweep: Sweep) -> None:
    assert sweep.out.returncode == 0, sweep.out.stderr
    assert len(sweep.jobs) == 2
    assert sweep.connections == 0


def test_multirun_jobs_are_separate_runs_grouped_by_sweep(sweep: Sweep) -> None:
    assert sweep.out.returncode == 0, sweep.out.stderr
    runs = [read_run(job / "wandb") for job in sweep.jobs]
    assert len({r.run_id for r in runs}) == 2
    for job, r in zip(sweep.jobs, runs, strict=True):
        assert len(find_runs(job)) == 1 and r.exit_code == 0
        assert r.group == str(job.parent.relative_to(sweep.root)) and r.name == job.name  # sweep, overrides
        assert r.job_type == "profile" and r.project == "outlier-study"
        tracker = json.loads((job / "tracker.json").read_text())
        assert tracker["status"] == "ok" and Path(tracker["run_dir"]) == r.path.parent
        assert json.loads((job / "status.json").read_text())["status"] == "ok"
        windows = json.loads((job / "windows.json").read_text())
        assert r.config["dataset"]["n_windows"] == len(windows["starts"])
        assert r.config == OmegaConf.to_container(
            OmegaConf.load(job / ".hydra" / "config.yaml"), resolve=True
        )
        assert r.summary["tokens"] == json.loads((job / "metrics.json").read_text())["tokens"]
        assert [row["layer"] for row in r.history if "layer" in row] == [0, 1, 2]


def test_an_unreachable_server_costs_the_timeout_then_the_run_is_written_offline(
    job: Job, tmp_path: Path
) -> None:
    """Online mode against a server that never answers: the tracker did try (the listener saw it), gave up
    after logger.init_timeout, wrote the same run offline and said how to upload it; the job is ok."""
    job_dir = shutil.copytree(job.dir, tmp_path / "job", ignore=shutil.ignore_patterns("wandb"))
    listener = Listener()
    code = (
        "import sys; from pathlib import Path; from hydra import compose, initialize_config_dir\n"
        "from outlier_study.config.schema import register_configs\n"
        "from outlier_study.sweep.tracker import track\n"
        "register_configs()\n"
        f"with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base='1.3'):\n"
        "    cfg = compose('config', overrides=sys.argv[2:])\n"
        "track(cfg, Path(sys.argv[1]))\n"
    )
    overrides = [
        *JOB,
        "logger.mode=online",
        "logger.project=p",
        "logger.init_timeout=3",
        f"logger.dir={tmp_path}",
    ]
    env = {**listener.env(tmp_path), "WANDB_API_KEY": "x" * 40}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(job_dir), *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        connections = listener.close()
    assert out.returncode == 0, out.stderr
    assert connections > 0
    [warning] = [line for line in out.stderr.splitlines() if line.startswith("warning: logger=wandb")]
    assert "no answer from the W&B server within 3 s" in warning and "wandb sync " in warning
    record = json.loads((job_dir / "tracker.json").read_text())
    assert record["status"] == "offline_fallback" and record["mode"] == "offline" and record["online_error"]
    assert record["sync"] == f"wandb sync {record['run_dir']}" and record["sync"] in warning
    run = read_run(Path(record["run_dir"]))
    assert run.summary["tokens"] == json.loads((job_dir / "metrics.json").read_text())["tokens"]


def test_wandb_mode_from_the_environment_is_respected(tmp_path: Path) -> None:
    """logger.mode=null: WANDB_MODE decides, as W&B documents it; disabled writes no run at all."""
    env = {**os.environ, **wandb_dirs(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [*CLI, *JOB, f"paths.output_root={tmp_path}"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    [tracker] = tmp_path.rglob("tracker.json")
    assert json.loads(tracker.read_text())["status"] == "disabled" and not find_runs(tmp_path)
    env["WANDB_MODE"] = "online"  # online without a project is refused before any work, not made offline
    out = subprocess.run(
        [*CLI, *JOB, f"paths.output_root={tmp_path / 'b'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "logger.project: required with logger.mode=online" in out.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("logger.mode=online",), "error: logger.project: required with logger.mode=online"),
        (
            ("logger.mode=cloud",),
            "error: logger.mode: Invalid value 'cloud', expected one of [offline, online, disabled]",
        ),
    ],
)
def test_bad_logger_settings_fail_in_one_line_before_any_work(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    out = subprocess.run(
        [*CLI, "model=tiny-llama", "logger=wandb", *args, f"paths.output_root={tmp_path}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    assert not list(tmp_path.rglob("env.json"))  # failed before the model was loaded
