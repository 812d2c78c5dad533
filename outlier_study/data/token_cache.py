"""Tokenized corpora kept on disk, so each job of a sweep does not tokenize the same text again.

The jobs of a SLURM sweep run in separate processes, and each one would tokenize the whole corpus: the
WikiText-2 test set takes about 0.8 s with SmolLM2's tokenizer, 4 % of a Table 2 job on a 2-core machine.
A file is named by what decides its ids: the text's sha256 and a fingerprint of the tokenizer (its class,
its full serialized fast tokenizer and its plain init options), so a changed text or tokenizer can never
read another's ids. Tokenizers without a serialized form (Python-only ones) are not cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outlier_study.output.files import write_bytes

_PLAIN = (str, int, float, bool, type(None))
_VERSION = "1"  # bump when what a file holds changes


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of everything that decides a fast tokenizer's ids; None for a tokenizer without a backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    options = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if isinstance(v, _PLAIN)}
    h = hashlib.sha256()
    for part in (_VERSION, type(tokenizer).__module__, type(tokenizer).__qualname__, backend.to_str()):
        h.update(part.encode())
        h.update(b"\0")
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def cache_file(cache_dir: str | Path, text_sha256: str, tokenizer: Any) -> Path | None:
    """Where the ids of this text under this tokenizer live, or None when the tokenizer cannot be keyed."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    return Path(cache_dir) / f"{text_sha256[:32]}-{fingerprint[:32]}.npy"


def read_ids(path: Path) -> torch.Tensor | None:
    """The stored ids, or None when the file is absent or unreadable (it is then written again)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return None
    return torch.from_numpy(ids.astype(np.int64))


def write_ids(path: Path, ids: torch.Tensor) -> None:
    """Store the ids atomically (int32: every vocabulary fits); a cache that cannot be written only warns."""
    buf = _npy_bytes(ids.numpy().astype(np.int32))
    try:
        write_bytes(path, buf)
    except OSError as err:
        print(f"warning: paths.token_cache: cannot write {path}: {err.strerror or err}", file=sys.stderr)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()
