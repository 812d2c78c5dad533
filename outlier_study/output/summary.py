"""What a profile prints at its end: each massive activation once, as a track through the layers, and
the taps where activations overflowed (inf/nan).

An MA carried by the residual stream is the top value of ten or twenty consecutive taps; listing each of
those is noise. A track groups the top-1 MA entries of one (window, token, channel) in forward order:
where it first appears, the layers that carry it, its peak, and where it was last seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.taps import CANONICAL_TAPS
from outlier_study.measure.profiler import StatsByTap

# Taps of the residual width: the same channel index names the same residual channel in all of them.
RESIDUAL_WIDTH = frozenset(
    {"resid.pre", "resid.mid", "resid.post", "attn.norm", "mlp.norm", "attn.out", "mlp.out"}
    | {"attn.post_norm", "mlp.post_norm"}
)
TRACK_HEADER = (
    "channel",
    "token",
    "token_text",
    "window",
    "born",
    "layers",
    "peak",
    "peak_at",
    "last_seen",
    "taps",
)


@dataclass(frozen=True)
class Track:
    """One massive activation followed through the layers (top-1 MA entries at one position)."""

    window: int
    token: int
    channel: int
    token_text: str
    entries: tuple[tuple[int, str, float], ...]  # (layer, tap, signed value) in forward order

    @property
    def peak(self) -> tuple[int, str, float]:
        return max(self.entries, key=lambda e: abs(e[2]))

    def row(self) -> list[Any]:
        (first_layer, first_tap, first_value), (last_layer, last_tap, _) = self.entries[0], self.entries[-1]
        layer, tap, value = self.peak
        span = f"{first_layer}" if first_layer == last_layer else f"{first_layer}–{last_layer}"
        return [
            self.channel,
            self.token,
            self.token_text,
            self.window,
            f"layer {first_layer} {first_tap} ({first_value:+.2f})",
            span,
            f"{value:.2f}",
            f"layer {layer} {tap}",
            f"layer {last_layer} {last_tap}",
            len(self.entries),
        ]


def _forward_order(entry: tuple[int, str, float]) -> tuple[int, int]:
    return entry[0], CANONICAL_TAPS.index(entry[1])


def ma_tracks(topk: Sequence[Mapping[str, Any]]) -> list[Track]:
    """Tracks from the rows of topk.csv (named by its header): every rank-1 entry that is an MA, grouped by
    position; channels of the residual width and of each other tap are kept apart. Strongest first."""
    groups: dict[tuple[int, int, int, str], list[tuple[int, str, float]]] = {}
    texts: dict[tuple[int, int, int, str], str] = {}
    for r in topk:
        if int(r["rank"]) != 1 or not int(r["is_ma"]):
            continue
        space = "residual" if r["tap"] in RESIDUAL_WIDTH else str(r["tap"])
        key = (int(r["window"]), int(r["token"]), int(r["channel"]), space)
        groups.setdefault(key, []).append((int(r["layer"]), str(r["tap"]), float(r["value"])))
        texts[key] = str(r["token_text"])
    tracks = [
        Track(w, t, c, texts[(w, t, c, s)], tuple(sorted(entries, key=_forward_order)))
        for (w, t, c, s), entries in groups.items()
    ]
    return sorted(tracks, key=lambda tr: -abs(tr.peak[2]))


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
