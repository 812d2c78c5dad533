"""Build the paper-layout tables across a sweep's jobs: pivots, per-job tables, metrics, statuses.

Failed jobs stay visible."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from outlier_study.output.tables import Table, format_value, rectangular
from outlier_study.sweep.jobs import STATES, Job, read_sweep, read_table, varying

RESERVED = ("metrics", "jobs")


@dataclass(frozen=True)
class Pivot:
    """A paper table built from metrics.json: each job is one cell, placed by two of its parameters."""

    experiment: str
    name: str
    rows: str  # parameter whose values are the rows (an override key: a group or a dotted field)
    columns: str  # parameter whose values are the columns
    value: str  # metrics.json key shown in the cells
    digits: int = 3
    column_labels: Mapping[str, str] = field(default_factory=dict)  # value -> header; order = column order
    row_order: tuple[str, ...] = ()  # values listed first, in this order; others follow as found
    caption: str = ""
    eval_name: str = ""  # also a table per lm-eval score (eval.<task>.<metric>): <eval_name>_<task>_<metric>


# One entry per experiment whose paper table is a pivot of per-job metrics; the other parameters that vary
# across that experiment's jobs (dataset, model, ...) split it into one table each.
PIVOTS: tuple[Pivot, ...] = (
    Pivot(
        experiment="quant",
        name="quant_ppl",
        rows="method",
        columns="quant",
        value="ppl",
        column_labels={"none": "W16A16", "w8a8": "W8A8", "w4a16": "W4A16", "w4a8": "W4A8", "w4a4": "W4A4"},
        row_order=("none", "massive_y6", "gamma_smooth", "smoothquant", "rotation", "superweight_keep"),
        caption="token-level perplexity: method (rows) × weight/activation bits (columns)",
        eval_name="quant_eval",
    ),
    Pivot(
        experiment="perplexity",
        name="intervention_ppl",
        rows="dataset",
        columns="intervention",
        value="ppl",
        column_labels={"none": "original"},
        caption="token-level perplexity: dataset (rows) × intervention (columns)",
        eval_name="intervention_eval",
    ),
)


def _not_ok_note(jobs: list[Job]) -> tuple[str, ...]:
    bad = [j for j in jobs if not j.ok]
    if not bad:
        return ()
    return (f"{len(bad)} job(s) not ok are not included here: see the 'jobs' table.",)


def cross_job_tables(jobs: list[Job]) -> list[Table]:
    """Each per-job table name once: rows of every ok job, led by the parameters that differ among them."""
    ok = [j for j in jobs if j.ok]
    names = sorted({name for j in ok for name in j.table_files()})
    tables = []
    for name in names:
        members = [(j, read_table(j.table_files()[name])) for j in ok if name in j.table_files()]
        lead = varying([j for j, _ in members])
        columns: list[str] = []
        for _, (header, _) in members:
            columns += [c for c in header if c not in columns]
        rows = []
        for job, (header, body) in members:
            index = {c: header.index(c) for c in header}
            for row in body:
                cells = (
                    row
                    if header == columns
                    else [row[index[c]] if c in index and index[c] < len(row) else "" for c in columns]
                )
                rows.append([job.param(k) for k in lead] + list(cells))
        header = [f"{k} (job)" if k in columns else k for k in lead] + columns
        out_name = f"{name}_job" if name in RESERVED else name
        caption = f"{name}: {len(members)} job(s)" + (f", by {', '.join(lead)}" if lead else "")
        tables.append(Table(out_name, tuple(header), rectangular(header, rows), caption, _not_ok_note(jobs)))
    return tables


def metrics_table(jobs: list[Job]) -> Table:
    """One row per job (every status): the parameters that differ, then every scalar in metrics.json."""
    lead = varying(jobs)
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in (job.metrics or {}) if k not in keys]
    header = [*lead, "status", *keys]
    rows = []
    for job in jobs:
        metrics = job.metrics or {}
        cells = [_metric_text(metrics[k]) if k in metrics else "" for k in keys]
        rows.append([*(job.param(k) for k in lead), job.status, *cells])
    return Table("metrics", tuple(header), rectangular(header, rows), f"metrics.json of {len(jobs)} job(s)")


def _metric_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return format_value(value)


def jobs_table(jobs: list[Job]) -> Table:
    """Every job with its status and error line: nothing is dropped silently."""
    lead = varying(jobs)
    header = ["job", "status", *lead, "error"]
    rows = [
        [j.name, j.status, *(j.param(k) for k in lead), j.error.splitlines()[0] if j.error else ""]
        for j in jobs
    ]
    return Table("jobs", tuple(header), rectangular(header, rows), f"{len(jobs)} job(s)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _ordered(values: Iterable[str], first: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def is_pivot(name: str) -> bool:
    """Whether a collected table is one of the paper-layout pivots (shown first, printed by the CLI)."""
    prefixes = [p.name for p in PIVOTS] + [p.eval_name for p in PIVOTS if p.eval_name]
    return name.startswith(tuple(prefixes))


def _eval_scores(jobs: list[Job]) -> list[tuple[str, str, str]]:
    """(key, task, metric) of every lm-eval score in the jobs' metrics.json, in order found: keys
    `eval.<task>.<metric>` with a number, less stderrs and sample counts (`eval.<key>` alone is protocol)."""
    found: dict[str, tuple[str, str, str]] = {}
    for job in jobs:
        for key, value in (job.metrics or {}).items():
            parts = key.split(".")
            if parts[0] != "eval" or len(parts) < 3 or key in found:
                continue
            metric = parts[-1]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not metric.endswith("_stderr") and metric != "n_samples":
                found[key] = (key, ".".join(parts[1:-1]), metric)
    return list(found.values())


def _with_eval(pivots: Iterable[Pivot], jobs: list[Job]) -> list[Pivot]:
    """Each pivot, then one of the same layout per lm-eval score its experiment's jobs report."""
    out = []
    for pivot in pivots:
        out.append(pivot)
        if pivot.eval_name:
            members = [j for j in jobs if j.param("experiment") == pivot.experiment]
            for key, task, metric in _eval_scores(members):
                caption = pivot.caption.split(":", 1)[-1].strip()
                out.append(
                    replace(
                        pivot,
                        name=f"{pivot.eval_name}_{_slug(task)}_{_slug(metric)}",
                        value=key,
                        digits=4,
                        caption=f"lm-eval {task} {metric}: {caption}",
                        eval_name="",
                    )
                )
    return out


