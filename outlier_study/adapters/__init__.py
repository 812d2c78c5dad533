"""One adapter per architecture family, chosen from `config.model_type`."""

from __future__ import annotations

from torch import nn

from outlier_study.adapters import gemma3, gpt2, llama
from outlier_study.adapters.base import Adapter, resolve_layers, resolve_taps
from outlier_study.errors import ConfigError

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, gpt2.ADAPTER, gemma3.ADAPTER)
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a loaded HF model; unsupported architectures are a config error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _BY_TYPE:
        raise ConfigError("model", f"unsupported model_type '{model_type}'", allowed=supported_model_types())
    return _BY_TYPE[model_type]


__all__ = ["Adapter", "adapter_for", "resolve_layers", "resolve_taps", "supported_model_types"]
