"""Fixed-length token windows over a corpus, with the full protocol recorded for reproducibility."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from outlier_study.data.corpus import load_corpus
from outlier_study.data.token_cache import cache_file, read_ids, write_ids
from outlier_study.errors import ConfigError, require


@dataclass
class Windows:
    """Model inputs plus where they came from, so a result can always be traced back to its text."""

    input_ids: torch.Tensor  # (n_windows, seq_len) int64
    starts: list[int]  # offset of each window's first text token in the tokenized corpus
    protocol: dict[str, Any]  # dataset, split, seq_len, sampling, seed, bos, corpus size and sha256
    corpus_ids: torch.Tensor  # the whole tokenized corpus, so calibration windows come from the same text


def corpus_sha256(text: str) -> str:
    """What the protocol records of the text, and half of a cached tokenization's name."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_corpus(text: str, tokenizer: Any, cache_dir: str | Path | None = None) -> torch.Tensor:
    """The tokenizer's own ids for the whole text at once (no chunking that could change merges); with
    `cache_dir` (paths.token_cache), read from and kept in the on-disk cache of tokenized corpora."""
    path = None if cache_dir is None else cache_file(cache_dir, corpus_sha256(text), tokenizer)
    ids = None if path is None else read_ids(path)
    if ids is None:
        # verbose=False: the corpus is longer than model_max_length by design; windows cut it later.
        encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)
        ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        if path is not None:
            write_ids(path, ids)
    return ids


def make_windows(
    ids: torch.Tensor, seq_len: int, n_windows: int, sampling: str, seed: int, bos_id: int | None
) -> tuple[torch.Tensor, list[int]]:
    """Cut `n_windows` windows of exactly `seq_len` ids; with `bos_id`, BOS then seq_len-1 text ids."""
    sampling = str(sampling)
    ids = ids.reshape(-1).long()
    n_tokens = int(ids.numel())
    text_len = seq_len - 1 if bos_id is not None else seq_len
    require(text_len > 0, "dataset.seq_len", "must be at least 2 when BOS is prepended (BOS counts)")
    if sampling == "contiguous":
        needed = n_windows * text_len
        require(
            n_tokens >= needed,
            "dataset.n_windows",
            f"the corpus has {n_tokens} tokens but {n_windows} contiguous windows of {text_len} text tokens "
            f"need {needed}; lower dataset.n_windows or dataset.seq_len, or use a longer corpus",
        )
        starts = [i * text_len for i in range(n_windows)]
    else:
        require(
            n_tokens >= text_len,
            "dataset.seq_len",
            f"the corpus has {n_tokens} tokens but one window needs {text_len} text tokens",
        )
        rng = random.Random(seed)
        starts = [rng.randint(0, n_tokens - text_len) for _ in range(n_windows)]
    rows = torch.stack([ids[s : s + text_len] for s in starts])
    if bos_id is not None:
        rows = torch.cat([torch.full((n_windows, 1), int(bos_id), dtype=torch.long), rows], dim=1)
    return rows, starts


def build_windows(
    cfg: Any, tokenizer: Any, text: str | None = None, token_cache: str | Path | None = None
) -> Windows:
    """Tokenize the corpus text (read from the dataset config when not given; through the on-disk cache
    `token_cache` when given) and cut the windows the dataset config (already validated) asks for."""
    if text is None:
        text = load_corpus(cfg)
    seq_len, n_windows = int(cfg.seq_len), int(cfg.n_windows)
    bos = str(cfg.bos)
    bos_id: int | None = None
    if bos == "prepend":
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ConfigError(
                "dataset.bos", "'prepend' needs a tokenizer with a BOS token; this one has none", ["none"]
            )
    ids = tokenize_corpus(text, tokenizer, token_cache)
    seed = int(cfg.seed)
    input_ids, starts = make_windows(ids, seq_len, n_windows, str(cfg.sampling), seed, bos_id)
    protocol: dict[str, Any] = {
        "dataset": str(cfg.name),
        "path": None if getattr(cfg, "path", None) is None else str(cfg.path),
        "split": str(cfg.split),
        "seq_len": seq_len,
        "n_windows": n_windows,
        "sampling": str(cfg.sampling),
        "seed": seed,
        "bos": bos,
        "bos_id": bos_id,
        "batch_size": int(cfg.batch_size),
        "max_chars": getattr(cfg, "max_chars", None),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "n_corpus_tokens": int(ids.numel()),
        "n_corpus_chars": len(text),
        "corpus_sha256": corpus_sha256(text),
    }
    return Windows(input_ids=input_ids, starts=starts, protocol=protocol, corpus_ids=ids)


def disjoint_starts(
    n_tokens: int, taken: list[int], text_len: int, n_windows: int, sampling: str, seed: int, field: str
) -> list[int]:
    """Starts of `n_windows` windows of `text_len` tokens overlapping none of the windows at `taken`.

    The corpus outside the taken windows is cut into back-to-back windows; `contiguous` keeps the first
    ones (for contiguous evaluation windows: the text right after them), `random` draws with `seed`."""
    require(n_windows > 0, field, f"must be positive, got {n_windows}")
    candidates: list[int] = []
    cursor = 0
    for start in sorted(taken) + [n_tokens]:
        free_end = min(start, n_tokens)
        while cursor + text_len <= free_end:
            candidates.append(cursor)
            cursor += text_len
        cursor = max(cursor, start + text_len)
    require(
        len(candidates) >= n_windows,
        field,
        f"the corpus has room for only {len(candidates)} windows of {text_len} tokens disjoint from the "
        f"evaluation windows, {n_windows} asked; lower it, dataset.n_windows or dataset.seq_len",
    )
    if str(sampling) == "random":
        return sorted(random.Random(seed).sample(candidates, n_windows))
    return candidates[:n_windows]


def calibration_windows(evaluation: Windows, n_windows: int, field: str = "method.calib_windows") -> Windows:
    """Calibration windows from the same corpus and protocol as `evaluation` (same seq_len and BOS policy),
    disjoint from every evaluation window, so a calibrated method never sees the text it is scored on."""
    protocol = evaluation.protocol
    bos_id = protocol["bos_id"]
    text_len = int(protocol["seq_len"]) - (1 if bos_id is not None else 0)
    ids = evaluation.corpus_ids
    starts = disjoint_starts(
        int(ids.numel()),
        evaluation.starts,
        text_len,
        n_windows,
        protocol["sampling"],
        int(protocol["seed"]),
        field,
    )
    rows = torch.stack([ids[s : s + text_len] for s in starts])
    if bos_id is not None:
        rows = torch.cat([torch.full((n_windows, 1), int(bos_id), dtype=torch.long), rows], dim=1)
    calib = {**protocol, "n_windows": n_windows, "role": "calibration, disjoint from the evaluation windows"}
    return Windows(input_ids=rows, starts=starts, protocol=calib, corpus_ids=ids)
