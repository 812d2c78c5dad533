"""True vs fake massive activations: which sublayer put each residual-stream MA there.

An MA in the residual stream after a sublayer (resid.mid after attention, resid.post after the MLP) is a
TMA when that sublayer's own output is an MA at the same (token, channel) (in a parallel block, which has
no resid.mid, the sum of both sublayers' outputs at resid.post) — the residual before and after
the sublayer differ by exactly that output — and an FMA when it was only carried by the residual add.
An MA that is no MA after the next sublayer was cancelled there (the sublayer added at least half of
it with the opposite sign) or faded. Only the sparse MA positions of the current layer are held.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from outlier_study.adapters.base import Adapter
from outlier_study.measure.hooks import tap_hooks
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.massive import ma_positions

Position = tuple[int, int, int]  # (batch row, token, channel)


@dataclass(frozen=True)
class MAEvent:
    window: int
    layer: int
    site: str  # resid.mid | resid.post (TMA/FMA), or the sublayer where a carried MA was lost
    token: int
    channel: int
    value: float  # the residual value (for "cancelled": the value that came in)
    kind: str  # TMA | FMA | cancelled | faded
    branch_value: float  # the sublayer output at the same position


class Attributor:
    """Hook sink that classifies residual MAs layer by layer, as the forward pass produces them."""

    def __init__(self, adapter: Adapter, ma_abs: float, ma_ratio: float) -> None:
        self.attn_branch, self.mlp_branch, *self.later = adapter.residual_branches()
        self.adapter, self.parallel = adapter, adapter.parallel
        self.ma_abs, self.ma_ratio = ma_abs, ma_ratio
        self.window_offset = 0
        self._events: list[tuple[int, MAEvent]] = []  # (the batch's first window, event)
        self._mas: dict[str, dict[Position, float]] = {}  # this layer's MA positions so far, by tap
        self._branch = torch.empty(0)  # the sublayer output just added; the model holds it anyway
        self._attn = torch.empty(0)  # a parallel block's attention output, until its MLP output comes
        self._mlp = torch.empty(0)  # the MLP output, until the branches added after it come (Gemma 4)

    @property
    def events(self) -> list[MAEvent]:
        """The events batch by batch, each batch's layer by layer: the order of a batch-at-a-time forward,
        also when the layers ran one at a time over all batches (execution=layerwise)."""
        return [e for _, e in sorted(self._events, key=lambda pair: pair[0])]  # stable: layers keep order

    @property
    def taps(self) -> list[str]:
        mid = [] if self.parallel else ["resid.mid"]
        return ["resid.pre", self.attn_branch, *mid, self.mlp_branch, *self.later, "resid.post"]

    def sink(self, layer: int, tap: str, x: torch.Tensor, _valid: torch.Tensor | None) -> None:
        if tap in (self.attn_branch, self.mlp_branch):  # what the residual add receives
            x = self.adapter.adds(layer)[tap == self.mlp_branch].branch(x)
        if self.parallel and tap == self.attn_branch:
            self._attn = x
            return
        if self.later and tap in (self.mlp_branch, *self.later):  # all of them make the MLP's add
            self._mlp = x if tap == self.mlp_branch else self._mlp + x
            if tap != self.later[-1]:
                return
            tap, x = self.mlp_branch, self._mlp
        if self.parallel and tap == self.mlp_branch:
            x = self._attn + x  # what the block adds to its input
        found: dict[Position, float] = ma_positions(x, self.ma_abs, self.ma_ratio)  # type: ignore[assignment]
        if tap in (self.attn_branch, self.mlp_branch):
            self._branch = x
        elif tap != "resid.pre":
            before, branch = (
                ("resid.pre", self.attn_branch)
                if tap == "resid.mid"
                else ("resid.pre" if self.parallel else "resid.mid", self.mlp_branch)
            )
            generated = self._mas[branch]
            for (b, t, c), value in found.items():
                self._event(layer, tap, (b, t, c), value, "TMA" if (b, t, c) in generated else "FMA")
            for pos, value in self._mas[before].items():
                if pos not in found:
                    self._event(layer, branch, pos, value, self._loss_kind(pos, value))
        self._mas[tap] = found

    def _loss_kind(self, pos: Position, value: float) -> str:
        """Cancelled: the sublayer added at least half of the value with the opposite sign; else it
        faded (below the rule, e.g. because the tensor's median rose)."""
        branch = float(self._branch[pos])
        return "cancelled" if branch * value < 0 and abs(branch) >= 0.5 * abs(value) else "faded"

    def _event(self, layer: int, site: str, pos: Position, value: float, kind: str) -> None:
        b, t, c = pos
        branch_value = float(self._branch[b, t, c])
        event = MAEvent(self.window_offset + b, layer, site, t, c, value, kind, branch_value)
        self._events.append((self.window_offset, event))


@contextmanager
def attribute(lm: LoadedModel, layers: list[int], ma_abs: float, ma_ratio: float) -> Iterator[Attributor]:
    """Classify every residual MA at `layers` during the forward passes run inside the block."""
    attributor = Attributor(lm.adapter, ma_abs, ma_ratio)
    with tap_hooks(lm.model, lm.adapter, attributor.taps, layers, attributor.sink):
        yield attributor


def first_appearance(events: list[MAEvent]) -> dict[tuple[int, int, int], int]:
    """(window, token, channel) -> the first layer where it was generated (a TMA)."""
    first: dict[tuple[int, int, int], int] = {}
    for e in events:
        if e.kind == "TMA":
            key = (e.window, e.token, e.channel)
            first[key] = min(first.get(key, e.layer), e.layer)
    return first


def tma_by_layer(events: list[MAEvent]) -> dict[int, dict[int, list[MAEvent]]]:
    """layer -> window -> TMAs of that layer, strongest first."""
    out: dict[int, dict[int, list[MAEvent]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if e.kind == "TMA":
            out[e.layer][e.window].append(e)
    for windows in out.values():
        for lst in windows.values():
            lst.sort(key=lambda e: -abs(e.value))
    return out


LIFECYCLE_HEADER = ["channel", "generated (TMA) at layers", "cancelled at", "faded at", "windows"]


def sites(events: list[MAEvent], kind: str) -> str:
    """Where events of one kind happen, with counts: '11 (×10)' for TMAs, '28 mlp.out (×10)' for losses."""
    found = Counter((e.layer, "" if kind == "TMA" else f" {e.site}") for e in events if e.kind == kind)
    return ", ".join(f"{layer}{site} (×{n})" for (layer, site), n in sorted(found.items())) or "—"


def lifecycle_rows(events: list[MAEvent]) -> list[list[Any]]:
    """Per channel, strongest first: the layers that generate its MAs and the sublayers where they are
    cancelled or fade."""
    by_channel: dict[int, list[MAEvent]] = {}
    for e in events:
        by_channel.setdefault(e.channel, []).append(e)
    rows = []
    for channel, evs in sorted(by_channel.items(), key=lambda kv: -max(abs(e.value) for e in kv[1])):
        windows = len({e.window for e in evs})
        rows.append([channel, sites(evs, "TMA"), sites(evs, "cancelled"), sites(evs, "faded"), windows])
    return rows
