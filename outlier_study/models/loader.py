"""Load any supported checkpoint into an unmodified HF model, with its tokenizer and provenance."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from outlier_study.adapters import Adapter, adapter_for
from outlier_study.errors import ConfigError, require
from outlier_study.models.embedded import embedded_gguf
from outlier_study.models.tiny import TINY_ARCHS, byte_tokenizer, tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")
SOURCES = ("random", "hub", "local", "gguf", "embedded")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


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


def _load_gguf(path: Path, cache_root: Path, use_cache: bool) -> tuple[PreTrainedModel, Any, Path | None]:
    """Dequantize a GGUF once; later loads read the saved safetensors copy (seconds instead of minutes)."""
    cached = cache_root / f"{path.stem}-{_file_key(path)}"
    if use_cache and (cached / ".complete").exists():
        return AutoModelForCausalLM.from_pretrained(cached), AutoTokenizer.from_pretrained(cached), cached
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers dequantizes GGUF to plain float tensors but keeps a quantizer record that forbids saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if use_cache:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    return model, tokenizer, cached if use_cache else None


def load_model(cfg: Any, dtype: str, device: str, cache_root: str | Path) -> LoadedModel:
    """Build the model that `cfg` (a ModelConfig) names, in `dtype` on `device`."""
    source, dtype = str(cfg.source), str(dtype)  # StrEnum members or plain strings
    require(source in SOURCES, "model.source", f"unknown source '{source}'", SOURCES)
    require(dtype in DTYPES, "dtype", f"unknown dtype '{dtype}'", DTYPES)
    require(device in DEVICES, "device", f"unknown device '{device}'", DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but no CUDA device is visible", DEVICES)
    cache_root = Path(cache_root)
    torch_dtype = DTYPES[dtype]
    common: dict[str, Any] = {"attn_implementation": cfg.attn_implementation}
    info: dict[str, Any] = {"name": cfg.name, "source": source, "dtype": dtype, "device": device}
    tokenizer: Any = None

    if source == "random":
        require(cfg.model_type in TINY_ARCHS, "model.model_type", f"'{cfg.model_type}'", sorted(TINY_ARCHS))
        torch.manual_seed(cfg.init_seed)
        config = tiny_config(cfg.model_type, dict(cfg.arch))
        model = AutoModelForCausalLM.from_config(config, **common)
        info.update(model_type=cfg.model_type, init_seed=cfg.init_seed)
    elif source in ("gguf", "embedded"):
        if source == "gguf":
            require(bool(cfg.path), "model.path", "a .gguf file is required for source=gguf")
            path = Path(cfg.path).expanduser()
            require(path.is_file(), "model.path", f"no such GGUF file: {path}")
        else:
            require(bool(cfg.package), "model.package", "a package name is required for source=embedded")
            path = embedded_gguf(cfg.package, cache_root)
        model, tokenizer, cached = _load_gguf(path, cache_root, cfg.cache_converted)
        model.set_attn_implementation(cfg.attn_implementation)
        info.update(gguf_file=str(path), package=cfg.package, converted_cache=str(cached) if cached else None)
    else:
        if source == "hub":
            require(bool(cfg.hub_id), "model.hub_id", "a hub repo id is required for source=hub")
            where: str = cfg.hub_id
            common["revision"] = cfg.revision
        else:
            require(bool(cfg.path), "model.path", "a directory is required for source=local")
            where = str(Path(cfg.path).expanduser())
            require(Path(where).is_dir(), "model.path", f"no such directory: {where}")
        if device == "auto":
            common["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype, trust_remote_code=cfg.trust_remote_code, **common
        )
        info.update(hub_id=cfg.hub_id, revision=cfg.revision, path=cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(where, revision=cfg.revision)

    if cfg.tokenizer == "bytes":
        tokenizer = byte_tokenizer()
    elif cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(Path(cfg.tokenizer).expanduser())
    require(tokenizer is not None, "model.tokenizer", "this source needs a tokenizer", ["bytes", "<dir>"])

    if "device_map" not in common:
        target = "cuda" if device == "auto" and torch.cuda.is_available() else device
        model = model.to(device="cpu" if target == "auto" else target, dtype=torch_dtype)
    model.eval()
    adapter = adapter_for(model)
    info.update(
        model_type=model.config.model_type,
        n_layers=len(adapter.layers(model)),
        n_params=sum(p.numel() for p in model.parameters()),
        attn_implementation=model.config._attn_implementation,
        commit_hash=getattr(model.config, "_commit_hash", None),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=info)
