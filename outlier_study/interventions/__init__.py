"""Interventions chosen by the `intervention` config group: each is a context manager that leaves the model
exactly as it found it, also when the body raises, and yields a `Change` record."""

from __future__ import annotations

from contextlib import AbstractContextManager

from outlier_study.interventions import channels, massive, residual, weights
from outlier_study.interventions.record import Change
from outlier_study.interventions.treatment import NONE, Inputs, Treatment
from outlier_study.registry import Registry

INTERVENTIONS: Registry[Treatment] = Registry("intervention", "intervention.name")
INTERVENTIONS.add("none", NONE)
INTERVENTIONS.add("massive", massive.TREATMENT)
INTERVENTIONS.add("residual", residual.TREATMENT)
INTERVENTIONS.add("gamma", channels.GAMMA)
INTERVENTIONS.add("weight_channels", channels.WEIGHT_CHANNELS)
INTERVENTIONS.add("weights", weights.TREATMENT)


def intervene(inputs: Inputs) -> AbstractContextManager[Change]:
    """The configured intervention (inputs.options is the `intervention` node) for a `with` block."""
    return INTERVENTIONS.get(inputs.options.name).apply(inputs)


__all__ = ["INTERVENTIONS", "Change", "Inputs", "intervene"]
