"""Token-level perplexity of a causal LM over fixed windows: the quality check behind every intervention."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from outlier_study.measure.checkpoints import WindowCheckpoint
from outlier_study.measure.forward import batch_logits, batches
from outlier_study.models.loader import LoadedModel

# Logit elements per cross-entropy call. Chunking bounds the float32 log-softmax buffer (and the upcast of
# half logits) whatever the vocabulary (262k for Gemma3), instead of a second (B, L, V) tensor. On CPU a
# 16 MiB chunk stays in cache and is faster than one big call; on GPU few large calls avoid launch overhead.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 26


@dataclass
class Perplexity:
    """Summed NLL and token count, so results over several runs or shards can be added exactly."""

    nll_sum: float  # summed negative log-likelihood (nats) over predicted tokens: exact sum of window sums
    n_tokens: int  # predicted tokens: n_windows × (seq_len − 1), every position but the first

    @property
    def mean_nll(self) -> float:
        """Mean NLL per predicted token (nats); nan when nothing was predicted."""
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def ppl(self) -> float:
        """exp(mean_nll): token-level perplexity (not lm-eval's word perplexity); inf on overflow."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Append the summed NLL of one window's (L, V) logits to `parts`, one float32 scalar per row chunk.

    logits[:-1] of a contiguous window is a contiguous view, so no (L, V) copy is made; `.float()` is a
    no-op for float32 logits and upcasts only one chunk of half logits (whose log-softmax loses precision).
    Every window of a call has the same number of chunks, so `parts` splits evenly by window.
    """
    n_pred, vocab = logits.shape[0] - 1, logits.shape[1]
    step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, _CHUNK_ELEMENTS_DEFAULT) // vocab)
    for s in range(0, n_pred, step):
        e = min(s + step, n_pred)
        parts.append(F.cross_entropy(logits[s:e].float(), ids[s + 1 : e + 1], reduction="sum"))


def _exact_sum(values: Iterable[float]) -> float:
    """Correctly rounded float64 sum, independent of order and grouping, so a resumed evaluation that adds
    the same window values gets the same bits; non-finite values (fp16 overflow) propagate as inf/nan."""
    values = list(values)
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):  # inf − inf, or an intermediate overflow
        return sum(values)


def _window_sums(pending: list[tuple[list[int], torch.Tensor]], done: dict[int, float]) -> None:
    """Move the chunk sums of finished windows to the host (one sync) and reduce them to one value each."""
    if not pending:
        return
    values = torch.cat([chunks for _, chunks in pending]).tolist()
    pos = 0
    for windows, chunks in pending:
        per_window = chunks.numel() // len(windows)
        for w in windows:
            done[w] = _exact_sum(values[pos : pos + per_window])
            pos += per_window
    pending.clear()


def _digest(input_ids: torch.Tensor, batch_size: int) -> str:
    """What an evaluation's checkpoint must match: the exact windows and how they are batched."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(ids.numpy().tobytes())
    return f"{tuple(ids.shape)}:bs{batch_size}:{h.hexdigest()[:16]}"


@torch.inference_mode()
def evaluate_perplexity(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    checkpoint: WindowCheckpoint | None = None,
    counters: dict[Any, int] | None = None,
) -> Perplexity:
    """Token-level perplexity of `lm` over the (N, L) windows `input_ids`, `batch_size` windows per forward.

    Every position but the first of each window is predicted from the ones before it inside that window.
    A non-finite NLL (e.g. float16 overflow) is not an error: the result is returned with ppl inf or nan,
    so a sweep can record a broken configuration instead of crashing.

    With `checkpoint`, each window's NLL sum is saved after its batch (one host sync per batch; a layerwise
    model: after the last batch, since all windows finish together) and a restarted evaluation skips the
    batches already saved. `counters` (a dict the forward hooks add to,
    such as an intervention's per-layer counts) is saved and restored with them. The result is the
    correctly rounded sum of the per-window sums, so it is bit-identical with and without interruptions.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_windows, seq_len >= 2), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_windows = int(input_ids.shape[0])
    done: dict[int, float] = {}
    if checkpoint is not None:
        checkpoint = WindowCheckpoint(checkpoint.path, f"{checkpoint.key}|{_digest(input_ids, batch_size)}")
        done, saved = checkpoint.load()
        if done and counters is not None:
            counters.clear()
            counters.update(dict(saved))
        if done:
            print(f"{desc}: resuming from {checkpoint.path}: {len(done)}/{n_windows} windows already done")
    # Without a checkpoint the chunk sums stay on the device until the end: one host sync in all.
    pending: list[tuple[list[int], torch.Tensor]] = []
    bar = tqdm(total=n_windows, desc=desc, unit="win", disable=not progress)
    todo = []
    for start, ids in batches(input_ids, batch_size):
        if all(w in done for w in range(start, start + ids.shape[0])):
            bar.update(ids.shape[0])
        else:
            todo.append((start, ids))
    # Layerwise, every window's forward hooks (and the counters they add to) have run before the first
    # batch is scored, so per-batch saves would store counts of unscored windows: one save at the end.
    per_batch = checkpoint is not None and lm.store is None
    for start, ids, logits in batch_logits(lm, todo, progress, desc):
        windows = list(range(start, start + ids.shape[0]))
        targets = ids.to(logits.device)
        parts: list[torch.Tensor] = []
        for b in range(ids.shape[0]):
            _window_nll(logits[b], targets[b], parts)
        del logits
        pending.append((windows, torch.stack(parts)))
        if per_batch:
            _window_sums(pending, done)
            checkpoint.save(done, counters)  # type: ignore[union-attr]
        bar.update(len(windows))
    bar.close()
    _window_sums(pending, done)
    if checkpoint is not None and not per_batch and todo:
        checkpoint.save(done, counters)
    n_tokens = n_windows * (int(input_ids.shape[1]) - 1)
    nll_sum = _exact_sum(done[w] for w in range(n_windows))
    return Perplexity(nll_sum=nll_sum, n_tokens=n_tokens)
