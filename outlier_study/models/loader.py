"""Load any supported checkpoint into an unmodified HF model, with its tokenizer and provenance.

`describe_model` reads only the checkpoint's config (no weights), so every option can be checked against
the model's family, depth and context before the load; `load_model` then builds the model. Every way a
source can be unusable (missing, corrupt, offline, not a decoder we know) is a one-line ConfigError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from outlier_study.adapters import Adapter, Arch, arch_of
from outlier_study.errors import ConfigError, require
from outlier_study.models.embedded import embedded_gguf
from outlier_study.models.layerwise import LayerStore, Layerwise, build_layerwise
from outlier_study.models.tiny import TINY_ARCHS, byte_tokenizer, tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_HINT = (
    "the network is off (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache; download it once "
    "with network, or save it with save_pretrained and use model=local model.path=DIR"
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Arch
    info: dict[str, Any] = field(default_factory=dict)
    layerwise: Layerwise | None = None  # execution=layerwise: the decoder layers are read on demand

    @property
    def store(self) -> LayerStore | None:
        """Where a layerwise model's decoder layers come from; None when the whole model is resident."""
        return None if self.layerwise is None else self.layerwise.store

    @property
    def adapter(self) -> Adapter:
        return self.arch.adapter

    def blocks_with_weights(self, layers: Iterable[int]) -> Iterator[tuple[int, torch.nn.Module]]:
        """(layer, decoder layer module) of each of `layers` with its weights, for code that reads weights
        outside a forward pass: the resident module, or, layerwise, the layer read for the loop body and
        dropped when the loop moves on."""
        blocks = self.adapter.blocks(self.model)
        for layer in layers:
            if self.store is None:
                yield layer, blocks[layer]
            else:
                with self.store.layer(layer) as block:
                    yield layer, block

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


@dataclass(frozen=True)
class Location:
    """Where a config's weights are: a folder or hub id for from_pretrained, or a GGUF file (with the
    folder of its cached conversion, when there is one)."""

    where: str
    gguf: Path | None = None
    converted: Path | None = None


def _file_key(path: Path, probe: int = 1 << 20) -> str:
    """Cheap content identity of a large file (size, first and last MiB) for the conversion cache: the
    same GGUF installed in another virtual environment reuses its conversion."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(probe))
        fh.seek(max(0, size - probe))
        digest.update(fh.read(probe))
    return digest.hexdigest()[:16]


def _check_writable(folder: Path) -> None:
    """The conversion cache must take files before minutes of dequantizing are spent on a model."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe"):
            pass
    except OSError as err:
        raise ConfigError(
            "paths.model_cache",
            f"cannot write the model cache {str(folder)!r}: {err.strerror or type(err).__name__}; set "
            "OUTLIER_STUDY_CACHE to a writable folder (or model.cache_converted=false for a .gguf file)",
        ) from None


def locate(cfg: Any, cache_root: Path) -> Location:
    """Resolve the source of a ModelConfig to a place on disk or the hub; missing sources are one line."""
    source = str(cfg.source)
    if source == "hub":
        require(bool(cfg.hub_id), "model.hub_id", "a hub repo id is required for source=hub")
        return Location(str(cfg.hub_id))
    if source == "local":
        require(bool(cfg.path), "model.path", "a directory is required for source=local")
        where = Path(str(cfg.path)).expanduser()
        require(where.is_dir(), "model.path", f"no such directory: {where}")
        require(
            (where / "config.json").is_file(),
            "model.path",
            f"no config.json in {str(where)!r} (a save_pretrained folder)",
        )
        return Location(str(where))
    if cfg.cache_converted or source == "embedded":
        _check_writable(cache_root)
    if source == "gguf":
        require(bool(cfg.path), "model.path", "a .gguf file is required for source=gguf")
        path = Path(str(cfg.path)).expanduser()
        require(path.is_file(), "model.path", f"no such GGUF file: {path}")
    else:
        require(bool(cfg.package), "model.package", "a package name is required for source=embedded")
        path = embedded_gguf(str(cfg.package), cache_root)
    converted = cache_root / f"{path.stem}-{_file_key(path)}"
    usable = cfg.cache_converted and (converted / ".complete").exists()
    return Location(str(path.parent), gguf=path, converted=converted if usable else None)


def _field(cfg: Any) -> str:
    return {"hub": "model.hub_id", "embedded": "model.package"}.get(str(cfg.source), "model.path")


def _config_error(cfg: Any, loc: Location, err: Exception) -> ConfigError:
    """A transformers / hub error while reading a checkpoint as one line naming the source field."""
    name = loc.gguf or loc.where
    text = " ".join(str(err).split())
    if isinstance(err, LocalEntryNotFoundError) or "offline" in text.lower() or "couldn't connect" in text:
        return ConfigError(_field(cfg), f"'{name}': {OFFLINE_HINT}")
    if loc.gguf is not None:
        return ConfigError(
            _field(cfg), f"'{name}' is not a readable GGUF file ({type(err).__name__}: {text[:160]})"
        )
    if isinstance(err, json.JSONDecodeError) or "valid JSON" in text:
        return ConfigError(_field(cfg), f"'{name}': config.json is not valid JSON")
    return ConfigError(
        _field(cfg), f"cannot read the checkpoint '{name}' ({type(err).__name__}: {text[:200]})"
    )


