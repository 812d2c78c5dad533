"""Raw corpus text for each dataset kind, so windows and perplexity share one source of truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from outlier_study.errors import ConfigError, require

DATASET_NAMES: tuple[str, ...] = ("embedded", "local_text", "wikitext2", "c4")

WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
C4_HUB = "allenai/c4"
C4_SHARD = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# wikitext's raw files name the validation split "valid".
_WIKITEXT_FILE_SPLIT = {"validation": "valid", "valid": "valid", "train": "train", "test": "test"}

DOC_SEP = "\n\n"


def enum_value(value: Any) -> Any:
    """Enum fields arrive as members (structured configs) or plain strings (YAML, tests): compare values."""
    return getattr(value, "value", value)


def load_corpus(cfg: Any) -> str:
    """The dataset's raw text, truncated to `cfg.max_chars`; every bad input is a ConfigError."""
    name = enum_value(cfg.name)
    max_chars = getattr(cfg, "max_chars", None)
    if max_chars is not None:
        require(int(max_chars) > 0, "dataset.max_chars", f"must be positive or null, got {max_chars}")
    loaders = {
        "embedded": _embedded,
        "local_text": _local_text,
        "wikitext2": _wikitext2,
        "c4": _c4,
    }
    if name not in loaders:
        raise ConfigError("dataset.name", f"unknown dataset {name!r}", allowed=DATASET_NAMES)
    text = loaders[name](cfg)
    if max_chars is not None:
        text = text[: int(max_chars)]
    return text


def _embedded(cfg: Any) -> str:
    """Python's own pydoc topics: a few hundred KB of English prose available on any machine."""
    from pydoc_data.topics import topics

    return DOC_SEP.join(topics[key] for key in sorted(topics))


def _existing_path(cfg: Any, what: str) -> Path:
    """`cfg.path` as an existing Path, or a ConfigError naming dataset.path."""
    raw = getattr(cfg, "path", None)
    require(raw is not None and str(raw) != "", "dataset.path", f"{what} needs a path")
    path = Path(str(raw)).expanduser()
    require(path.exists(), "dataset.path", f"{str(path)!r} does not exist")
    return path


def _read_text(path: Path) -> str:
    """Text mode with universal newlines, so CRLF files (wikitext raw) read as plain \\n."""
    return path.read_text(encoding="utf-8")


def _local_text(cfg: Any) -> str:
    """A text file, or every *.txt below a folder in sorted order (stable across machines)."""
    path = _existing_path(cfg, "dataset local_text")
    if path.is_file():
        return _read_text(path)
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    require(bool(files), "dataset.path", f"folder {str(path)!r} holds no *.txt files")
    return DOC_SEP.join(_read_text(p) for p in files)


def _wikitext2(cfg: Any) -> str:
    """A local raw file (or a folder with wiki.<split>.raw); else the hub copy, rows joined by blank lines."""
    if getattr(cfg, "path", None):
        path = _existing_path(cfg, "dataset wikitext2")
        if path.is_dir():
            split = str(cfg.split)
            require(
                split in _WIKITEXT_FILE_SPLIT,
                "dataset.split",
                f"unknown split {split!r}",
                allowed=sorted(_WIKITEXT_FILE_SPLIT),
            )
            path = path / f"wiki.{_WIKITEXT_FILE_SPLIT[split]}.raw"
            require(path.is_file(), "dataset.path", f"{str(path)!r} does not exist")
        return _read_text(path)
    import datasets

    rows = datasets.load_dataset(*WIKITEXT2_HUB, split=str(cfg.split))
    return DOC_SEP.join(rows["text"])


def _c4(cfg: Any) -> str:
    """A local JSON-lines file with a `text` field, or the first C4 validation shard from the hub."""
    import datasets

    if getattr(cfg, "path", None):
        path = _existing_path(cfg, "dataset c4")
        require(
            path.is_file() and path.name.endswith(C4_SUFFIXES),
            "dataset.path",
            f"{str(path)!r} is not a JSON-lines file",
            allowed=C4_SUFFIXES,
        )
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        rows = datasets.load_dataset(C4_HUB, data_files=C4_SHARD, split="validation")
    require(
        "text" in rows.column_names,
        "dataset.path",
        f"records have no 'text' field (fields: {', '.join(rows.column_names)})",
    )
    return DOC_SEP.join(rows["text"])
