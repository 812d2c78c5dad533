"""Layer-by-layer execution (`execution=layerwise`): every window's hidden state through decoder layer 0, then
layer 1, ..., with one layer's weights resident at a time (how GPTQ-style tools calibrate 70B models on
one GPU).

The model's own forward prepares what its layers get: for each batch it runs with every decoder layer
replaced by a stand-in that records the layer's arguments (the hidden state, rotary position embeddings,
masks, per-layer-type variants such as Gemma3's sliding-window mask and local rotary table, whatever a
family passes) and hands the hidden state on unchanged; the last needed stand-in stops the forward. So no
family's preamble is rewritten here. This relies on one property of the decoder families in scope: what
the model's loop passes to layer i besides the hidden state does not depend on layer i − 1's output (masks
and position tables are made before the loop; `tests/test_layerwise.py` holds every tiny family to
bit-identical logits). Then each layer is read (`LayerStore.layer`), every batch's hidden
state passes through the real layer module (its hooks fire, so taps, reducers and hook-based
interventions see exactly what they see in memory), and the layer is dropped. Perplexity replays the
model's forward once more per batch with stand-ins that return the final hidden state at the last layer,
so the final norm, lm_head and any logit soft-capping are the model's own code.

What is held: the embeddings and other resident parts, one layer, and every batch's hidden state and layer
arguments (shared tensors: one mask and rotary table per batch). Each reducer (layer, tap) still sees the
batches in window order, so every statistic is the in-memory one bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from outlier_study.models.loader import LoadedModel

# (layer index, the positional arguments, the keyword arguments) -> what the stand-in returns
Act = Callable[[int, tuple[Any, ...], dict[str, Any]], torch.Tensor]


class _Stop(Exception):
    """Ends the model's forward once the stand-ins have recorded what they need."""


class _Stand(nn.Module):
    """Takes a decoder layer's place in its ModuleList during the model's own forward. Attributes the
    model's loop reads off a layer (e.g. `attention_type`) come from the layer it stands for; the layer is
    not a submodule of it, so nothing it holds is called."""

    def __init__(self, index: int, layer: nn.Module, act: Act) -> None:
        super().__init__()
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_act", act)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._act(self._index, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._layer, name)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _standing(lm: LoadedModel, act: Act) -> Iterator[None]:
    """Every decoder layer replaced by a stand-in for the `with` body; the layers are back after it."""
    blocks = lm.adapter.blocks(lm.model)
    layers = list(blocks)
    try:
        for i, layer in enumerate(layers):
            blocks[i] = _Stand(i, layer, act)
        yield
    finally:
        for i, layer in enumerate(layers):
            blocks[i] = layer


@dataclass
class Batch:
    """One batch of windows on its way through the layers."""

    start: int  # the global index of its first window
    ids: torch.Tensor
    hidden: torch.Tensor | None = None  # the input of the next layer to run
    keyword: bool = False  # the model passes the hidden state as `hidden_states=`, not first
    calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = field(default_factory=list)  # per layer


def _capture(lm: LoadedModel, batch: Batch, last: int) -> None:
    """Record what the model's forward passes to layers 0..last for this batch (the "catcher")."""

    def record(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = _hidden(args, kwargs)
        if index == 0:
            batch.hidden, batch.keyword = hidden, not args
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        batch.calls.append((args[1:], rest))
        if index == last:
            raise _Stop
        return hidden

    with _standing(lm, record):
        try:
            lm.model(input_ids=batch.ids.to(lm.input_device), use_cache=False, logits_to_keep=1)
        except _Stop:
            pass
    if len(batch.calls) != last + 1:
        raise RuntimeError(f"the model called {len(batch.calls)} of its decoder layers, expected {last + 1}")


def _through(lm: LoadedModel, batch: Batch, index: int, block: nn.Module) -> None:
    call = batch.calls[index]
    assert call is not None and batch.hidden is not None
    batch.calls[index] = None  # what is left of this batch's arguments goes with the last layer using it
    args, kwargs = call
    if batch.keyword:
        out = block(hidden_states=batch.hidden, **kwargs)
    else:
        out = block(batch.hidden, *args, **kwargs)
    batch.hidden = out if isinstance(out, torch.Tensor) else out[0]


@torch.inference_mode()
def run_layers(
    lm: LoadedModel,
    parts: list[tuple[int, torch.Tensor]],
    progress: bool = False,
    desc: str = "layers",
    owner: object = None,
    through: int | None = None,
) -> list[Batch]:
    """Every batch `(start, ids)` of `parts` through decoder layers 0..`through` (all by default), one layer
    resident at a time; `owner.window_offset` is the start of the batch a layer is running. Returns the
    batches with their last hidden state."""
    store = lm.store
    assert store is not None, "run_layers needs a model loaded with execution=layerwise"
    last = store.n_layers - 1 if through is None else through
    batches = [Batch(start, ids) for start, ids in parts]
    if not batches:  # nothing to run (a resumed evaluation): no layer is read
        return batches
    for batch in batches:
        _capture(lm, batch, last)
    for index in tqdm(range(last + 1), desc=f"{desc} (layers)", unit="layer", disable=not progress):
        with store.layer(index) as block:
            for batch in batches:
                if owner is not None:
                    owner.window_offset = batch.start  # type: ignore[attr-defined]
                _through(lm, batch, index, block)
    return batches


@torch.inference_mode()
def head_logits(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """All logits of a batch whose hidden state passed every layer: the model's forward replayed with
    stand-ins that hand the stored final hidden state to its final norm and lm_head."""
    last = lm.n_layers - 1

    def replay(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        assert batch.hidden is not None
        return batch.hidden if index == last else _hidden(args, kwargs)

    with _standing(lm, replay):
        return lm.model(input_ids=batch.ids.to(lm.input_device), use_cache=False).logits
