"""Architecture families: each adapter is derived from the decoder layer's module names
(`adapters/structure.py`), with the deviations names cannot say kept as tables (`adapters/deviations.py`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from outlier_study.adapters.base import Adapter, Arch
from outlier_study.adapters.scope import out_of_scope
from outlier_study.adapters.structure import derive
from outlier_study.errors import ConfigError, require


def meta_model(config: Any) -> torch.nn.Module:
    """The model a config describes, built on the meta device: its module tree without any weight memory."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


_ADAPTERS: dict[str, Adapter] = {}  # by the config's JSON: one derivation per model per process


def adapter_for_config(config: Any) -> Adapter:
    """The adapter of a transformers config; a family out of scope is a config error with the reason."""
    model_type = str(getattr(config, "model_type", None))
    reason = out_of_scope(model_type, config)
    if reason is not None:
        raise ConfigError("model", f"model_type '{model_type}' is not measured here: {reason}")
    key = config.to_json_string()
    if key not in _ADAPTERS:
        try:
            model = meta_model(config)
        except Exception as err:  # transformers cannot build this config: say why, in one line
            reason = " ".join(str(err).split())[:200]
            raise ConfigError(
                "model", f"transformers cannot build this {model_type} config: {reason}"
            ) from None
        _ADAPTERS[key] = derive(model_type, config, model, int(config.num_hidden_layers))
    return _ADAPTERS[key]


def arch_of(config: Any) -> Arch:
    """What a transformers config says about the model: family, depth and context, no weights needed."""
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    require(n_layers >= 1, "model", f"the config has {n_layers} decoder layers: nothing to measure")
    adapter = adapter_for_config(config)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return Arch(adapter=adapter, config=config, n_layers=n_layers, max_context=context)


__all__ = ["Adapter", "Arch", "adapter_for_config", "arch_of", "meta_model"]
