"""Token-level perplexity of a causal LM over fixed windows: the quality check behind every intervention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from outlier_study.models.loader import LoadedModel
from outlier_study.profiling import batches

# Logit elements per cross-entropy call. Chunking bounds the float32 log-softmax buffer (and the upcast of
# half logits) whatever the vocabulary (262k for Gemma3), instead of a second (B, L, V) tensor. On CPU a
# 16 MiB chunk stays in cache and is faster than one big call; on GPU few large calls avoid launch overhead.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 26


@dataclass
class Perplexity:
    """Summed NLL and token count, so results over several runs or shards can be added exactly."""

    nll_sum: float  # summed negative log-likelihood (nats) over predicted tokens, float64 accumulation
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


@torch.inference_mode()
def logits_forward(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The one model call perplexity makes (no KV cache, all logits), shared so a benchmark times the same."""
    return lm.model(input_ids=ids.to(lm.input_device), use_cache=False).logits


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Append the summed NLL of one window's (L, V) logits to `parts`, one float32 scalar per row chunk.

    logits[:-1] of a contiguous window is a contiguous view, so no (L, V) copy is made; `.float()` is a
    no-op for float32 logits and upcasts only one chunk of half logits (whose log-softmax loses precision).
    """
    n_pred, vocab = logits.shape[0] - 1, logits.shape[1]
    step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, _CHUNK_ELEMENTS_DEFAULT) // vocab)
    for s in range(0, n_pred, step):
        e = min(s + step, n_pred)
        parts.append(F.cross_entropy(logits[s:e].float(), ids[s + 1 : e + 1], reduction="sum"))


@torch.inference_mode()
def evaluate_perplexity(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Token-level perplexity of `lm` over the (N, L) windows `input_ids`, `batch_size` windows per forward.

    Every position but the first of each window is predicted from the ones before it inside that window.
    A non-finite NLL (e.g. float16 overflow) is not an error: the result is returned with ppl inf or nan,
    so a sweep can record a broken configuration instead of crashing.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_windows, seq_len >= 2), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    parts: list[torch.Tensor] = []  # chunk sums stay on the device: one host sync at the end, not per chunk
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="win", disable=not progress)
    for _, ids in batches(input_ids, batch_size):
        logits = logits_forward(lm, ids)
        targets = ids.to(logits.device)
        for b in range(ids.shape[0]):
            _window_nll(logits[b], targets[b], parts)
        del logits
        bar.update(ids.shape[0])
    bar.close()
    n_tokens = int(input_ids.shape[0]) * (int(input_ids.shape[1]) - 1)
    nll_sum = float(torch.stack(parts).double().sum()) if parts else 0.0  # float64 sum of chunk sums
    return Perplexity(nll_sum=nll_sum, n_tokens=n_tokens)
