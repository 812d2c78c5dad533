"""A job's bookkeeping files: status.json (running | ok | failed, with the error) and env.json (what is
needed to reproduce it: code version, packages, hardware, model provenance)."""

from __future__ import annotations

import json
import platform
import subprocess
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from outlier_study.errors import ConfigError
from outlier_study.output.files import write_json

PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "datasets", "wandb", "submitit", "gguf")


def error_line(error: BaseException) -> str:
    """How a failure is reported: bad input (a ConfigError) as its own one line, anything else typed."""
    return str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"


def write_status(
    job_dir: Path, state: str, error: BaseException | None = None, fields: Mapping[str, Any] | None = None
) -> None:
    """running | ok | failed (with the error line and its traceback), plus `fields` (e.g. the config hash)."""
    payload: dict[str, Any] = {"status": state, "time": datetime.now(UTC).isoformat(), **(fields or {})}
    if error is not None:
        payload["error"] = error_line(error)
        payload["bad_input"] = isinstance(error, ConfigError)
        payload["traceback"] = "".join(traceback.format_exception(error))
    write_json(job_dir / "status.json", payload)


def read_status(job_dir: Path) -> dict[str, Any]:
    """The job's status.json, or {} when it is missing or unreadable (a job killed mid-write)."""
    try:
        data = json.loads((job_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def git_sha() -> str | None:
    """Commit of the checkout the package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Code version, package versions, hardware and `extra` (the model's provenance)."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }
