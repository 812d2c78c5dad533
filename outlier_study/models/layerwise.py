"""Models larger than memory: the model built without weights, its decoder layers read from the checkpoint's
safetensors shards one at a time (`execution=layerwise`).

The model object is the unmodified HF model, built on the meta device from its config (accelerate's
`init_empty_weights`, buffers real so rotary tables and masks come from the model's own `__init__`). The
parts outside the decoder layers (embeddings, final norm, lm_head, whatever a family has there) are read
once and stay resident; a decoder layer is read when `LayerStore.layer(i)` enters and its parameters are
put back on the meta device when it exits. Hooks sit on the module objects, which never change, so every
tap, reducer and hook-based intervention works on a layer while it is materialized; a weight edit is
written into each layer as it is read (`LayerStore.editing`).

A shard file is opened for one read and closed after it, so no mapping outlives the tensors read through
it (safetensors maps the file; a handle kept open would keep every page read through it resident).
Nothing holds a full state dict: a layer's tensors are read by name, and tensors stored in float32 and
used in float32 are the mapped pages themselves.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from outlier_study.errors import ConfigError

INDEX = "model.safetensors.index.json"
USE_MEMORY = ["memory"]


def _refuse(message: str) -> ConfigError:
    return ConfigError("execution", f"layerwise {message}; run it with execution=memory", USE_MEMORY)


class Shards:
    """Which safetensors file of a checkpoint folder holds each tensor (the index's weight map, or the
    headers of the folder's files when there is no index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as fh:
                    self.files |= dict.fromkeys(fh.keys(), path)
        if not self.files:
            raise _refuse(f"reads the checkpoint's safetensors files, and {str(folder)!r} has none")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _by_file(self, names: Iterable[str]) -> dict[Path, list[str]]:
        grouped: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            grouped[self.files[name]].append(name)
        return grouped

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """The shapes from the file headers (no tensor data is read)."""
        out: dict[str, tuple[int, ...]] = {}
        for path, group in self._by_file(names).items():
            with safe_open(str(path), framework="pt") as fh:
                out |= {name: tuple(fh.get_slice(name).get_shape()) for name in group}
        return out

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors, each file opened once and closed before returning."""
        out: dict[str, torch.Tensor] = {}
        for path, group in self._by_file(names).items():
            with safe_open(str(path), framework="pt") as fh:
                out |= {name: fh.get_tensor(name) for name in group}
        return out


@dataclass(frozen=True)
class _Entry:
    """One tensor of the model: the names it has in the model (several when tied) and in the checkpoint."""

    names: tuple[str, ...]
    key: str
    parameter: bool


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _model_names(model: PreTrainedModel, keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """model name -> checkpoint key, by transformers' own renaming of checkpoint keys at load time (legacy
    names, a base model's prefix added or stripped), and the keys that need one of its conversions (fused
    or split tensors, e.g. a MoE layer's experts), which are not read here."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    names: dict[str, str] = {}
    converted = []
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            names.setdefault(name, key)
        else:
            converted.append(key)
    return names, converted


class LayerStore:
    """The resident parts of a weightless model, and its decoder layers read on demand.

    `layer(i)` materializes decoder layer i for the `with` body and drops it after; the parameters'
    original meta tensors are put back, so the model's structure (and every hook) is the same before and
    after. Floating tensors are cast to `dtype` on `device` as the in-memory load casts them."""

    def __init__(
        self, model: PreTrainedModel, layers_path: str, shards: Shards, dtype: torch.dtype, device: str
    ) -> None:
        self.model, self.shards, self.dtype, self.device = model, shards, dtype, torch.device(device)
        self.blocks: nn.ModuleList = model.get_submodule(layers_path)  # type: ignore[assignment]
        self.n_layers = len(self.blocks)
        self.reads = 0  # layers read so far (tests and the benchmark count them)
        self._edits: list[Callable[[int, nn.Module], None]] = []
        prefix = layers_path + "."
        tied: dict[int, list[str]] = defaultdict(list)
        for name, param in model.named_parameters(remove_duplicate=False):
            tied[id(param)].append(name)
        groups = [(tuple(names), True) for names in tied.values()]
        params = {name for names in tied.values() for name in names}
        groups += [((name,), False) for name in model.state_dict() if name not in params]
        self.entries: dict[int | None, list[_Entry]] = defaultdict(list)
        checkpoint, converted = _model_names(model, shards.files)
        missing = []
        for names, parameter in groups:
            key = next((checkpoint[n] for n in names if n in checkpoint), None)
            if key is None:
                if parameter:
                    missing.append(names[0])
                continue  # a persistent buffer the checkpoint lacks keeps its value from __init__
            self.entries[_layer_index(names[0], prefix)].append(_Entry(names, key, parameter))
        if missing:
            why = f" (it stores {converted[0]!r}, converted by transformers at load)" if converted else ""
            raise _refuse(
                f"reads each tensor under the model's name, and the checkpoint has no {missing[0]!r} "
                f"({len(missing) - 1} more missing){why}"
            )
        self._check_shapes()
        # each layer's meta parameters, by name inside the layer: what `layer` puts back
        self._meta = [dict(block.named_parameters(remove_duplicate=False)) for block in self.blocks]

    def _check_shapes(self) -> None:
        """Every tensor's shape in the checkpoint against the model's, before any data is read."""
        entries = [e for group in self.entries.values() for e in group]
        shapes = self.shards.shapes(e.key for e in entries)
        state = self.model.state_dict(keep_vars=True)
        for e in entries:
            want = tuple(state[e.names[0]].shape)
            if shapes[e.key] != want:
                raise _refuse(
                    f"needs the model's tensor layout: {e.key!r} is {shapes[e.key]} in the checkpoint, "
                    f"{want} in the model (a checkpoint that transformers converts while loading)"
                )

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)

    def _assign(self, entries: list[_Entry]) -> None:
        tensors = self.shards.read(e.key for e in entries)
        for e in entries:
            value = self._place(tensors.pop(e.key))
            if e.parameter:
                param = nn.Parameter(value, requires_grad=False)
                for name in e.names:  # tied names share one Parameter, as in the in-memory model
                    module, leaf = _owner(self.model, name)
                    module._parameters[leaf] = param  # noqa: SLF001
            else:
                module, leaf = _owner(self.model, e.names[0])
                module._buffers[leaf] = value  # noqa: SLF001

    def load_resident(self) -> None:
        """The parts outside the decoder layers, and the real buffers moved to the device and dtype."""
        self._assign(self.entries[None])
        for name, buffer in list(self.model.named_buffers(remove_duplicate=False)):
            if not buffer.is_meta:
                module, leaf = _owner(self.model, name)
                module._buffers[leaf] = self._place(buffer)  # noqa: SLF001

    @contextmanager
    def editing(self, edit: Callable[[int, nn.Module], None]) -> Iterator[None]:
        """`edit(index, layer)` applied to each layer right after it is read, for the `with` body: how a
        weight edit reaches a model whose layers exist only while they run. Each read starts from the
        checkpoint again, so no edit outlives its `with` body."""
        self._edits.append(edit)
        try:
            yield
        finally:
            self._edits.remove(edit)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights for the `with` body; back on the meta device after."""
        block = self.blocks[index]
        saved = dict(block.named_buffers(remove_duplicate=False))
        self._assign(self.entries[index])
        self.reads += 1
        try:
            with torch.no_grad():
                for edit in self._edits:
                    edit(index, block)
            yield block
        finally:
            for name, meta in self._meta[index].items():
                module, leaf = _owner(block, name)
                module._parameters[leaf] = meta  # noqa: SLF001
            for name, buffer in saved.items():
                module, leaf = _owner(block, name)
                module._buffers[leaf] = buffer  # noqa: SLF001


def _layer_index(name: str, prefix: str) -> int | None:
    """The decoder layer a tensor belongs to (None: a resident part)."""
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def skeleton(config: Any, attn_implementation: str, trust_remote_code: bool, dtype: torch.dtype) -> Any:
    """The model without weights: parameters on the meta device, buffers computed by its own `__init__`,
    tied weights tied, cast to `dtype` as the in-memory load casts its model (buffers included)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    model.tie_weights()
    return model.to(dtype=dtype).eval()


@dataclass
class Checkpoint:
    """Where a layerwise model's tensors are read from, and the config its skeleton is built from."""

    folder: Path
    config: Any
    keep: Any = None  # a temporary folder's owner: the folder goes when the loaded model goes


# model.source -> its checkpoint: (model config, Location or None, cache root, the in-memory build of a
# random model) -> Checkpoint
Source = Callable[[Any, Any, Path, Callable[[], nn.Module]], Checkpoint]


def _config(folder: Path, cfg: Any) -> Any:
    return AutoConfig.from_pretrained(folder, trust_remote_code=bool(cfg.trust_remote_code))


def _random(cfg: Any, loc: Any, cache_root: Path, build: Callable[[], nn.Module]) -> Checkpoint:
    """A random model's weights exist only once it is built: built as the in-memory load builds it (same
    seed, same config object), saved under its own tensor names (tied ones once) to a temporary folder
    that lives as long as the loaded model."""
    tmp = tempfile.TemporaryDirectory(prefix="outlier-study-layerwise-")
    model = build()
    save_model(model, str(Path(tmp.name) / "model.safetensors"))
    return Checkpoint(Path(tmp.name), model.config, tmp)


def _gguf(cfg: Any, loc: Any, cache_root: Path, build: Callable[[], nn.Module]) -> Checkpoint:
    """A GGUF file is dequantized once into the conversion cache (as the in-memory load does); the layers
    are read from that safetensors copy."""
    from outlier_study.models.loader import convert_gguf  # the loader imports this module

    folder = Path(loc.converted) if loc.converted is not None else convert_gguf(loc, cache_root)
    return Checkpoint(folder, _config(folder, cfg))


