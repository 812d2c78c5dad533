"""Resume without SLURM: a finished job is skipped, a killed local sweep completes on rerun with the results
of an uninterrupted one, and an interrupted perplexity evaluation continues bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.hooks import RemovableHandle

from outlier_study.app import run
from outlier_study.measure.checkpoints import WindowCheckpoint
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.models.loader import LoadedModel
from outlier_study.output.job import write_status
from tests.helpers import load_named, make_cfg

CLI = Path(sys.executable).parent / "outlier-study"
TINY_JOB = ("experiment=perplexity", "model=tiny-llama", "dataset.seq_len=32", "dataset.n_windows=2")


def snapshot(job: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a job folder with its mtime and content, to prove a skipped job was not touched."""
    return {
        str(p.relative_to(job)): (p.stat().st_mtime_ns, p.read_bytes()) for p in job.rglob("*") if p.is_file()
    }


def test_finished_job_is_skipped_and_others_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_cfg(*TINY_JOB, "progress=false")
    job = run(cfg, job_dir=tmp_path / "job")
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    assert not (job / "checkpoints").exists()  # a finished job keeps no checkpoints
    before = snapshot(job)
    capsys.readouterr()

    assert run(cfg, job_dir=job) == job
    assert capsys.readouterr().out.strip() == f"skipped, already ok: {job}"
    assert snapshot(job) == before

    # progress and paths never change results: still the same job
    assert run(make_cfg(*TINY_JOB, "progress=true", f"paths.output_root={tmp_path}"), job_dir=job) == job
    assert snapshot(job) == before

    for state in ("failed", "running"):
        write_status(job, state, fields={"config": json.loads((job / "status.json").read_text())["config"]})
        run(cfg, job_dir=job)
        assert "results:" in capsys.readouterr().out
        assert json.loads((job / "status.json").read_text())["status"] == "ok"

    (job / "status.json").unlink()  # missing
    run(cfg, job_dir=job)
    assert json.loads((job / "status.json").read_text())["status"] == "ok"

    changed = make_cfg(*TINY_JOB, "progress=false", "dataset.n_windows=3")
    run(changed, job_dir=job)
    assert "rerunning, the config changed" in capsys.readouterr().out
    assert json.loads((job / "perplexity.json").read_text())["evaluations"][0]["n_tokens"] == 3 * 31


def sweep_command(root: Path, name: str) -> list[str]:
    """A local (basic launcher) sweep of three tiny jobs, each long enough to be killed half way."""
    return [
        str(CLI),
        "-m",
        "experiment=perplexity",
        "model=tiny-llama,tiny-qwen2,tiny-gpt2",
        "dataset.seq_len=128",
        "dataset.n_windows=24",
        f"paths.output_root={root}",
        f"paths.sweep={name}",
        "progress=false",
    ]


def job_states(sweep: Path) -> dict[str, str]:
    states = {}
    for status in sweep.glob("*/status.json"):
        try:
            states[status.parent.name] = json.loads(status.read_text())["status"]
        except (OSError, ValueError):
            states[status.parent.name] = "unreadable"
    return states


