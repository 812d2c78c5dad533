"""Architecture families: one adapter file each, looked up by the checkpoint's `config.model_type`."""

from __future__ import annotations

from typing import Any

from outlier_study.adapters import gemma3, gpt2, llama
from outlier_study.adapters.base import Adapter, Arch
from outlier_study.errors import ConfigError, require

FAMILIES: tuple[Adapter, ...] = (llama.ADAPTER, gpt2.ADAPTER, gemma3.ADAPTER)
_BY_TYPE = {t: a for a in FAMILIES for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def adapter_for(model_type: str | None) -> Adapter:
    """The adapter of a transformers model_type; an unsupported architecture is a config error."""
    if model_type not in _BY_TYPE:
        raise ConfigError("model", f"unsupported model_type '{model_type}'", allowed=supported_model_types())
    return _BY_TYPE[model_type]


def arch_of(config: Any) -> Arch:
    """What a transformers config says about the model: family, depth and context, no weights needed."""
    adapter = adapter_for(getattr(config, "model_type", None))
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    n_layers = int(config.num_hidden_layers)
    require(n_layers >= 1, "model", f"the config has {n_layers} decoder layers: nothing to measure")
    return Arch(adapter=adapter, config=config, n_layers=n_layers, max_context=context)


__all__ = ["Adapter", "Arch", "adapter_for", "arch_of", "supported_model_types"]
