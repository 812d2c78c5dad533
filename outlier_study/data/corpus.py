"""Raw corpus text for each dataset kind, so windows and perplexity share one source of truth.

Every way a corpus can be unusable is one line naming `dataset.*`: a missing path, undecodable bytes (the
file, the byte offset and `dataset.encoding`), a malformed JSON line (the file and the line number), a
hub dataset that cannot be reached with the network off (and how to pass a local copy).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outlier_study.errors import ConfigError, require
from outlier_study.registry import Registry

WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
C4_HUB = "allenai/c4"
C4_SHARD = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# wikitext's raw files name the validation split "valid".
_WIKITEXT_FILE_SPLIT = {"validation": "valid", "valid": "valid", "train": "train", "test": "test"}

DOC_SEP = "\n\n"

CORPORA: Registry[Callable[[Any], str]] = Registry("dataset", "dataset.name")


def load_corpus(cfg: Any) -> str:
    """The dataset's raw text, truncated to `cfg.max_chars`; every bad input is a ConfigError."""
    text = CORPORA.get(cfg.name)(cfg)
    require(bool(text.strip()), "dataset.path", f"the {cfg.name} corpus is empty")
    max_chars = getattr(cfg, "max_chars", None)
    return text if max_chars is None else text[: int(max_chars)]


def _existing_path(cfg: Any, what: str) -> Path:
    """`cfg.path` as an existing Path, or a ConfigError naming dataset.path."""
    raw = getattr(cfg, "path", None)
    require(raw is not None and str(raw) != "", "dataset.path", f"{what} needs a path")
    path = Path(str(raw)).expanduser()
    require(path.exists(), "dataset.path", f"{str(path)!r} does not exist")
    return path


def _decode(raw: bytes, path: Path, encoding: str) -> str:
    """Bytes as text with universal newlines (CRLF wikitext files read as plain \\n); a binary file or an
    undecodable byte is one line naming the file, the offset and dataset.encoding."""
    if b"\x00" in raw[:65536]:
        raise ConfigError("dataset.path", f"{str(path)!r} looks like a binary file (NUL bytes), not text")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise ConfigError(
            "dataset.encoding", f"unknown encoding {encoding!r}", ["utf-8", "latin-1", "cp1252"]
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            "dataset.encoding",
            f"{str(path)!r} is not {encoding} text: byte 0x{raw[err.start]:02x} at offset {err.start}; "
            "set dataset.encoding to the file's encoding (e.g. dataset.encoding=latin-1)",
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(path: Path, cfg: Any) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError("dataset.path", f"cannot read {str(path)!r}: {err.strerror or err}") from None
    return _decode(raw, path, str(getattr(cfg, "encoding", "utf-8")))


def _hub_error(name: str, err: Exception) -> ConfigError:
    line = " ".join(str(err).split())[:160]
    return ConfigError(
        "dataset.path",
        f"{name} could not be read from the hub ({type(err).__name__}: {line}); with the network off, pass a "
        "local copy with dataset.path=FILE",
    )


def _embedded(cfg: Any) -> str:
    """Python's own pydoc topics: a few hundred KB of English prose available on any machine."""
    from pydoc_data.topics import topics

    return DOC_SEP.join(topics[key] for key in sorted(topics))


def _local_text(cfg: Any) -> str:
    """A text file, or every *.txt below a folder in sorted order (stable across machines)."""
    path = _existing_path(cfg, "dataset local_text")
    if path.is_file():
        return _read_text(path, cfg)
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    require(bool(files), "dataset.path", f"folder {str(path)!r} holds no *.txt files")
    return DOC_SEP.join(_read_text(p, cfg) for p in files)


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
        return _read_text(path, cfg)
    import datasets

    try:
        rows = datasets.load_dataset(*WIKITEXT2_HUB, split=str(cfg.split))
    except Exception as err:  # offline, unknown split, missing cache: all one line
        raise _hub_error("wikitext2", err) from None
    return DOC_SEP.join(rows["text"])


def _json_lines(path: Path, cfg: Any) -> list[str]:
    """The `text` field of every line of a JSON-lines file (gzip by suffix); a bad line is named."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ConfigError("dataset.path", f"{str(path)!r} is not a readable gzip file ({err})") from None
    texts = []
    for number, line in enumerate(_decode(raw, path, str(getattr(cfg, "encoding", "utf-8"))).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError("dataset.path", f"{str(path)!r} line {number} is not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(
                "dataset.path", f"{str(path)!r} line {number} has no 'text' field (has: {fields})"
            )
        texts.append(record["text"])
    return texts


def _c4(cfg: Any) -> str:
    """A local JSON-lines file with a `text` field, or the first C4 validation shard from the hub."""
    if getattr(cfg, "path", None):
        path = _existing_path(cfg, "dataset c4")
        require(
            path.is_file() and path.name.endswith(C4_SUFFIXES),
            "dataset.path",
            f"{str(path)!r} is not a JSON-lines file",
            allowed=C4_SUFFIXES,
        )
        return DOC_SEP.join(_json_lines(path, cfg))
    import datasets

    try:
        rows = datasets.load_dataset(C4_HUB, data_files=C4_SHARD, split="validation")
    except Exception as err:
        raise _hub_error("c4", err) from None
    return DOC_SEP.join(rows["text"])


CORPORA.add("embedded", _embedded)
CORPORA.add("local_text", _local_text)
CORPORA.add("wikitext2", _wikitext2)
CORPORA.add("c4", _c4)
DATASET_NAMES: tuple[str, ...] = tuple(CORPORA)