def test_killed_local_sweep_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # two sweeps share the cores
    reference = subprocess.Popen(
        sweep_command(tmp_path, "reference"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    sweep = tmp_path / "perplexity" / "killed"
    killed = subprocess.Popen(
        sweep_command(tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while "ok" not in job_states(sweep).values():
        assert killed.poll() is None, "the sweep ended before its first job finished"
        assert time.monotonic() < deadline, "no job finished in time"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    at_kill = job_states(sweep)
    assert list(at_kill.values()).count("ok") < 3, f"every job had finished before the kill: {at_kill}"
    first = next(name for name, state in at_kill.items() if state == "ok")
    first_status = (sweep / first / "status.json").read_bytes()

    rerun = subprocess.run(
        sweep_command(tmp_path, "killed"), env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped, already ok: {sweep / first}" in rerun.stdout
    assert (sweep / first / "status.json").read_bytes() == first_status  # not rerun
    assert rerun.stdout.count("results: ") == 3 - list(at_kill.values()).count("ok")
    assert job_states(sweep) == dict.fromkeys(job_states(sweep), "ok") and len(job_states(sweep)) == 3

    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()
    ref = tmp_path / "perplexity" / "reference"
    assert sorted(p.name for p in ref.iterdir() if p.is_dir() and p.name[0] != ".") == sorted(
        job_states(sweep)
    )
    for job in job_states(sweep):
        assert json.loads((sweep / job / "metrics.json").read_text()) == json.loads(
            (ref / job / "metrics.json").read_text()
        )
        assert not (sweep / job / "checkpoints").exists()


class Interrupt(RuntimeError):
    pass


def count_forwards(
    lm: LoadedModel, counters: dict[int, int], stop_after: int | None = None
) -> RemovableHandle:
    """A forward hook counting forward passes (state a checkpoint must carry); it can raise, like a kill."""

    def hook(*_: object) -> None:
        counters[0] = counters.get(0, 0) + 1
        if stop_after is not None and counters[0] > stop_after:
            raise Interrupt

    return lm.model.register_forward_hook(hook)


def evaluate_counting(
    lm: LoadedModel, ids: torch.Tensor, batch_size: int, **kwargs: Any
) -> tuple[float, int]:
    """(NLL sum, forward passes) of one evaluation."""
    calls: dict[int, int] = {}
    handle = count_forwards(lm, calls)
    try:
        result = evaluate_perplexity(lm, ids, batch_size=batch_size, progress=False, **kwargs)
    finally:
        handle.remove()
    return result.nll_sum, calls.get(0, 0)


@pytest.fixture(scope="module")
def llama(model_cache: Path) -> LoadedModel:
    """One tiny model: checkpointing sits above the model, so one architecture covers it."""
    return load_named("tiny-llama", model_cache)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_checkpoint_resumes_bit_identically(
    tmp_path: Path, llama: LoadedModel, batch_size: int
) -> None:
    tiny = llama
    ids = torch.randint(0, 256, (7, 24), generator=torch.Generator().manual_seed(1))
    plain_nll, n_batches = evaluate_counting(tiny, ids, batch_size)
    assert n_batches == -(-7 // batch_size)

    checkpoint = WindowCheckpoint(tmp_path / "ckpt.json", key="test")
    counts: dict[int, int] = {}  # what the model's hooks add to during the evaluation
    handle = count_forwards(tiny, counts, stop_after=2)
    try:
        with pytest.raises(Interrupt):
            evaluate_perplexity(tiny, ids, batch_size, False, checkpoint=checkpoint, counters=counts)
    finally:
        handle.remove()
    saved = json.loads(checkpoint.path.read_text())
    assert len(saved["windows"]) == 2 * batch_size  # the two batches that finished, not the interrupted one

    counts = {}  # a restarted process starts from nothing; the checkpoint restores the counts
    handle = count_forwards(tiny, counts)
    try:
        resumed_nll, forwards = evaluate_counting(
            tiny, ids, batch_size, checkpoint=checkpoint, counters=counts
        )
    finally:
        handle.remove()
    assert forwards == n_batches - 2  # only the batches not yet saved ran again
    assert resumed_nll == plain_nll  # bit-identical, not approximately equal
    assert counts[0] == n_batches  # restored 2 + the rest: what an uninterrupted run counts


def test_stale_checkpoint_is_ignored(tmp_path: Path, llama: LoadedModel) -> None:
    tiny = llama
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    path = tmp_path / "ckpt.json"
    first, _ = evaluate_counting(tiny, ids, 1, checkpoint=WindowCheckpoint(path, "a"))
    other = ids.flip(0)
    # other windows under the same key, or the same windows under another key: everything is recomputed
    assert evaluate_counting(tiny, other, 1, checkpoint=WindowCheckpoint(path, "a"))[1] == 3
    assert evaluate_counting(tiny, ids, 1, checkpoint=WindowCheckpoint(path, "b")) == (first, 3)
    assert evaluate_counting(tiny, ids, 1, checkpoint=WindowCheckpoint(path, "b")) == (first, 0)
