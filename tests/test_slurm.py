"""Sweeps through `hydra/launcher=slurm` on a real single-node SLURM cluster (scripts/slurm_local.sh).

The cluster is started for the session when it is not already up, and stopped at the end only then.
When it cannot start (not root, no apt), these tests are skipped, or fail when the CI variable is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.helpers import REPO

CLI = Path(sys.executable).parent / "outlier-study"
SCRIPT = REPO / "scripts" / "slurm_local.sh"
# one CPU and 2 GB per job: two jobs share the 2-core test node; the single thread avoids oversubscription
SMALL_JOBS = ("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2")
# long enough (a few seconds of windows) to be cancelled or requeued while it runs
LONG_JOB = ("experiment=perplexity", "model=tiny-llama", "dataset.seq_len=512", "dataset.n_windows=200")
# Wide enough that the windows after the first checkpoint take tens of seconds even on a quiet machine: far
# longer than it takes to see that checkpoint, requeue and kill the job (KillWait is 2 s).
REQUEUE_JOB = (
    *LONG_JOB[:3],
    "dataset.n_windows=300",
    "+model.arch.hidden_size=256",
    "+model.arch.intermediate_size=1024",
)
slurm = pytest.mark.slurm
T = TypeVar("T")


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    """The local cluster, up for the session; brought down at the end only if this fixture started it."""
    if subprocess.run([str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0:
        yield
        return
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        reason = f"local SLURM cluster did not start: {(up.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=300)


def sweep_args(root: Path, *overrides: str) -> list[str]:
    return [str(CLI), "-m", *SMALL_JOBS, f"paths.output_root={root}", "progress=false", *overrides]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def sweep(root: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    args = sweep_args(root, *overrides)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=root, env=ENV)


def start_sweep(root: Path, *overrides: str) -> subprocess.Popen[str]:
    args, pipe = sweep_args(root, *overrides), subprocess.PIPE
    return subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, cwd=root, env=ENV)


def wait_for(what: str, check: Callable[[], T], timeout: float = 240) -> T:
    """Poll `check()` until it returns something truthy; fail (never hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def status(job: Path) -> dict[str, str]:
    return json.loads((job / "status.json").read_text())


def submitted_job_id(sweep_dir: Path) -> str | None:
    """The SLURM job id of a one-job sweep, from submitit's folder (<sweep>/.submitit/<id>/)."""
    found = list(sweep_dir.glob(".submitit/*/*_submitted.pkl"))
    return found[0].parent.name if found else None


def slurm_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


@slurm
def test_three_job_sweep_finishes_ok(cluster: None, tmp_path: Path) -> None:
    out = sweep(
        tmp_path,
        "experiment=perplexity",
        "model=tiny-llama,tiny-qwen2,tiny-gpt2",
        "dataset.n_windows=2",
        "dataset.seq_len=32",
    )
    assert out.returncode == 0, out.stderr
    jobs = job_dirs(tmp_path / "perplexity" / "multirun")
    assert [j.name.rsplit("model=", 1)[1] for j in jobs] == ["tiny-gpt2", "tiny-llama", "tiny-qwen2"]
    for job in jobs:
        assert status(job)["status"] == "ok"
        assert json.loads((job / "perplexity.json").read_text())["evaluations"][0]["n_tokens"] == 2 * 31
        env = json.loads((job / "env.json").read_text())
        assert env["packages"]["submitit"] and env["packages"]["torch"]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if head.returncode == 0:
            assert env["git_sha"] == head.stdout.strip()
    logs = list((tmp_path / "perplexity" / "multirun" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 3 and all("Job completed successfully" in log.read_text() for log in logs)


def sacct(job_id: str) -> dict[str, tuple[str, str]]:
    """State and exit code of each array task of a SLURM job, as the accounting database has them."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
    )
    rows = [line.split("|") for line in out.stdout.strip().splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows}


@slurm
def test_failing_job_is_reported_with_its_traceback(cluster: None, tmp_path: Path) -> None:
    # key/value heads that do not divide the query heads: the config is accepted, the forward pass fails
    out = sweep(
        tmp_path, "experiment=perplexity", "model=tiny-llama", "+model.arch.num_key_value_heads=2,3",
        "dataset.n_windows=1", "dataset.seq_len=16",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    ok, failed = job_dirs(tmp_path / "perplexity" / "multirun")  # "=2" sorts before "=3"
    assert status(ok)["status"] == "ok"  # the other job ran to its end
    record = status(failed)
    assert record["status"] == "failed" and record["error"].startswith("RuntimeError: ")
    assert "Traceback (most recent call last)" in record["traceback"]
    assert record["traceback"].strip() in out.stderr  # the job's own traceback, written on the node
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: job failed: {failed} (")


@slurm
def test_sacct_sees_failed_jobs_with_their_exit_codes(cluster: None, tmp_path: Path) -> None:
    """A job that failed is FAILED in SLURM's accounting (dashboards and array dependencies see it): exit
    code 2 for bad input, 1 for a crash; the job that worked is COMPLETED 0:0."""
    out = sweep(
        tmp_path, "experiment=perplexity", "model=tiny-llama", "taps=[resid.post],[nope]",
        "+model.arch.num_key_value_heads=2,3", "dataset.n_windows=1", "dataset.seq_len=16",
    )  # fmt: skip
    assert out.returncode in (1, 2), out.stderr
    sweep_dir = tmp_path / "perplexity" / "multirun"
    job_id = str(submitted_job_id(sweep_dir)).split("_")[0]
    wanted = {"COMPLETED": "0:0", "crash": "1:0", "bad input": "2:0"}

    def finished() -> dict[str, tuple[str, str]]:
        states = sacct(job_id)
        return (
            states
            if len(states) == 4 and all(s not in ("PENDING", "RUNNING") for s, _ in states.values())
            else {}
        )

    states = wait_for("the accounting of all four jobs", finished)
    kinds = [
        "COMPLETED" if r["status"] == "ok" else "bad input" if r["bad_input"] else "crash"
        for r in map(status, job_dirs(sweep_dir))
    ]
    assert sorted(kinds) == ["COMPLETED", "bad input", "bad input", "crash"], kinds
    codes = sorted(code for _, code in states.values())
    assert codes == sorted([wanted["COMPLETED"], wanted["crash"], wanted["bad input"], wanted["bad input"]])
    assert sorted(state for state, _ in states.values()) == ["COMPLETED", "FAILED", "FAILED", "FAILED"]


@slurm
def test_cancelled_job_is_reported(cluster: None, tmp_path: Path) -> None:
    proc = start_sweep(tmp_path, *LONG_JOB)
    sweep_dir = tmp_path / "perplexity" / "multirun"
    try:
        job_id = wait_for("submission", lambda: submitted_job_id(sweep_dir))
        wait_for("the job to run", lambda: slurm_state(job_id) == "RUNNING")
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: job {job_id} did not finish (state: CANCELLED")


@slurm
def test_requeued_job_resumes_from_its_checkpoint(cluster: None, tmp_path: Path) -> None:
    reference = start_sweep(tmp_path, *REQUEUE_JOB, "paths.sweep=uninterrupted")
    proc = start_sweep(tmp_path, *REQUEUE_JOB)
    sweep_dir = tmp_path / "perplexity" / "multirun"
    try:
        ckpt = wait_for("a checkpointed window", lambda: list(sweep_dir.glob("*/checkpoints/*.json")))
        job_id = str(submitted_job_id(sweep_dir))
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # a requeued job is held for 120 s; once it is pending again, let it start now
        wait_for("the requeued job to be pending", lambda: slurm_state(job_id) == "PENDING", timeout=120)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
        _, stderr = proc.communicate(timeout=600)
        _, ref_stderr = reference.communicate(timeout=600)
    finally:
        proc.kill()
        reference.kill()
    assert proc.returncode == 0, stderr
    assert reference.returncode == 0, ref_stderr
    [job] = job_dirs(sweep_dir)
    assert status(job)["status"] == "ok" and not ckpt[0].exists()  # checkpoints go once the job is ok
    log = next(sweep_dir.glob(".submitit/*/*_log.out")).read_text()
    assert log.count("Starting with JobEnvironment") == 2  # it ran twice: before and after the requeue
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert len(resumed) == 1, log
    done = int(resumed[0].rsplit(": ", 1)[1].split("/")[0])
    assert 0 < done < 300, resumed[0]  # it skipped the saved windows and computed the rest
    [ref_job] = job_dirs(tmp_path / "perplexity" / "uninterrupted")
    assert ref_job.name == job.name
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics == json.loads((ref_job / "metrics.json").read_text())  # ppl bit-identical


@slurm
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("hydra.launcher.cpus_per_task=4096", "hydra.launcher.cpus_per_task"),
        ("hydra.launcher.mem_gb=1000000", "hydra.launcher.mem_gb"),
        ("hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_node"),
        ("hydra.launcher.partition=nope", "hydra.launcher.partition"),
    ],
)
def test_impossible_request_fails_at_once(cluster: None, tmp_path: Path, override: str, field: str) -> None:
    out = sweep(tmp_path, "experiment=perplexity", "model=tiny-llama", override, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), out.stderr
    assert not (tmp_path / "perplexity" / "multirun" / ".submitit").exists()  # nothing was submitted


@slurm
def test_cluster_refuses_what_no_node_holds(cluster: None) -> None:
    """EnforcePartLimits=ALL: sbatch itself refuses, instead of queueing a job that can never start."""
    out = subprocess.run(
        ["sbatch", "--cpus-per-task=4096", "--wrap", "true"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "error" in out.stderr


def test_unknown_launcher_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(CLI), "-m", "hydra/launcher=nope", f"paths.output_root={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hydra/launcher: unknown option 'nope' (allowed: ")
    assert "local" in lines[0] and "slurm" in lines[0]


def test_request_check_on_a_gpu_cluster_layout() -> None:
    """The request check against a cluster shaped like a typical GPU site (the local node has no GPU)."""
    from outlier_study.errors import ConfigError
    from outlier_study.sweep.slurm import Node, _gpus, check_request

    assert [_gpus(g) for g in ("(null)", "gpu:8", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2")] == [
        0,
        8,
        4,
        4,
    ]
    nodes = [Node("cpu", True, 64, 256_000, 0), Node("gpu", False, 32, 512_000, 8)]
    check_request({"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64}, nodes)
    check_request({"partition": None, "cpus_per_task": 64}, nodes)  # the default partition: cpu
    with pytest.raises(
        ConfigError, match=r"gpus_per_node: 1 GPUs .* 'cpu' has no GPUs \(partitions with enough: gpu\)"
    ):
        check_request({"partition": None, "gpus_per_node": 1}, nodes)
    with pytest.raises(
        ConfigError, match=r"mem_gb: 600 GB requested, but the largest node in partition 'gpu'"
    ):
        check_request({"partition": "gpu", "mem_gb": 600}, nodes)
    with pytest.raises(ConfigError, match=r"nodes: 2 nodes requested"):
        check_request({"partition": "gpu", "nodes": 2}, nodes)
