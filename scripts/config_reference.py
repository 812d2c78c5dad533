"""The configuration reference, generated from the schemas and the config files: every key with its type,
default, bounds and meaning, and every option of every group. `make docs` writes it to docs/reference.md;
a test holds that file equal to this output, so the reference cannot go stale.

    python scripts/config_reference.py > docs/reference.md
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from outlier_study.config import CONF_DIR
from outlier_study.config.options import bound_text, field_doc, item_schema
from outlier_study.config.schema import RootConfig
from outlier_study.validate import option_registries

DATA_GROUPS = ("model", "dataset", "threshold", "quant", "eval", "logger", "paths")
OPTION_GROUPS = ("experiment", "intervention", "method")


def _type(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " \\| ".join(m.name for m in hint)
    if typing.get_origin(hint) in (list, tuple):
        return f"list of {_type(args[0])}"
    if typing.get_origin(hint) is dict:
        return "mapping"
    if args and len(args) < len(typing.get_args(hint)):  # Optional[X]
        return f"{_type(args[0])} or null"
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field[Any]) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is MISSING:
        return "(required)"
    if isinstance(value, enum.Enum):
        return f"`{value.name}`"
    if isinstance(value, list):
        return "`[" + ", ".join(v.name if isinstance(v, enum.Enum) else str(v) for v in value) + "]`"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value}`"


def _rows(schema: type, prefix: str) -> list[str]:
    """One table row per key of `schema`; keys whose type is a schema get rows of their own, dotted."""
    hints = typing.get_type_hints(schema)
    rows = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _rows(hints[f.name], key)
            continue
        doc = field_doc(f).replace("|", "\\|")
        item = item_schema(hints[f.name])
        kind = "list of entries" if item is not None else _type(hints[f.name])
        rows.append(f"| `{key}` | {kind} | {_default(f)} | {bound_text(f.metadata)} | {doc} |")
        if item is not None:  # the keys of each entry, as key[i].name
            rows += _rows(item, f"{key}[i]")
    return rows


def _table(schema: type, prefix: str) -> list[str]:
    return [
        "| key | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
        *_rows(schema, prefix),
        "",
    ]


def _comment(path: Path) -> str:
    """The leading comment of a config file: what the option is."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines).replace("|", "\\|")


def _options(group: str) -> list[str]:
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    rows = ["| option | what it is |", "|---|---|"]
    rows += [f"| `{group}={p.stem}` | {_comment(p) or '—'} |" for p in files]
    return [*rows, ""]


def render() -> str:

    out = [
        "# Configuration reference",
        "",
        "Generated from the schemas and the config files by `python -m outlier_study.reference`",
        "(`make docs`); a test keeps this page equal to that output. How configuration works, your own",
        "config folders and sweeps: [configuration.md](configuration.md). Bounds are checked before any",
        "work starts; a null value is always allowed where the type says `or null`.",
        "",
        "## Top-level keys",
        "",
    ]
    hints = typing.get_type_hints(RootConfig)
    top = [f for f in dataclasses.fields(RootConfig) if f.name not in (*DATA_GROUPS, *OPTION_GROUPS)]
    out += ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for f in top:
        doc = field_doc(f).replace("|", "\\|")
        out.append(
            f"| `{f.name}` | {_type(hints[f.name])} | {_default(f)} | {bound_text(f.metadata)} | {doc} |"
        )
    out.append("")
    for group in DATA_GROUPS:
        out += [f"## `{group}`", "", *_options(group), *_table(hints[group], group)]
    registries = option_registries()
    for group in OPTION_GROUPS:
        out += [
            f"## `{group}`",
            "",
            "Each option has keys of its own; a key of another option is refused.",
            "",
        ]
        for name, entry in registries[group].items():
            paper = getattr(entry, "paper", "")
            title = f"### `{group}={name}`" + (f" ({paper})" if paper else "")
            yaml = CONF_DIR / group / f"{name}.yaml"
            what = _comment(yaml) if yaml.is_file() else entry.description
            out += [title, "", what, "", *_table(entry.options, group)]
    out += ["## `hydra/launcher`", "", *_options("hydra/launcher"), "Their keys: [sweeps.md](sweeps.md).", ""]
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