def _local(cfg: Any, loc: Any, cache_root: Path, build: Callable[[], nn.Module]) -> Checkpoint:
    folder = Path(loc.where)
    return Checkpoint(folder, _config(folder, cfg))


def _hub(cfg: Any, loc: Any, cache_root: Path, build: Callable[[], nn.Module]) -> Checkpoint:
    """The hub snapshot's config, code and safetensors files (from the local cache when offline)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *(["*.py"] if cfg.trust_remote_code else [])]
    folder = Path(snapshot_download(str(cfg.hub_id), revision=cfg.revision, allow_patterns=patterns))
    return Checkpoint(folder, _config(folder, cfg))


SOURCES: dict[str, Source] = {
    "random": _random,
    "gguf": _gguf,
    "embedded": _gguf,
    "local": _local,
    "hub": _hub,
}


@dataclass
class Layerwise:
    """What a layerwise model keeps besides the model: its layer store and the checkpoint it reads."""

    store: LayerStore
    checkpoint: Checkpoint


def build_layerwise(
    cfg: Any,
    loc: Any,
    layers_path: str,
    dtype: torch.dtype,
    device: str,
    cache_root: Path,
    build_random: Callable[[], nn.Module],
) -> tuple[PreTrainedModel, Layerwise]:
    """The weightless model with its resident parts read, and the store its layers are read from."""
    checkpoint = SOURCES[str(cfg.source)](cfg, loc, cache_root, build_random)
    model = skeleton(checkpoint.config, str(cfg.attn_implementation), bool(cfg.trust_remote_code), dtype)
    store = LayerStore(model, layers_path, Shards(checkpoint.folder), dtype, device)
    store.load_resident()
    return model, Layerwise(store=store, checkpoint=checkpoint)
