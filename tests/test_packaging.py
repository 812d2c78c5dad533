"""The package as a user installs it: a wheel in a fresh virtual environment outside the repository finds
its configs, and a folder of the user's own configs (a model, an experiment preset with its own sweep)
joins the package's through Hydra's search path without touching the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO

USER_MODEL = """\
# A user's own model: a tiny random Llama with two layers.
name: my-tiny
source: random
model_type: llama
tokenizer: bytes
arch: {num_hidden_layers: 2}
"""

USER_EXPERIMENT = """\
# @package _global_
# A user's preset: MAs at y6 replaced, perplexity swept over the replacement value.
defaults:
  - override /intervention: massive
experiment:
  name: perplexity
intervention:
  tap: y6
dataset:
  seq_len: 32
  n_windows: 2
hydra:
  sweeper:
    params:
      intervention.value: zero,mean
"""


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the tracked files, installed into a new venv whose dependencies come from this
    one (a .pth file), so nothing is downloaded; returns the venv's bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    src = root / "src"
    for name in files.splitlines():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root),
            str(src),
        ],
        root,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = root.glob("outlier_study-*.whl")
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root).returncode == 0
    python = venv / "bin" / "python"
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        root,
    )
    assert install.returncode == 0, install.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    (Path(site.stdout.strip()) / "deps_from_the_test_venv.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return venv / "bin"


def test_the_wheel_runs_a_profile_outside_the_repo(installed: Path, tmp_path: Path) -> None:
    where = _run(
        [str(installed / "python"), "-c", "import outlier_study; print(outlier_study.__file__)"], tmp_path
    )
    assert where.stdout.strip().startswith(str(installed.parent)), where  # the wheel's copy, not the repo's
    out = _run(
        [
            str(installed / "outlier-study"),
            "experiment=profile",
            "model=tiny-llama",
            "dataset.seq_len=32",
            "dataset.n_windows=2",
            f"paths.output_root={tmp_path / 'out'}",
            "progress=false",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    [status] = (tmp_path / "out" / "profile" / "tiny-llama").glob("*/status.json")
    assert json.loads(status.read_text())["status"] == "ok"


def test_a_users_config_folder_adds_a_model_and_a_sweep(installed: Path, tmp_path: Path) -> None:
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "my-tiny.yaml").write_text(USER_MODEL)
    (conf / "experiment" / "y6_sweep.yaml").write_text(USER_EXPERIMENT)
    out = _run(
        [
            str(installed / "outlier-study"),
            "-m",
            f"hydra.searchpath=[file://{conf}]",
            "model=my-tiny",
            "experiment=y6_sweep",
            f"paths.output_root={tmp_path / 'out'}",
            "progress=false",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    jobs = sorted((tmp_path / "out" / "perplexity" / "multirun").glob("*/metrics.json"))
    assert len(jobs) == 2
    for path in jobs:
        metrics = json.loads(path.read_text())
        assert metrics["intervention.tap"] == "mlp.hidden" and metrics["intervention.value"] in (
            "zero",
            "mean",
        )
        env = json.loads((path.parent / "env.json").read_text())
        assert env["model"]["name"] == "my-tiny" and env["model"]["n_layers"] == 2