def pivot_tables(jobs: list[Job], pivots: Iterable[Pivot] = PIVOTS) -> list[Table]:
    """Declared pivots: one table per combination of the other parameters that vary (e.g. dataset). The
    row option's own keys (`method.alpha` for rows = method) label its rows instead of splitting the table.
    A pivot with an `eval_name` gets a twin per lm-eval score (eval.tasks) of its jobs."""
    tables = []
    for pivot in _with_eval(pivots, jobs):
        members = [j for j in jobs if j.param("experiment") == pivot.experiment]
        if not members:
            continue
        keys = [k for k in varying(members) if k not in (pivot.rows, pivot.columns)]
        own = [k for k in keys if k.startswith(f"{pivot.rows}.")]
        split = [k for k in keys if k not in own]
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in members:
            groups.setdefault(tuple(job.param(k) for k in split), []).append(job)
        for values, group in groups.items():
            tables.append(_pivot_table(pivot, split, values, group, own))
    return tables


def _row_label(job: Job, rows: str, own: list[str]) -> str:
    """The row option's value and those of its own keys the job has: 'smoothquant (alpha=0.8)'."""
    keys = [f"{k[len(rows) + 1 :]}={job.param(k)}" for k in own if job.param(k)]
    return job.param(rows) + (f" ({', '.join(keys)})" if keys else "")


def _pivot_table(
    pivot: Pivot, split: list[str], values: tuple[str, ...], jobs: list[Job], own: list[str]
) -> Table:
    label = {job.path: _row_label(job, pivot.rows, own) for job in jobs}
    option = {label[j.path]: j.param(pivot.rows) for j in jobs}
    rank = {v: i for i, v in enumerate(pivot.row_order)}
    rows = sorted(dict.fromkeys(option), key=lambda r: rank.get(option[r], len(rank)))  # stable: found order
    cols = _ordered((j.param(pivot.columns) for j in jobs), pivot.column_labels)
    cells: dict[tuple[str, str], list[str]] = {}
    for job in jobs:
        if job.ok:
            value = (job.metrics or {}).get(pivot.value)
            text = format_value(value, pivot.digits) if value is not None else "n/a"
        else:
            text = job.status
        cells.setdefault((label[job.path], job.param(pivot.columns)), []).append(text)
    header = [pivot.rows, *(pivot.column_labels.get(c, c) for c in cols)]
    body = [[r, *(" / ".join(cells.get((r, c), [])) for c in cols)] for r in rows]
    where = ", ".join(f"{k}={v}" for k, v in zip(split, values, strict=True))
    name = pivot.name + "".join(f"__{_slug(k)}-{_slug(v)}" for k, v in zip(split, values, strict=True))
    notes = [
        f"cells: metrics.json '{pivot.value}' of each job ({pivot.digits} decimals); "
        "'failed' / 'running' / 'incomplete' mark jobs without a result"
    ]
    if any(len(v) > 1 for v in cells.values()):
        notes.append("a cell with ' / ' holds several jobs that share these parameters")
    caption = pivot.caption + (f" ({where})" if where else "")
    return Table(name, tuple(header), rectangular(header, body), caption, tuple(notes))


@dataclass
class Collection:
    """A sweep read back: its jobs and every table built from them (paper pivots first)."""

    sweep_dir: Path
    jobs: list[Job]
    tables: list[Table]
    parameters: list[str]
    sweep_overrides: list[str] | None  # the multirun's task overrides (multirun.yaml), when present

    def counts(self) -> dict[str, int]:
        return {s: sum(j.status == s for j in self.jobs) for s in STATES}

    @property
    def all_ok(self) -> bool:
        return all(j.ok for j in self.jobs)


def collect(sweep_dir: Path, skip: Path | None = None) -> Collection:
    """Read every job under sweep_dir (a sweep, or one job folder) and build the tables; writes nothing."""
    sweep_dir = Path(sweep_dir)
    jobs, sweep = read_sweep(sweep_dir, skip)
    tables = [*pivot_tables(jobs), *cross_job_tables(jobs)] if jobs else []
    if jobs:
        tables += [metrics_table(jobs), jobs_table(jobs)]
    return Collection(
        sweep_dir=sweep_dir,
        jobs=jobs,
        tables=tables,
        parameters=varying(jobs) if jobs else [],
        sweep_overrides=sweep,
    )
