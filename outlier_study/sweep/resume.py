"""Resume: a rerun sweep skips every job whose `status.json` says ok for the same config.

(The finer level, an interrupted perplexity evaluation restarting after its last saved window, is
`measure.checkpoints`.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from outlier_study.output.job import read_status

# Keys that never change a job's results: they do not count when deciding whether a job is already done.
NEUTRAL_KEYS: tuple[str, ...] = ("progress", "reuse_models", "logger", "paths", "extra")


def config_fingerprint(cfg: DictConfig) -> str:
    """Short hash of the job config without NEUTRAL_KEYS (interpolations unresolved, so it needs no env)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    for key in NEUTRAL_KEYS:
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_before(job_dir: Path, fingerprint: str) -> bool:
    """True when status.json says ok for this config (a result written before fingerprints counts too)."""
    status = read_status(job_dir)
    return status.get("status") == "ok" and status.get("config", fingerprint) == fingerprint
