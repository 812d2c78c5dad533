"""Experiments by name; each takes a prepared Context and writes its results into the job directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outlier_study.experiments import profile

Experiment = Callable[[Any], dict[str, Any]]

EXPERIMENTS: dict[str, Experiment] = {"profile": profile.run}
