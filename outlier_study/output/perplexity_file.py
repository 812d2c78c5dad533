"""perplexity.json: one versioned schema for every experiment that evaluates perplexity.

    {"schema": "outlier-study/perplexity", "version": 1, "experiment": "table2",
     "protocol": {dataset, split, seq_len, n_windows, sampling, seed, bos, dtype, model, metric, ...},
     "evaluations": [{"label": "original", "ppl": 33.79, "mean_nll": 3.52, "n_tokens": 5110,
                      "changed": 0, "setting": {...}}, ...],
     "extra": {...what the experiment adds: seeds, selections, calibration starts...}}

`changed` is how many elements or channels the evaluation's intervention changed (null: none applied);
`setting` names what was applied (e.g. the tap and value, or the method and bit widths).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from outlier_study.output.files import write_json

SCHEMA, VERSION = "outlier-study/perplexity", 1


def evaluation(
    label: str, ppl: float, mean_nll: float, n_tokens: int, changed: int | None = None, **setting: Any
) -> dict[str, Any]:
    """One row of `evaluations`."""
    return {
        "label": label,
        "ppl": ppl,
        "mean_nll": mean_nll,
        "n_tokens": n_tokens,
        "changed": changed,
        "setting": setting,
    }


def write_perplexity(
    job_dir: Path,
    experiment: str,
    protocol: Mapping[str, Any],
    evaluations: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> None:
    write_json(
        job_dir / "perplexity.json",
        {
            "schema": SCHEMA,
            "version": VERSION,
            "experiment": experiment,
            "protocol": dict(protocol),
            "evaluations": list(evaluations),
            "extra": dict(extra or {}),
        },
    )