def _read_config(cfg: Any, loc: Location) -> Any:
    if loc.converted is not None:
        return AutoConfig.from_pretrained(loc.converted)
    if loc.gguf is not None:
        return AutoConfig.from_pretrained(loc.where, gguf_file=loc.gguf.name)
    return AutoConfig.from_pretrained(
        loc.where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )


def describe_model(cfg: Any, cache_root: str | Path) -> Arch:
    """The model's family, depth and context from its config alone (no weights are read)."""
    if str(cfg.source) == "random":
        require(
            cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            "model.model_type",
            f"no causal LM family {cfg.model_type!r} in transformers",
            [*sorted(TINY_ARCHS), "<any model_type of transformers' causal LMs>"],
        )
        try:
            config = tiny_config(cfg.model_type, dict(cfg.arch))
        except Exception as err:  # transformers validates its config classes on creation, in several ways
            reason = " ".join(str(err).split())[:200]
            why = f"transformers refuses this {cfg.model_type} config: {reason}"
            raise ConfigError("model.arch", why) from None
        return _checked(cfg, arch_of(config))
    loc = locate(cfg, Path(cache_root))
    try:
        config = _read_config(cfg, loc)
    except Exception as err:  # OSError, JSON errors, and struct.error & co. from a truncated GGUF
        raise _config_error(cfg, loc, err) from None
    return _checked(cfg, arch_of(config))


def _checked(cfg: Any, arch: Arch) -> Arch:
    """The family is known (arch_of refused it otherwise); now its attention implementation, before any
    implementation is chosen for it."""
    impl = str(cfg.attn_implementation)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(arch.config)]
    supported = {
        "sdpa": getattr(model_class, "_supports_sdpa", False),
        "flex_attention": getattr(model_class, "_supports_flex_attn", False),
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", False),
        "eager": True,
    }
    allowed = [name for name, ok in supported.items() if ok]
    require(
        impl not in supported or supported[impl],
        "model.attn_implementation",
        f"{arch.adapter.family} models do not support '{impl}' attention",
        allowed,
    )
    return arch


