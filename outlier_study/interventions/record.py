"""What an intervention or method changed: one record protocol for metrics.json, W&B and checkpoints.

Each record says how many elements it changed (`total`), which live counters a resumed evaluation must
restore (`counters`: counts that grow with every forward pass), and its flat summary under a prefix:
"intervention" keys in full detail, "method" keys in brief (the method's name is a column of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Change(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def counters(self) -> dict[Any, int] | None: ...

    def summary(self, prefix: str, detail: bool = True) -> dict[str, Any]: ...


@dataclass
class Unchanged:
    """The model as it is (`none`)."""

    name: str = "none"
    total: int = 0
    counters: None = None

    def summary(self, prefix: str, detail: bool = True) -> dict[str, Any]:
        return {f"{prefix}.name": self.name} if detail else {}


def _head(prefix: str, name: str, value: str, total: int, detail: bool) -> dict[str, Any]:
    """The keys every change record starts with; in brief (a method's) without its name."""
    head = {f"{prefix}.name": name} if detail else {}
    return {**head, f"{prefix}.value": value, f"{prefix}.changed_total": total}


@dataclass
class Counted:
    """Elements replaced by hooks, per layer, summed over every forward pass. Only counts: a record must
    stay tiny however many windows run through the model."""

    name: str
    value: str
    layers: list[int]
    tap: str | None = None
    changed: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.changed.values())

    @property
    def counters(self) -> dict[Any, int]:
        return self.changed

    def add(self, layer: int, count: int) -> None:
        self.changed[layer] = self.changed.get(layer, 0) + count

    def summary(self, prefix: str, detail: bool = True) -> dict[str, Any]:
        out = _head(prefix, self.name, self.value, self.total, detail)
        if detail:
            if self.tap is not None:
                out[f"{prefix}.tap"] = self.tap
            out.update({f"{prefix}.changed.layer{k}": v for k, v in sorted(self.changed.items())})
        return out


@dataclass
class Edited:
    """Parameter channels edited, per (layer, name): the indices, small enough for metrics.json."""

    name: str
    value: str
    edited: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    counters: None = None

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.edited.values())

    def summary(self, prefix: str, detail: bool = True) -> dict[str, Any]:
        out = _head(prefix, self.name, self.value, self.total, detail)
        if detail:
            by_name: dict[str, int] = {}
            for (_, name), idx in self.edited.items():
                by_name[name] = by_name.get(name, 0) + len(idx)
            out.update({f"{prefix}.changed.{k}": v for k, v in sorted(by_name.items())})
        return out


@dataclass
class Transformed:
    """A whole-model transform (a smoothing or a rotation) described by fixed values."""

    values: dict[str, Any]
    total: int = 0
    counters: None = None

    def summary(self, prefix: str, detail: bool = True) -> dict[str, Any]:
        return dict(self.values)
