"""The experiment registry: each paper item (and each study beyond the paper) is one module that
registers its run function with its options schema, the paper item it reproduces and an optional check
of its options against the model's architecture (run before anything is loaded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outlier_study.context import Context
from outlier_study.interventions.treatment import Check
from outlier_study.registry import Registry

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    run: Callable[[Context], Metrics]
    options: type  # dataclass schema of the experiment.* keys
    paper: str  # the paper item it reproduces ("" for studies beyond the paper)
    description: str
    check: Check | None = None
    uses: tuple[str, ...] = ()  # the option groups it reads besides its own: intervention, quant, method
    # runs with execution=layerwise: it runs windows through the model (hooks included) and edits weights
    # only one layer at a time (interventions/parameters.py), never needing every layer's weights at once
    layerwise: bool = False


EXPERIMENTS: Registry[Experiment] = Registry("experiment", "experiment.name")


def experiment(
    name: str,
    options: type,
    paper: str,
    description: str,
    check: Check | None = None,
    uses: tuple[str, ...] = (),
    layerwise: bool = False,
) -> Callable[[Callable[[Context], Metrics]], Callable[[Context], Metrics]]:
    """Register `run(ctx) -> metrics` under `name`."""
    return EXPERIMENTS.register(
        name, lambda run: Experiment(run, options, paper, description, check, uses, layerwise)
    )  # type: ignore[return-value]
