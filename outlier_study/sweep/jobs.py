"""Read a sweep back: its job folders (status, parameters, metrics, tables) in the order it was swept.

Kept apart from the table building in `collect`, so the HTML report and the tables share one reader."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

STATES = ("ok", "failed", "running", "incomplete")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_yaml(path: Path) -> Any:
    """A YAML file as plain containers, interpolations left as written (Hydra's own files have them)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # an unreadable file only costs that job its parameters, never the collection
        return None


def _parse_overrides(lines: Iterable[Any]) -> dict[str, str]:
    """Hydra's overrides.yaml entries ('+a.b=1', '~c') as key -> value text."""
    out: dict[str, str] = {}
    for raw in lines:
        text = str(raw)
        key, sep, value = text.partition("=")
        if text.startswith("~"):
            out[key.lstrip("~")] = "(deleted)"
        elif sep:
            out[key.lstrip("+")] = value
    return out


def _text(node: Any) -> str:
    """A config value as the text an override would use; a group node is named by its `name`."""
    if isinstance(node, dict):
        if "name" in node:
            return _text(node["name"])
        return json.dumps(node, sort_keys=True, separators=(",", ":"))
    if isinstance(node, list):
        return "[" + ",".join(_text(v) for v in node) + "]"
    if isinstance(node, bool):
        return str(node).lower()
    if node is None:
        return "null"
    return str(node)


def _norm_override(value: str) -> str:
    return value.lower() if value in ("True", "False", "None") else value


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort 'm=2' before 'm=10', so jobs appear in the order a reader expects."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p)


@dataclass
class Job:
    """One job folder as written by `app.run`, read once."""

    path: Path
    name: str
    status: str
    error: str = ""
    traceback: str = ""
    overrides: dict[str, str] | None = None  # None: no .hydra/overrides.yaml (run via app.run directly)
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's group choices (.hydra/hydra.yaml)
    launcher: str | None = None  # Hydra's launcher choice (basic, local, slurm), when hydra.yaml says
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def param(self, key: str) -> str:
        """The job's value for an override key: as overridden, else the group choice, else from config."""
        if self.overrides is not None and key in self.overrides:
            return _norm_override(self.overrides[key])
        if key in self.choices:
            return self.choices[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return ""
            node = node[part]
        return _text(node)

    def table_files(self) -> dict[str, Path]:
        """tables/<name>.csv by name (the CSV is the machine-readable twin of the Markdown)."""
        folder = self.path / "tables"
        return {p.stem: p for p in sorted(folder.glob("*.csv"))} if folder.is_dir() else {}

    def markdown_only_tables(self) -> dict[str, Path]:
        folder = self.path / "tables"
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.md")) if not p.with_suffix(".csv").exists()}

    def figures(self) -> list[Path]:
        folder = self.path / "figures"
        return (
            sorted(folder.rglob("*.png"), key=lambda p: natural_key(p.as_posix())) if folder.is_dir() else []
        )


def read_job(path: Path, root: Path) -> Job:
    """Read status, parameters and results; anything unreadable makes the job 'incomplete', not absent."""
    name = path.relative_to(root).as_posix() if path != root else path.name
    status_doc = _load_json(path / "status.json")
    job = Job(path=path, name=name, status="incomplete")
    if not isinstance(status_doc, dict):
        job.error = "status.json is unreadable"
    else:
        state = str(status_doc.get("status", ""))
        job.status = state if state in STATES else "incomplete"
        job.error = str(status_doc.get("error") or "")
        job.traceback = str(status_doc.get("traceback") or "")
        if state not in STATES:
            job.error = f"unknown status {state!r} in status.json"
        elif state == "failed" and not job.error:
            job.error = "failed (no error recorded)"
        elif state == "running":
            job.error = "still running, or stopped before it finished (killed, preempted, timed out)"
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml")
    job.overrides = _parse_overrides(overrides) if isinstance(overrides, list) else None
    config = _load_yaml(path / ".hydra" / "config.yaml")
    job.config = config if isinstance(config, dict) else {}
    hydra_doc = _load_yaml(path / ".hydra" / "hydra.yaml")
    if isinstance(hydra_doc, dict):
        choices = ((hydra_doc.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
        job.choices = {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
        job.launcher = str(choices["hydra/launcher"]) if choices.get("hydra/launcher") else None
    env = _load_json(path / "env.json")
    job.env = env if isinstance(env, dict) else None
    metrics = _load_json(path / "metrics.json")
    job.metrics = metrics if isinstance(metrics, dict) else None
    if job.ok and job.metrics is None:
        job.status, job.error = "incomplete", "status.json says ok but metrics.json is missing or unreadable"
    return job


def discover(root: Path, skip: Path | None = None) -> list[Path]:
    """Every folder holding a status.json (job folders are not searched further; hidden ones are skipped)."""
    found: list[Path] = []
    skip_resolved = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "status.json" in filenames:
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip_resolved
        )
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _config_keys(jobs: list[Job]) -> list[str]:
    """Keys whose config value differs across jobs; a group whose `name` differs is one key (the group)."""
    flat = [_flatten({k: v for k, v in j.config.items() if k != "hydra"}) for j in jobs]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    differing = [k for k in keys if len({_text(f.get(k)) for f in flat}) > 1]
    groups = {k.rsplit(".", 1)[0] for k in differing if k.endswith(".name") and "." in k}
    out: list[str] = []
    for k in differing:
        group = next((g for g in groups if k.startswith(g + ".")), None)
        key = group if group is not None else k
        if key not in out:
            out.append(key)
    return out


def varying(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs across these jobs, in the order they were first given."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in (job.overrides or {}) if k not in keys]
    if any(job.overrides is None for job in jobs):
        keys += [k for k in _config_keys(jobs) if k not in keys]
    return [k for k in keys if len({job.param(k) for job in jobs}) > 1]


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return (rows[0], rows[1:]) if rows else ([], [])


def _swept_values(entries: Iterable[str]) -> list[tuple[str, list[str]]]:
    """'model=a,b' -> ('model', ['a', 'b']); range()/glob()/lists/quoted values are left unordered."""
    out = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        if sep and not any(c in value for c in "()[]{}'\"") and "," in value:
            out.append((key.lstrip("+"), [_norm_override(v.strip()) for v in value.split(",")]))
    return out


def sweep_order(jobs: list[Job], swept: list[tuple[str, list[str]]]) -> list[Job]:
    """Jobs in the order the sweep listed its values (first key slowest, as Hydra launches them)."""

    def rank(job: Job) -> tuple[int, ...]:
        return tuple(vals.index(v) if (v := job.param(k)) in vals else len(vals) for k, vals in swept)

    return sorted(jobs, key=rank)


def _sweep_definition(sweep_dir: Path) -> list[str] | None:
    """The multirun's sweep as override strings: the experiment's hydra.sweeper.params, then the command's."""
    path = sweep_dir / "multirun.yaml"
    doc = _load_yaml(path) if path.is_file() else None
    hydra = doc.get("hydra") if isinstance(doc, dict) else None
    if not isinstance(hydra, dict):
        return None
    params = (hydra.get("sweeper") or {}).get("params") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    return [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]


def read_sweep(sweep_dir: Path, skip: Path | None = None) -> tuple[list[Job], list[str] | None]:
    """Every job under sweep_dir (a sweep, or one job folder) in sweep order, and the sweep's overrides."""
    sweep = _sweep_definition(sweep_dir)
    jobs = [read_job(p, sweep_dir) for p in discover(sweep_dir, skip)]
    return sweep_order(jobs, _swept_values(sweep or [])), sweep
