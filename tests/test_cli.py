"""The console script as a user runs it: one-line errors with exit code 2, a finished tiny job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "outlier_study.cli"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*CLI, *args, f"paths.output_root={tmp_path}", "progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_tiny_job_succeeds(tmp_path: Path) -> None:
    out = cli(tmp_path, "model=tiny-mistral", "dataset.seq_len=32", "dataset.n_windows=2")
    assert out.returncode == 0, out.stderr
    [job] = list((tmp_path / "profile" / "tiny-mistral").iterdir())
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    assert f"results: {job}" in out.stdout
    assert (job / ".hydra" / "overrides.yaml").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("model=nope",),
            "error: model: unknown option 'nope' (allowed: deepseek-v2-lite, gemma-2-9b, gemma3-270m,",
        ),
        (
            ("dataset=nope",),
            "error: dataset: unknown option 'nope' "
            "(allowed: c4, embedded, local_text, wikitext2, wikitext2_2048)",
        ),
        (
            ("dataset.seqlen=4",),
            "error: dataset.seqlen: unknown key 'seqlen' (allowed: name, path, split, seq_len,",
        ),
        (
            ("dtype=float8",),
            "error: dtype: Invalid value 'float8', expected one of [float32, bfloat16, float16]",
        ),
        (("model=tiny-gpt2", "taps=[y4,mlp.up]"), "error: taps: tap 'mlp.up' does not exist in gpt2 models"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    out = cli(tmp_path, *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr


def test_help_lists_groups(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert (
        "model: deepseek-v2-lite, gemma-2-9b, gemma3-270m, gguf" in out.stdout
        and "dataset: c4, embedded" in out.stdout
    )
