"""One self-contained HTML page for a collected sweep, laid out like the paper.

A header with the model, data and protocol; failures first; the paper's findings next to what the run
measured; then one section per paper item in the paper's order (its figures, then its table in the
paper's layout, the raw tables folded away), studies beyond the paper after them, and provenance. Figures
are data URIs: the page opens from a cluster's scratch disk or an e-mail attachment with no network.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from outlier_study.output.tables import Table, rectangular, to_html
from outlier_study.sweep.claims import findings
from outlier_study.sweep.collect import Collection, is_pivot
from outlier_study.sweep.jobs import Job, read_table

# The paper's items in the order the paper presents them: massive activations, then channel-wise outliers.
PAPER_ORDER = (
    "table1",
    "fig4",
    "fig5",
    "fig6",
    "table2",
    "table45",
    "fig7",
    "fig8",
    "fig9",
    "table3",
    "table6",
)
# The table that is an item's own (shown open; the job's other tables are folded), when not its name.
MAIN_TABLE = {
    "fig4": "fig4_tops",
    "fig5": "fig4_tops",
    "profile": "ma_tracks",
    "co": "channel_outliers_counts",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.2em}
.note{font-size:.85em;color:#555;margin-top:-.6em}
.status-ok,.agrees{color:#176317}.status-failed,.status-incomplete,.differs{color:#b00020;font-weight:bold}
.status-running{color:#9a6700;font-weight:bold}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}details{margin:.5em 0}summary{cursor:pointer}
nav ul{columns:2}code{font-size:.95em}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _status(state: str) -> str:
    return f'<span class="status-{_e(state)}">{_e(state)}</span>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _kv_table(pairs: list[tuple[str, str]], header: tuple[str, str] = ("key", "value")) -> str:
    return to_html(Table("kv", header, rectangular(header, [list(p) for p in pairs])))


def _label(job: Job, parameters: list[str]) -> str:
    """A job named by what distinguishes it in this sweep (its folder name says everything, at length)."""
    return ", ".join(f"{k}={job.param(k)}" for k in parameters) or job.name


def experiment_of(job: Job) -> str:
    """The experiment a job ran: from env.json, else its composed config."""
    recorded = ((job.env or {}).get("experiment") or {}).get("name")
    return str(recorded or job.param("experiment") or "unknown")


def _item_title(experiment: str, jobs: list[Job]) -> str:
    recorded = next(((j.env or {}).get("experiment") for j in jobs if (j.env or {}).get("experiment")), None)
    if not recorded:
        return experiment
    paper = recorded.get("paper") or "beyond the paper"
    return f"{paper} — {recorded.get('description', '')} (experiment={experiment})"


def _spread(values: list[Any]) -> str:
    """'v (n jobs)' for each distinct value, so a sweep run from two commits shows both."""
    counts = Counter("—" if v is None else str(v) for v in values)
    return "; ".join(f"{v} ({n} job{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def _setup(collection: Collection) -> str:
    """Model, data and protocol of the jobs: what every number on the page depends on."""
    keys = (
        ("model", ("model", "name")),
        ("dataset", ("dataset", "name")),
        ("tokens per window", ("dataset", "seq_len")),
        ("windows", ("dataset", "n_windows")),
        ("sampling", ("dataset", "sampling")),
        ("BOS", ("dataset", "bos")),
        ("dtype", ("dtype",)),
        ("MA rule |a| >", ("threshold", "ma_abs")),
        ("MA rule × median", ("threshold", "ma_ratio")),
        ("CO rule m", ("threshold", "m")),
        ("CO rule β", ("threshold", "beta")),
    )

    def get(job: Job, path: tuple[str, ...]) -> Any:
        node: Any = job.config
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    rows = [(label, _spread([get(j, path) for j in collection.jobs])) for label, path in keys]
    return _kv_table(rows, ("", "value (jobs)"))


def _failures(collection: Collection) -> str:
    bad = [(i, j) for i, j in enumerate(collection.jobs) if not j.ok]
    if not bad:
        return "<p>Every job finished ok.</p>"
    parts = []
    for i, job in bad:
        label = _label(job, collection.parameters)
        parts.append(f'<h3><a href="#job-{i}">{_e(label)}</a>: {_status(job.status)}</h3>')
        parts.append(f"<p>folder <code>{_e(job.name)}</code></p><p><code>{_e(job.error)}</code></p>")
        if job.traceback:
            parts.append(f"<details><summary>traceback</summary><pre>{_e(job.traceback)}</pre></details>")
    return "\n".join(parts)


def _claims(collection: Collection) -> str:
    by_experiment: dict[str, list[tuple[str, Job]]] = {}
    for job in collection.jobs:
        by_experiment.setdefault(experiment_of(job), []).append((_label(job, collection.parameters), job))
    rows = [
        (
            f.claim.item,
            f.claim.text,
            f.job or "—",
            f.measured,
            f'<span class="{f.verdict}">{_e(f.verdict)}</span>',
        )
        for f in findings(by_experiment)
    ]
    head = "".join(
        f"<th>{h}</th>" for h in ("item", "the paper finds", "job", "this run measured", "verdict")
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row[:4]) + f"<td>{row[4]}</td></tr>" for row in rows
    )
    note = (
        "<p class='note'>Each verdict is computed from the job's own result files "
        "(<code>metrics.json</code>, <code>ma_events.csv</code>, <code>tables/</code>).</p>"
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _table_html(path: Path) -> str:
    header, rows = read_table(path)
    return f"<h4>tables/{_e(path.name)}</h4>" + to_html(
        Table(path.stem, tuple(header), rectangular(header, rows))
    )


def _job_section(index: int, job: Job, parameters: list[str], main: str) -> str:
    """A job's figures first, then its own table, everything else folded."""
    parts = [f'<section id="job-{index}"><h3>{_e(_label(job, parameters))} — {_status(job.status)}</h3>']
    if job.error:
        parts.append(f"<p><code>{_e(job.error)}</code></p>")
    for fig in job.figures():
        rel = fig.relative_to(job.path).as_posix()
        parts.append(f"<figure>{_img(fig, f'{job.name}: {rel}')}<figcaption>{_e(rel)}</figcaption></figure>")
    tables = job.table_files()
    if main in tables:
        parts.append(_table_html(tables[main]))
    folded = [f"<p>folder <code>{_e(job.name)}</code></p>"]
    params = [(k, job.param(k)) for k in parameters]
    if params:
        folded.append(_kv_table(params, ("parameter", "value")))
    if job.overrides is not None:
        overrides = " ".join(f"{k}={v}" for k, v in job.overrides.items())
        folded.append(f"<p>overrides: <code>{_e(overrides)}</code></p>")
    folded += [_table_html(path) for name, path in tables.items() if name != main]
    for name, path in job.markdown_only_tables().items():
        folded.append(f"<h4>tables/{_e(name)}.md</h4><pre>{_e(path.read_text(encoding='utf-8'))}</pre>")
    if job.metrics:
        pairs = [(k, json.dumps(v) if isinstance(v, dict | list) else str(v)) for k, v in job.metrics.items()]
        folded.append("<h4>metrics.json</h4>" + _kv_table(pairs, ("metric", "value")))
    if job.traceback:
        folded.append(f"<h4>traceback</h4><pre>{_e(job.traceback)}</pre>")
    config = job.path / ".hydra" / "config.yaml"
    if config.is_file():
        folded.append(f"<h4>composed config</h4><pre>{_e(config.read_text(encoding='utf-8'))}</pre>")
    parts.append(
        "<details><summary>raw tables, metrics and config</summary>" + "\n".join(folded) + "</details>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def _provenance(collection: Collection) -> str:
    envs = [j.env for j in collection.jobs if j.env is not None]
    missing = [j.name for j in collection.jobs if j.env is None]
    parts = []
    if collection.sweep_overrides is not None:
        command = "outlier-study -m " + " ".join(collection.sweep_overrides)
        parts.append(f"<p>sweep command (multirun.yaml): <code>{_e(command)}</code></p>")
    launchers = [j.launcher for j in collection.jobs if j.launcher is not None]
    pairs = [
        (key, _spread([env.get(key) for env in envs])) for key in ("git_sha", "python", "platform", "cuda")
    ]
    if any(launchers):
        pairs.append(("hydra/launcher", _spread(launchers)))
    if envs:
        parts.append(_kv_table(pairs, ("", "value (jobs)")))
        packages: list[str] = []
        for env in envs:
            packages += [p for p in (env.get("packages") or {}) if p not in packages]
        rows = [(p, _spread([(env.get("packages") or {}).get(p) for env in envs])) for p in packages]
        parts.append("<h3>Package versions</h3>" + _kv_table(rows, ("package", "version (jobs)")))
        models = [
            (j.name, json.dumps(j.env["model"], sort_keys=True))
            for j in collection.jobs
            if j.env and "model" in j.env
        ]
        if models:
            parts.append(
                "<details><summary>model provenance per job</summary>"
                + _kv_table(models, ("job", "model"))
                + "</details>"
            )
    if missing:
        parts.append(f"<p>no env.json (the job stopped before writing it): {_e(', '.join(missing))}</p>")
    return "\n".join(parts)


def render(collection: Collection) -> str:
    """The whole page; deterministic (no clock), so collecting twice gives the same bytes."""
    counts = collection.counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    title = f"outlier-study: {collection.sweep_dir.name}"
    by_experiment: dict[str, list[tuple[int, Job]]] = {}
    for i, job in enumerate(collection.jobs):
        by_experiment.setdefault(experiment_of(job), []).append((i, job))
    order = [e for e in PAPER_ORDER if e in by_experiment] + sorted(
        e for e in by_experiment if e not in PAPER_ORDER
    )
    pivots = [t for t in collection.tables if is_pivot(t.name)]
    others = [t for t in collection.tables if not is_pivot(t.name)]

    toc = [
        '<li><a href="#setup">model, data and protocol</a></li>',
        '<li><a href="#failed">failed jobs</a></li>',
    ]
    toc += ['<li><a href="#claims">the paper\'s findings against this run</a></li>']
    toc += [
        f'<li><a href="#item-{_e(e)}">{_e(_item_title(e, [j for _, j in by_experiment[e]]))}</a></li>'
        for e in order
    ]
    toc += [
        '<li><a href="#collected">tables across jobs</a></li>',
        '<li><a href="#provenance">provenance</a></li>',
    ]
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>sweep <code>{_e(collection.sweep_dir.resolve())}</code>: "
        f"{len(collection.jobs)} job(s): {_e(summary)}. Layers are numbered from 0.</p>",
        f"<nav><ul>{''.join(toc)}</ul></nav>",
        '<h2 id="setup">Model, data and protocol</h2>',
        _setup(collection),
        '<h2 id="failed">Failed and incomplete jobs</h2>',
        _failures(collection),
        '<h2 id="claims">The paper\'s findings against this run</h2>',
        _claims(collection),
    ]
    for experiment in order:
        jobs = by_experiment[experiment]
        body.append(
            f'<h2 id="item-{_e(experiment)}">{_e(_item_title(experiment, [j for _, j in jobs]))}</h2>'
        )
        main = MAIN_TABLE.get(experiment, experiment)
        body += [_job_section(i, job, collection.parameters, main) for i, job in jobs]
    body.append('<h2 id="collected">Tables across jobs</h2>')
    for table in pivots:
        body.append(f'<h3 id="table-{_e(table.name)}">{_e(table.name)}</h3>' + to_html(table))
    for table in others:
        name = _e(table.name)
        body.append(f'<details><summary id="table-{name}">{name}</summary>{to_html(table)}</details>')
    body += ['<h2 id="provenance">Provenance</h2>', _provenance(collection)]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
