"""Resume: what lets a rerun skip finished work instead of redoing it.

Two levels: a job whose `status.json` says ok (for the same config) is not run again, and a perplexity
evaluation that was interrupted (a preempted or requeued SLURM job) restarts after the last window it
saved in its checkpoint file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from outlier_study.output.files import write_json

# Keys that never change a job's results: they do not count when deciding whether a job is already done.
NEUTRAL_KEYS: tuple[str, ...] = ("progress", "reuse_models", "logger", "paths")
CHECKPOINT_DIR = "checkpoints"


def config_fingerprint(cfg: DictConfig) -> str:
    """Short hash of the job config without NEUTRAL_KEYS (interpolations unresolved, so it needs no env)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    for key in NEUTRAL_KEYS:
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_status(job_dir: Path) -> dict[str, Any]:
    """The job's status.json, or {} when it is missing or unreadable (a job killed mid-write)."""
    try:
        data = json.loads((job_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finished_before(job_dir: Path, fingerprint: str) -> bool:
    """True when status.json says ok for this config (a result written before fingerprints counts too)."""
    status = read_status(job_dir)
    return status.get("status") == "ok" and status.get("config", fingerprint) == fingerprint


def checkpoint_path(job_dir: Path, name: str) -> Path:
    """Where one evaluation of a job keeps its progress: <job_dir>/checkpoints/<name>.json."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return job_dir / CHECKPOINT_DIR / f"{slug}.json"


def remove_checkpoints(job_dir: Path) -> None:
    """A finished job is skipped on rerun, so its checkpoints are of no further use."""
    shutil.rmtree(job_dir / CHECKPOINT_DIR, ignore_errors=True)


@dataclass(frozen=True)
class WindowCheckpoint:
    """Per-window results of one evaluation, rewritten atomically as windows finish.

    `key` names what was evaluated (config, data, batching); a file written under another key is stale
    and ignored, so a changed config never mixes old windows into a new result."""

    path: Path
    key: str

    def load(self) -> tuple[dict[int, float], list[list[Any]]]:
        """(window index -> value, saved counters as [key, value] pairs); empty when absent or stale."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}, []
        if not isinstance(data, dict) or data.get("key") != self.key:
            return {}, []
        windows = {int(i): float(v) for i, v in data.get("windows", {}).items()}
        return windows, list(data.get("counters", []))

    def save(self, windows: dict[int, float], counters: dict[Any, int] | None = None) -> None:
        """Write every finished window (exact float64 values: JSON keeps repr, NaN and Infinity)."""
        payload = {
            "key": self.key,
            "windows": {str(i): v for i, v in sorted(windows.items())},
            "counters": [[k, v] for k, v in (counters or {}).items()],
        }
        write_json(self.path, payload)
