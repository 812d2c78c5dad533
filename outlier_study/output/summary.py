"""What a profile prints at its end: each massive activation once, as a track through the layers, and
the taps where activations overflowed (inf/nan).

An MA carried by the residual stream is the top value of ten or twenty consecutive taps; listing each of
those is noise. A track groups the top-1 MA entries of one (token, channel) in forward order: where it is
born (and the y6 spike it is born from), the layers that carry it, its peak, and the sublayer that adds
the opposite sign where it is cancelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.taps import CANONICAL_TAPS
from outlier_study.stats.tapstats import StatsByTap

# Taps of the residual width: the same channel index names the same residual channel in all of them.
RESIDUAL_WIDTH = frozenset(
    {"resid.pre", "resid.mid", "resid.post", "attn.norm", "mlp.norm", "attn.out", "mlp.out"}
    | {"attn.post_norm", "mlp.post_norm"}
)
STREAM = ("resid.pre", "resid.mid", "resid.post")  # the residual stream itself
BRANCHES = frozenset({"attn.out", "mlp.out", "attn.post_norm", "mlp.post_norm"})  # what sublayers add to it
TRACK_HEADER = (
    "channel",
    "token",
    "token_text",
    "windows",
    "born",
    "from y6",
    "carried through layers",
    "peak",
    "cancelled",
)


@dataclass(frozen=True)
class Hit:
    """A rank-1 entry of topk.csv that meets the MA rule."""

    layer: int
    tap: str
    value: float
    window: int
    token: int
    channel: int
    text: str

    @property
    def order(self) -> tuple[int, int]:
        return self.layer, CANONICAL_TAPS.index(self.tap)

    def at(self) -> str:
        return f"layer {self.layer} {self.tap} ({self.value:+.2f})"


@dataclass(frozen=True)
class Track:
    """One massive activation followed through the layers: its hits at one (token, channel), in forward
    order (a token position usually holds it in every window)."""

    hits: tuple[Hit, ...]
    source: Hit | None = None  # the y6 (mlp.hidden) spike at the same token and layer where it is born

    @property
    def peak(self) -> Hit:
        return max(self.hits, key=lambda h: abs(h.value))

    @property
    def cancelled(self) -> Hit | None:
        """The first sublayer output after the birth that adds the opposite sign: where the MA is removed."""
        positive = self.peak.value > 0
        return next((h for h in self.hits[1:] if h.tap in BRANCHES and (h.value > 0) != positive), None)

    def row(self) -> list[Any]:
        peak, cancelled = self.peak, self.cancelled
        carried = sorted({h.layer for h in self.hits if h.tap in STREAM})
        span = "—" if not carried else f"{carried[0]}" if len(carried) == 1 else f"{carried[0]}–{carried[-1]}"
        source = "—" if self.source is None else f"channel {self.source.channel} ({self.source.value:+.2f})"
        return [
            peak.channel,
            peak.token,
            peak.text,
            " ".join(str(w) for w in sorted({h.window for h in self.hits})),
            self.hits[0].at(),
            source,
            span,
            peak.at(),
            "—" if cancelled is None else cancelled.at(),
        ]


def _grouped(hits: Sequence[Hit], key: Any) -> list[tuple[Hit, ...]]:
    groups: dict[Any, list[Hit]] = {}
    for h in hits:
        groups.setdefault(key(h), []).append(h)
    return [tuple(sorted(g, key=lambda h: h.order)) for g in groups.values()]


def ma_tracks(topk: Sequence[Mapping[str, Any]]) -> list[Track]:
    """Tracks from the rows of topk.csv (named by its header): the rank-1 MAs of the residual width grouped
    by (token, channel), each with the y6 spike it is born from; MAs of other widths (a y6 spike that
    made nothing, attention maps) are tracks of their own. Strongest first."""
    hits = [
        Hit(
            int(r["layer"]),
            str(r["tap"]),
            float(r["value"]),
            int(r["window"]),
            int(r["token"]),
            int(r["channel"]),
            str(r["token_text"]),
        )
        for r in topk
        if int(r["rank"]) == 1 and int(r["is_ma"])
    ]
    spikes = [h for h in hits if h.tap == "mlp.hidden"]
    used: set[Hit] = set()
    tracks = []
    for group in _grouped([h for h in hits if h.tap in RESIDUAL_WIDTH], lambda h: (h.token, h.channel)):
        born = group[0]
        candidates = [s for s in spikes if (s.token, s.layer) == (born.token, born.layer)]
        source = max(candidates, key=lambda s: abs(s.value)) if candidates else None
        if source is not None:
            used.add(source)
        tracks.append(Track(group, source))
    rest = [h for h in hits if h.tap not in RESIDUAL_WIDTH and h not in used]
    tracks += [Track(group) for group in _grouped(rest, lambda h: (h.token, h.channel, h.tap))]
    return sorted(tracks, key=lambda tr: -abs(tr.peak.value))


def nonfinite_rows(stats: StatsByTap) -> list[list[Any]]:
    """Per tap: layers with inf/nan activations, and the counts (e.g. float16 overflow of large MAs)."""
    by_tap: dict[str, list[tuple[int, int, int]]] = {}
    for (layer, tap), s in stats.items():
        if s.inf_count or s.nan_count:
            by_tap.setdefault(tap, []).append((layer, s.inf_count, s.nan_count))
    rows = []
    for tap in sorted(by_tap, key=CANONICAL_TAPS.index):
        hits = sorted(by_tap[tap])
        layers = " ".join(str(layer) for layer, _, _ in hits)
        rows.append([tap, len(hits), layers, sum(h[1] for h in hits), sum(h[2] for h in hits)])
    return rows


NONFINITE_HEADER = ("tap", "layers_hit", "layers", "inf", "nan")
