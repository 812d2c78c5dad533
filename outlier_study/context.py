"""Everything an experiment needs, prepared once per job: model, windows, taps, layers, output dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from outlier_study.data import Windows
from outlier_study.models.loader import LoadedModel


@dataclass
class Context:
    cfg: DictConfig
    lm: LoadedModel
    windows: Windows
    taps: list[str]
    layers: list[int]
    job_dir: Path
    zeroshot_tasks: list[Any] | None = None  # lm-eval's tasks of eval.tasks, their data read (None: none)

    def experiment_layer(self) -> int:
        """`experiment.layer` as an index from 0 (negative counts from the end), checked against the model."""
        return self.lm.arch.layer(int(self.cfg.experiment.layer), "experiment.layer")

    @property
    def threshold(self) -> DictConfig:
        return self.cfg.threshold

    @property
    def tables_dir(self) -> Path:
        return self.job_dir / "tables"

    @property
    def figures_dir(self) -> Path:
        return self.job_dir / "figures"
