"""Experiments by name; each takes a prepared Context, writes its results and returns flat metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outlier_study.experiments import (
    channel_figures,
    channel_tables,
    massive_figures,
    perplexity_tables,
    profile,
    quant,
    table1,
    table45,
)

Experiment = Callable[[Any], dict[str, Any]]

EXPERIMENTS: dict[str, Experiment] = {
    "profile": profile.run,
    "table1": table1.run,
    "table2": perplexity_tables.run_table2,
    "table45": table45.run,
    "fig4": massive_figures.run_fig4,
    "fig5": massive_figures.run_fig4,  # Fig. 5 is Fig. 4 for GPT-2; its own name keeps its results apart
    "fig6": massive_figures.run_fig6,
    "perplexity": perplexity_tables.run_perplexity,
    "quant": quant.run,
    "co": channel_figures.run_co,
    "fig7": channel_figures.run_fig7,
    "fig8": channel_figures.run_fig8,
    "fig9": channel_figures.run_fig9,
    "table3": channel_tables.run_table3,
    "table6": channel_tables.run_table6,
}