def _load_gguf(loc: Location, cache_root: Path, use_cache: bool) -> tuple[PreTrainedModel, Path | None]:
    """Dequantize a GGUF once; later loads read the saved safetensors copy (seconds instead of minutes)."""
    assert loc.gguf is not None
    if loc.converted is not None:
        return AutoModelForCausalLM.from_pretrained(loc.converted), loc.converted
    model = AutoModelForCausalLM.from_pretrained(loc.where, gguf_file=loc.gguf.name, dtype=torch.float32)
    # transformers dequantizes GGUF to plain float tensors but keeps a quantizer record that forbids saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not use_cache:
        return model, None
    cached = cache_root / f"{loc.gguf.stem}-{_file_key(loc.gguf)}"
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(loc.where, gguf_file=loc.gguf.name).save_pretrained(tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    return model, cached


def convert_gguf(loc: Location, cache_root: Path) -> Path:
    """Dequantize a GGUF into the conversion cache without keeping the model (the layerwise load reads the
    cached copy); the folder of the copy."""
    _, cached = _load_gguf(loc, cache_root, use_cache=True)
    assert cached is not None
    return cached


def _random_model(cfg: Any) -> Any:
    """A tiny random model: the same seed gives the same weights in either execution."""
    torch.manual_seed(cfg.init_seed)
    config = tiny_config(cfg.model_type, dict(cfg.arch))
    return AutoModelForCausalLM.from_config(config, attn_implementation=str(cfg.attn_implementation))


def _provenance(cfg: Any, loc: Location | None) -> dict[str, Any]:
    if loc is None:
        return {"model_type": cfg.model_type, "init_seed": cfg.init_seed}
    if loc.gguf is not None:
        return {"gguf_file": str(loc.gguf), "package": cfg.package}
    return {"hub_id": cfg.hub_id, "revision": cfg.revision, "path": cfg.path}


def _build(
    cfg: Any, loc: Location | None, dtype: torch.dtype, device: str, cache_root: Path
) -> tuple[Any, dict]:
    """The model and what to record about its source."""
    common: dict[str, Any] = {"attn_implementation": str(cfg.attn_implementation)}
    if loc is None:
        return _random_model(cfg), _provenance(cfg, loc)
    if loc.gguf is not None:
        model, cached = _load_gguf(loc, cache_root, bool(cfg.cache_converted))
        model.set_attn_implementation(str(cfg.attn_implementation))
        return model, {**_provenance(cfg, loc), "converted_cache": str(cached) if cached else None}
    if device == "auto":
        common["device_map"] = "auto"
    revision = cfg.revision if str(cfg.source) == "hub" else None
    model = AutoModelForCausalLM.from_pretrained(
        loc.where, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=revision, **common
    )
    return model, _provenance(cfg, loc)


def load_tokenizer(cfg: Any, cache_root: str | Path) -> Any:
    """The tokenizer `cfg` names (model.tokenizer, else the checkpoint's own), loaded without the weights so
    the corpus can be cut into windows, and checked against them, before the model loads."""
    if cfg.tokenizer == "bytes":
        return byte_tokenizer()
    if cfg.tokenizer:
        folder = Path(str(cfg.tokenizer)).expanduser()
        require(
            folder.is_dir(), "model.tokenizer", f"no such folder: {folder}", ["bytes", "<a tokenizer folder>"]
        )
        where, extra = str(folder), {}
    elif str(cfg.source) == "random":
        raise ConfigError(
            "model.tokenizer", "a random model needs a tokenizer", ["bytes", "<a tokenizer folder>"]
        )
    else:
        loc = locate(cfg, Path(cache_root))
        if loc.converted is not None:
            where, extra = str(loc.converted), {}
        elif loc.gguf is not None:
            where, extra = loc.where, {"gguf_file": loc.gguf.name}
        else:
            where, extra = loc.where, {"revision": cfg.revision if str(cfg.source) == "hub" else None}
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except Exception as err:
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(
            "model.tokenizer", f"no tokenizer in {where!r} ({type(err).__name__}: {reason})"
        ) from None


def _target(device: str) -> str:
    """The one device of a model that device_map did not place."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _build_layerwise(
    cfg: Any, loc: Location | None, arch: Arch, dtype: torch.dtype, device: str, cache_root: Path
) -> tuple[Any, dict, Layerwise]:
    """The weightless model with its resident parts, and its layer store (execution=layerwise)."""
    model, layerwise = build_layerwise(
        cfg, loc, arch.adapter.layers_path, dtype, _target(device), cache_root, lambda: _random_model(cfg)
    )
    folder = layerwise.checkpoint.folder
    read = {"layers_read_from": None if loc is None else str(folder)}
    return model, {**_provenance(cfg, loc), **read}, layerwise


def load_model(
    cfg: Any,
    dtype: str,
    device: str,
    cache_root: str | Path,
    tokenizer: Any = None,
    execution: str = "memory",
) -> LoadedModel:
    """Build the model that `cfg` (a ModelConfig) names, in `dtype` on `device` (with `tokenizer`, or the
    one `load_tokenizer` gives); `execution=layerwise` builds it without its decoder layers' weights,
    which `LoadedModel.store` reads one layer at a time."""
    dtype, device = str(dtype), str(device)  # StrEnum members or plain strings
    require(dtype in DTYPES, "dtype", f"unknown dtype '{dtype}'", DTYPES)
    require(
        device in ("cpu", "cuda", "auto"), "device", f"unknown device '{device}'", ("cpu", "cuda", "auto")
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but no CUDA device is visible", ("cpu", "cuda", "auto"))
    cache_root = Path(cache_root)
    arch = describe_model(cfg, cache_root)  # the family is known before any implementation is chosen
    tokenizer = load_tokenizer(cfg, cache_root) if tokenizer is None else tokenizer
    loc = None if str(cfg.source) == "random" else locate(cfg, cache_root)
    layerwise = None
    try:
        if str(execution) == "layerwise":
            model, provenance, layerwise = _build_layerwise(cfg, loc, arch, DTYPES[dtype], device, cache_root)
        else:
            model, provenance = _build(cfg, loc, DTYPES[dtype], device, cache_root)
    except ConfigError:
        raise
    except ImportError as err:  # an attention implementation whose package is not installed
        raise ConfigError(
            "model.attn_implementation",
            f"'{cfg.attn_implementation}' cannot be used here ({' '.join(str(err).split())[:160]})",
            allowed=("sdpa", "eager", "flex_attention"),
        ) from None
    except (ValueError, OSError) as err:  # a corrupt or incomplete checkpoint
        raise _config_error(cfg, loc or Location(str(cfg.model_type)), err) from None

    placed = device == "auto" and loc is not None and loc.gguf is None  # device_map="auto" placed it
    if layerwise is None and not placed:
        model = model.to(device=_target(device), dtype=DTYPES[dtype])
    model.eval()
    info: dict[str, Any] = {"name": cfg.name, "source": str(cfg.source), "dtype": dtype, "device": device}
    info["execution"] = str(execution)
    info.update(provenance)
    info.update(
        model_type=model.config.model_type,
        n_layers=arch.n_layers,
        n_params=sum(p.numel() for p in model.parameters()),
        attn_implementation=model.config._attn_implementation,
        commit_hash=getattr(model.config, "_commit_hash", None),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, info=info, layerwise=layerwise)
