"""The model calls every measurement makes, shared so a benchmark times exactly the same work.

Each call has a layerwise form (`measure/layerwise.py`) for a model loaded with `execution=layerwise`:
the windows go through the decoder layers one layer at a time instead of one batch at a time, and the
hooks see the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from outlier_study.measure import layerwise
from outlier_study.models.loader import LoadedModel


def batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, input_ids.shape[0], batch_size):
        yield start, input_ids[start : start + batch_size]


@torch.inference_mode()
def forward(lm: LoadedModel, ids: torch.Tensor, through: int | None = None) -> torch.Tensor | None:
    """One forward without KV cache, logits for the last position only (profiling needs no logits; a
    layerwise model skips the head and returns None). `through`: the last layer anyone observes, where a
    layerwise pass may stop."""
    if lm.store is not None:
        layerwise.run_layers(lm, [(0, ids)], through=through)
        return None
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False, logits_to_keep=1).logits


@torch.inference_mode()
def logits_forward(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The one model call perplexity makes (no KV cache, all logits)."""
    if lm.store is not None:
        return layerwise.head_logits(lm, layerwise.run_layers(lm, [(0, ids)])[0])
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False).logits


def batch_logits(
    lm: LoadedModel, parts: list[tuple[int, torch.Tensor]], progress: bool = False, desc: str = "logits"
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, ids, all logits) of each batch `(start, ids)` of `parts`, in order, one batch's logits alive
    at a time. In memory each batch is one forward; layerwise, every batch first passes every layer, then
    each gets its head."""
    if lm.store is None:
        for start, ids in parts:
            yield start, ids, logits_forward(lm, ids)
        return
    for batch in layerwise.run_layers(lm, parts, progress, desc):
        yield batch.start, batch.ids, layerwise.head_logits(lm, batch)
        batch.hidden = None


def forward_windows(
    lm: LoadedModel, input_ids: torch.Tensor, batch_size: int, progress: bool, desc: str, owner: object = None
) -> None:
    """Run every window through the model; `owner.window_offset` tracks the global index of a batch."""
    if lm.store is not None:
        layerwise.run_layers(lm, list(batches(input_ids, batch_size)), progress, desc, owner)
        return
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="win", disable=not progress)
    for start, ids in batches(input_ids, batch_size):
        if owner is not None:
            owner.window_offset = start  # type: ignore[attr-defined]
        forward(lm, ids)
        bar.update(ids.shape[0])
    bar.close()
