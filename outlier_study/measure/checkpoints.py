"""Window checkpoints: an interrupted perplexity evaluation (a preempted or requeued SLURM job) restarts
after the last window it saved, and gives the same bits as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outlier_study.output.files import write_json

CHECKPOINT_DIR = "checkpoints"


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
