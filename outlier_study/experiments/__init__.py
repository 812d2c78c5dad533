"""Experiments by name: each module registers its run function, its options schema
and the paper item it reproduces; `run(ctx)` writes its results and returns flat metrics."""

from __future__ import annotations

from outlier_study.experiments import (  # noqa: F401  (importing a module registers its experiments)
    channel_outliers,
    fig9,
    perplexity,
    profile,
    quant,
    residual,
    superweight,
    table1,
    table2,
    table3,
    table6,
    table45,
)
from outlier_study.experiments.base import EXPERIMENTS, Experiment

__all__ = ["EXPERIMENTS", "Experiment"]
