"""Keep loaded models between the jobs of an in-process multirun, and prove each one unchanged before reuse.

A sweep of interventions on one model would otherwise reload (and for GGUF, re-dequantize) it per job. Every
intervention restores the model bit-exactly, but a reused model is only handed out again after a check: no
hooks left on any module, eval mode, and either no parameter written since it was stored (tensor version
counters) or, if one was, the same per-parameter checksums of the bit patterns as when it was stored. A model
that fails the check is dropped and loaded afresh.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from outlier_study.models.loader import LoadedModel, load_model, load_tokenizer


@dataclass
class _Entry:
    lm: LoadedModel
    versions: list[int]
    checksums: torch.Tensor


def _resident(lm: LoadedModel) -> list[torch.nn.Parameter]:
    """The parameters held in memory (a layerwise model's decoder layers are read afresh every time)."""
    return [p for p in lm.model.parameters() if not p.is_meta]


def _versions(lm: LoadedModel) -> list[int]:
    return [p._version for p in _resident(lm)]  # noqa: SLF001 (bumped by every in-place write)


def bit_checksum(t: torch.Tensor) -> torch.Tensor:
    """Wrapping int64 sum of a tensor's raw bytes read as 8-byte words (1- or 2-byte ones for a size that is
    no multiple of 8): any changed bit changes it, and unlike a float64 sum it needs no upcast copy of the
    tensor, so a 135M-parameter model is checked in one read instead of a copy and a read."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    n = data.numel()
    if n % 8 == 0:
        return data.view(torch.int64).sum()
    word = torch.int16 if n % 2 == 0 else torch.uint8
    return data.view(word).sum(dtype=torch.int64)


@torch.no_grad()
def _checksums(lm: LoadedModel) -> torch.Tensor:
    return torch.stack([bit_checksum(p).cpu() for p in _resident(lm)])


def _clean(lm: LoadedModel) -> bool:
    """No forward (pre-)hooks anywhere and eval mode: what every job expects of a freshly loaded model."""
    for module in lm.model.modules():
        if module._forward_hooks or module._forward_pre_hooks or module.training:  # noqa: SLF001
            return False
    return True


class ModelReuse:
    """A bounded LRU of loaded models keyed by (model config, dtype, device)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.loads = 0  # how many real loads happened (for tests and the benchmark)
        self.last_reused = False  # whether the last `get` handed out a stored model (recorded in env.json)

    @staticmethod
    def key(model_cfg: Any, dtype: str, device: str, execution: str = "memory") -> str:
        data = (
            OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else model_cfg
        )
        where = {"dtype": str(dtype), "device": str(device), "execution": str(execution)}
        return json.dumps({"model": data, **where}, sort_keys=True, default=str)

    def tokenizer(
        self, model_cfg: Any, dtype: str, device: str, cache_root: str | Path, execution: str = "memory"
    ) -> Any:
        """The tokenizer of the stored model, else one loaded on its own (no weights): a sweep's jobs share
        one tokenizer object instead of loading it per job."""
        entry = self._entries.get(self.key(model_cfg, dtype, device, execution))
        return entry.lm.tokenizer if entry is not None else load_tokenizer(model_cfg, cache_root)

    def get(
        self,
        model_cfg: Any,
        dtype: str,
        device: str,
        cache_root: str | Path,
        keep: int,
        tokenizer: Any = None,
        execution: str = "memory",
    ) -> LoadedModel:
        """The stored model when it is provably unchanged, else a fresh load (with `tokenizer` when given);
        at most `keep` stay stored."""
        key = self.key(model_cfg, dtype, device, execution)
        entry = self._entries.pop(key, None) if keep > 0 else None
        if entry is not None and self._unchanged(entry):
            lm, checksums = entry.lm, entry.checksums
            self.last_reused = True
        else:
            self.last_reused = False
            if entry is not None:
                print("stored model was modified (or left hooked) by an earlier job: loading it again")
            entry = None
            self._evict(max(0, keep - 1))  # free memory before loading another model
            lm = load_model(model_cfg, dtype, device, cache_root, tokenizer, execution)
            self.loads += 1
            checksums = _checksums(lm) if keep > 0 else torch.empty(0)
        if keep > 0:
            self._entries[key] = _Entry(lm, _versions(lm), checksums)
        self._evict(keep)
        return lm

    @staticmethod
    def _unchanged(entry: _Entry) -> bool:
        if not _clean(entry.lm):
            return False
        if _versions(entry.lm) == entry.versions:
            return True
        return torch.equal(_checksums(entry.lm), entry.checksums)

    def _evict(self, keep: int) -> None:
        while len(self._entries) > keep:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


MODELS = ModelReuse()
