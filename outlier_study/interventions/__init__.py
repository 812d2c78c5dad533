"""Interventions chosen by the `intervention` config group: each is a context manager that leaves the model
exactly as it found it, also when the body raises, and yields a `Change` record."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from outlier_study.config.options import name_only
from outlier_study.interventions import channels, massive, residual
from outlier_study.interventions.record import Change, Unchanged
from outlier_study.interventions.treatment import Inputs, Treatment
from outlier_study.registry import Registry


@contextmanager
def _none(inputs: Inputs) -> Iterator[Change]:
    yield Unchanged()


INTERVENTIONS: Registry[Treatment] = Registry("intervention", "intervention.name")
INTERVENTIONS.add(
    "none", Treatment(_none, name_only("none", "measure the unmodified model"), "the unmodified model")
)
INTERVENTIONS.add("massive", massive.TREATMENT)
INTERVENTIONS.add("residual", residual.TREATMENT)
INTERVENTIONS.add("gamma", channels.GAMMA)
INTERVENTIONS.add("weight_channels", channels.WEIGHT_CHANNELS)


def intervene(inputs: Inputs) -> contextmanager:  # type: ignore[valid-type]
    """The configured intervention (inputs.options is the `intervention` node) for a `with` block."""
    return INTERVENTIONS.get(inputs.options.name).apply(inputs)


__all__ = ["INTERVENTIONS", "Change", "Inputs", "intervene"]
