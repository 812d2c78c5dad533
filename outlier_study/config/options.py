"""Config fields that carry their documentation and their bounds, and the one checker of those bounds.

Every schema field is declared with `opt(default, doc, ...)`: the doc string feeds the configuration
reference (docs/configuration.md, generated and tested to be current), the bounds are checked once, by
`check_bounds`, for every config before any work starts. A bound never lives in the code that uses the
value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import ListConfig, OmegaConf

from outlier_study.errors import ConfigError

BOUNDS = ("gt", "ge", "le", "lt", "min_items", "items_gt", "items_ge")


def opt(default: Any, doc: str, **bounds: Any) -> Any:
    """A dataclass field with its documentation and optional bounds (gt, ge, le, lt: the value; items_gt,
    items_ge, min_items: a list's items and length). None always passes the bounds: nullable fields say
    what null means in `doc`."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    meta = {"doc": doc, **bounds}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bound_text(meta: Mapping[str, Any]) -> str:
    """The bounds of one field in words, for errors and the reference ('' when unbounded)."""
    parts = []
    for key, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if key in meta:
            parts.append(f"{symbol} {meta[key]:g}")
    if "min_items" in meta:
        parts.append(f"at least {meta['min_items']} item(s)")
    for key, symbol in (("items_ge", "≥"), ("items_gt", ">")):
        if key in meta:
            parts.append(f"items {symbol} {meta[key]:g}")
    return " and ".join(parts)


def _violation(value: Any, meta: Mapping[str, Any]) -> str | None:
    checks = (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b), ("lt", lambda v, b: v < b))
    checks += (("le", lambda v, b: v <= b),)
    for key, holds in checks:
        if key in meta and not (_number(value) and not math.isnan(value) and holds(value, meta[key])):
            limits = {k: meta[k] for k in ("gt", "ge", "lt", "le") if k in meta}
            return f"must be {bound_text(limits)}, got {value!r}"
    if isinstance(value, (list, tuple)):
        if len(value) < meta.get("min_items", 0):
            return f"needs at least {meta['min_items']} item(s), got {len(value)}"
        for key, holds in (("items_gt", lambda v, b: v > b), ("items_ge", lambda v, b: v >= b)):
            if key in meta:
                bad = [v for v in value if not (_number(v) and holds(v, meta[key]))]
                if bad:
                    symbol = ">" if key == "items_gt" else ">="
                    return f"items must be {symbol} {meta[key]:g}, got {bad[0]!r}"
    return None


def check_bounds(schema: type, node: Any, prefix: str) -> None:
    """Check every bounded field of `schema` (a dataclass) on `node` (a config with its keys), recursing
    into fields whose type is a dataclass or a list of them (`prefix.field[i]`); a required field left
    unset or the first violation is a ConfigError naming `prefix.field`."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        where = f"{prefix}.{f.name}" if prefix else f.name
        if OmegaConf.is_config(node) and OmegaConf.is_missing(node, f.name):
            raise ConfigError(where, "required, not given")
        value = getattr(node, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            check_bounds(hints[f.name], value, where)
            continue
        item = item_schema(hints[f.name])
        if item is not None:
            for i, entry in enumerate(value):
                check_bounds(item, entry, f"{where}[{i}]")
        if isinstance(value, ListConfig):
            value = list(value)
        problem = _violation(value, f.metadata)
        if problem:
            raise ConfigError(where, problem)


def item_schema(hint: Any) -> type | None:
    """The schema of a list's items, for a field typed as a list of schema entries (else None)."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return item  # type: ignore[return-value]
    return None


def field_doc(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def name_only(name: str, doc: str) -> type:
    """The schema of an option that has no keys but its name (most paper items need none)."""
    return dataclasses.make_dataclass(
        f"{name.title().replace('_', '')}Options", [("name", str, opt(name, doc))]
    )
