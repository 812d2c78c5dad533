"""Every option checked before any work: first against the schemas (keys, types, bounds), then against
the model's architecture as its config describes it (tap and layer names of every option, windows against
each other). Both stages run before the model's weights are loaded, so bad input costs seconds.

The experiment, intervention and method groups hold one schema per option, declared with the option's
code; a key that belongs to another option is a one-line error naming the key and the option.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from outlier_study.config.options import check_bounds, item_schema
from outlier_study.config.schema import QuantConfig, RootConfig
from outlier_study.config.vocab import Device, ReducerKind
from outlier_study.errors import ConfigError, require

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch
    from outlier_study.registry import Registry

OPTION_GROUPS: tuple[str, ...] = ("experiment", "intervention", "method")


def option_registries() -> dict[str, Registry[Any]]:
    """The registry behind each option group (imported here: they pull in torch)."""
    from outlier_study.experiments import EXPERIMENTS
    from outlier_study.interventions import INTERVENTIONS
    from outlier_study.quant.methods import METHODS

    return {"experiment": EXPERIMENTS, "intervention": INTERVENTIONS, "method": METHODS}


def option_keys(group: str, name: str) -> list[str]:
    """The config keys of one option (e.g. experiment fig7), for error messages and the reference."""
    entry = option_registries()[group].get(name)
    return [f.name for f in dataclasses.fields(entry.options)]


def _keys_of(object_type: Any) -> list[str] | None:
    return (
        [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else None
    )


def _merge(schema: type, data: Any, prefix: str, owner: str | None = None) -> DictConfig:
    """`data` merged into `schema`; an unknown key, a wrong type or a value outside an enum is one line."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), data)  # type: ignore[return-value]
    except ConfigKeyError as err:
        where = ".".join(p for p in (prefix, str(err.full_key or err.key)) if p)
        what = f"not a key of {owner}" if owner else f"unknown key '{err.key}'"
        raise ConfigError(where, what, allowed=_keys_of(err.object_type)) from None
    except OmegaConfBaseException as err:
        where = ".".join(p for p in (prefix, str(getattr(err, "full_key", "") or "")) if p)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(where or prefix, message) from None


def _merge_items(schema: type, data: dict[str, Any], prefix: str) -> None:
    """The entries of list-of-schema fields one by one, so a bad entry is named `field[i].key` (merging
    the whole list would lose the index)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        item, value = item_schema(hints[f.name]), data.get(f.name)
        if item is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                where = f"{prefix}.{f.name}[{i}]"
                require(isinstance(entry, dict), where, f"not a mapping: {entry!r}", _keys_of(item))
                _merge(item, entry, where, owner=f"{prefix}.{f.name} entries")


def typed_config(cfg: DictConfig) -> DictConfig:
    """The composed config checked against the root schema and each option against its own schema (keys,
    types, enums, bounds); returns it typed (enums as members, numbers as numbers)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    groups = {g: plain.pop(g, None) for g in OPTION_GROUPS}
    root = _merge(RootConfig, plain, "")
    for group, node in groups.items():
        require(isinstance(node, dict), group, f"the {group} group is not set")
        assert isinstance(node, dict)
        registry = option_registries()[group]
        entry = registry.get(node.get("name"))
        _merge_items(entry.options, node, group)
        options = _merge(entry.options, node, group, owner=f"{group} '{node['name']}'")
        check_bounds(entry.options, options, group)
        OmegaConf.update(root, group, options, force_add=True, merge=False)
    check_bounds(RootConfig, root, "")
    require(
        root.reducer != ReducerKind.fused or root.device == Device.cpu,
        "reducer",
        f"fused reads CPU tensors, but device={root.device}",
        [ReducerKind.auto, ReducerKind.reference, ReducerKind.device],
    )
    from outlier_study.measure.zeroshot import include_folder
    from outlier_study.quant.weights import WEIGHT_QUANTIZERS
    from outlier_study.sweep.tracker import check_config as check_logger

    WEIGHT_QUANTIZERS.get(root.quant.weights)
    check_logger(root)

    include_folder(root.eval)  # a missing folder is refused before the tasks are looked up in it
    return root


@dataclass(frozen=True)
class Plan:
    """What the config means for this model: the taps and layers to measure."""

    taps: list[str]
    layers: list[int]


def _is_default(cfg: DictConfig, group: str) -> bool:
    """Whether an option group is left at its neutral choice (the unmodified model, no quantization)."""
    if group == "quant":
        return OmegaConf.to_container(cfg.quant) == OmegaConf.to_container(OmegaConf.structured(QuantConfig))
    if group == "eval":
        return len(cfg.eval.tasks) == 0
    return str(cfg[group].name) == "none"


def check_execution(cfg: DictConfig) -> None:
    """execution=layerwise holds one decoder layer at a time, so only what acts through forward passes runs
    (each registry entry says whether it does: `layerwise`); a GGUF source is read from its converted copy."""
    if str(cfg.execution) != "layerwise":
        return
    registries = option_registries()
    experiment = registries["experiment"].get(cfg.experiment.name)
    why = "needs every layer's weights at once, and layerwise holds one layer at a time"
    require(
        experiment.layerwise,
        "execution",
        f"experiment '{cfg.experiment.name}' {why}; run it with execution=memory",
        ["memory"],
    )
    for group in ("intervention", "method"):
        entry = registries[group].get(cfg[group].name)
        if group in experiment.uses:
            require(
                entry.layerwise,
                "execution",
                f"{group} '{cfg[group].name}' {why}; run it with execution=memory",
                ["memory"],
            )
    require(
        len(cfg.eval.tasks) == 0,
        "execution",
        "zero-shot evaluation (eval.tasks) runs lm-eval on the whole in-memory model; run it with "
        "execution=memory",
        ["memory"],
    )
    require(
        bool(cfg.model.cache_converted) or str(cfg.model.source) not in ("gguf", "embedded"),
        "model.cache_converted",
        "execution=layerwise reads the layers from the converted safetensors copy of a GGUF file",
        ["true"],
    )


def check_for_model(cfg: DictConfig, arch: Arch) -> Plan:
    """Every name and index in the config against the model's architecture, and what the experiment uses."""
    taps = arch.taps(None if cfg.taps is None else list(cfg.taps), "taps")
    layers = arch.layers(None if cfg.layers is None else list(cfg.layers), "layers")
    if arch.max_context is not None:
        seq_len = int(cfg.dataset.seq_len)
        require(
            seq_len <= arch.max_context,
            "dataset.seq_len",
            f"{seq_len} exceeds the model's context of {arch.max_context} positions",
            [f"1..{arch.max_context}"],
        )
    registries = option_registries()
    experiment = registries["experiment"].get(cfg.experiment.name)
    for group in ("intervention", "method", "quant", "eval"):
        if group not in experiment.uses and not _is_default(cfg, group):
            users = [n for n, e in registries["experiment"].items() if group in e.uses]
            raise ConfigError(
                group,
                f"experiment '{cfg.experiment.name}' does not use the {group} group; leave it at none, "
                "or run an experiment that does",
                allowed=users,
            )
    check_execution(cfg)
    if experiment.check is not None:
        experiment.check(cfg.experiment, cfg, arch)
    for group in ("intervention", "method"):
        entry = registries[group].get(cfg[group].name)
        if group in experiment.uses and entry.check is not None:
            entry.check(cfg[group], cfg, arch)
    if cfg.eval.tasks:
        from outlier_study.measure.zeroshot import check_tasks

        check_tasks(cfg.eval)
    return Plan(taps=taps, layers=layers)
