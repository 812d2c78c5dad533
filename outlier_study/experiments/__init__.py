"""Experiments by name; each takes a prepared Context, writes its results and returns flat metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outlier_study.experiments import massive_figures, perplexity_tables, profile, table1, table45

Experiment = Callable[[Any], dict[str, Any]]

EXPERIMENTS: dict[str, Experiment] = {
    "profile": profile.run,
    "table1": table1.run,
    "table2": perplexity_tables.run_table2,
    "table45": table45.run,
    "fig4": massive_figures.run_fig4,
    "fig6": massive_figures.run_fig6,
    "perplexity": perplexity_tables.run_perplexity,
}
