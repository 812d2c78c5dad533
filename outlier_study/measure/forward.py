"""The model calls every measurement makes, shared so a benchmark times exactly the same work."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from outlier_study.models.loader import LoadedModel


def batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, input_ids.shape[0], batch_size):
        yield start, input_ids[start : start + batch_size]


@torch.inference_mode()
def forward(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """One forward without KV cache, logits for the last position only (profiling needs no logits)."""
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False, logits_to_keep=1).logits


@torch.inference_mode()
def logits_forward(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The one model call perplexity makes (no KV cache, all logits)."""
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False).logits


def forward_windows(
    lm: LoadedModel, input_ids: torch.Tensor, batch_size: int, progress: bool, desc: str, owner: object = None
) -> None:
    """Run every window through the model; `owner.window_offset` tracks the global index of a batch."""
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="win", disable=not progress)
    for start, ids in batches(input_ids, batch_size):
        if owner is not None:
            owner.window_offset = start  # type: ignore[attr-defined]
        forward(lm, ids)
        bar.update(ids.shape[0])
    bar.close()
