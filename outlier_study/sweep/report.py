"""One self-contained HTML page for a collected sweep: tables, figures as data URIs, failures, provenance."""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from outlier_study.output.tables import Table, rectangular, to_html
from outlier_study.sweep.collect import Collection
from outlier_study.sweep.jobs import Job, read_table

# Inline only: the page must open from a cluster's scratch disk or an e-mail attachment with no network.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.2em}
.note{font-size:.85em;color:#555;margin-top:-.6em}
.status-ok{color:#176317}.status-failed,.status-incomplete{color:#b00020;font-weight:bold}
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


def _job_section(index: int, job: Job, parameters: list[str]) -> str:
    parts = [f'<section id="job-{index}"><h3>{_e(_label(job, parameters))} — {_status(job.status)}</h3>']
    parts.append(f"<p>folder <code>{_e(job.name)}</code></p>")
    if job.error:
        parts.append(f"<p><code>{_e(job.error)}</code></p>")
    params = [(k, job.param(k)) for k in parameters]
    if params:
        parts.append(_kv_table(params, ("parameter", "value")))
    if job.overrides is not None:
        parts.append(
            f"<p>overrides: <code>{_e(' '.join(f'{k}={v}' for k, v in job.overrides.items()))}</code></p>"
        )
    if job.metrics:
        pairs = [(k, json.dumps(v) if isinstance(v, dict | list) else str(v)) for k, v in job.metrics.items()]
        parts.append(
            "<details><summary>metrics.json</summary>" + _kv_table(pairs, ("metric", "value")) + "</details>"
        )
    for name, path in job.table_files().items():
        header, rows = read_table(path)
        parts.append(f"<h4>tables/{_e(path.name)}</h4>")
        parts.append(to_html(Table(name, tuple(header), rectangular(header, rows))))
    for name, path in job.markdown_only_tables().items():
        parts.append(f"<h4>tables/{_e(name)}.md</h4><pre>{_e(path.read_text(encoding='utf-8'))}</pre>")
    for fig in job.figures():
        rel = fig.relative_to(job.path).as_posix()
        parts.append(f"<figure>{_img(fig, f'{job.name}: {rel}')}<figcaption>{_e(rel)}</figcaption></figure>")
    if job.traceback:
        parts.append(f"<details><summary>traceback</summary><pre>{_e(job.traceback)}</pre></details>")
    config = job.path / ".hydra" / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8")
        parts.append(
            f"<details><summary>composed config (.hydra/config.yaml)</summary><pre>{_e(text)}</pre></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _spread(values: list[Any]) -> str:
    """'v (n jobs)' for each distinct value, so a sweep run from two commits shows both."""
    counts = Counter("—" if v is None else str(v) for v in values)
    return "; ".join(f"{v} ({n} job{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


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
    toc = ['<li><a href="#failed">failed and incomplete jobs</a></li>']
    toc += [f'<li><a href="#table-{_e(t.name)}">{_e(t.name)}</a></li>' for t in collection.tables]
    toc += ['<li><a href="#jobs">each job: tables, figures, config</a></li>']
    toc += ['<li><a href="#provenance">provenance</a></li>']
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>sweep <code>{_e(collection.sweep_dir.resolve())}</code>: "
        f"{len(collection.jobs)} job(s): {_e(summary)}. Layers are numbered from 0.</p>",
        f"<nav><ul>{''.join(toc)}</ul></nav>",
        '<h2 id="failed">Failed and incomplete jobs</h2>',
        _failures(collection),
        "<h2>Collected tables</h2>",
    ]
    for table in collection.tables:
        body.append(f'<h3 id="table-{_e(table.name)}">{_e(table.name)}</h3>')
        body.append(to_html(table))
    body.append('<h2 id="jobs">Each job: tables, figures, config</h2>')
    body += [_job_section(i, job, collection.parameters) for i, job in enumerate(collection.jobs)]
    body += ['<h2 id="provenance">Provenance</h2>', _provenance(collection)]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
