"""The on-disk cache of tokenized corpora (paths.token_cache): it returns the tokenizer's own ids, is read
when present, is named by text and tokenizer so neither can read another's ids, and never breaks a job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from outlier_study.app import run
from outlier_study.data.token_cache import cache_file, tokenizer_fingerprint
from outlier_study.data.windows import corpus_sha256, tokenize_corpus
from outlier_study.models.loader import load_tokenizer
from outlier_study.models.tiny import byte_tokenizer
from tests.helpers import make_cfg

TEXT = "naïve café, déjà vu — twice over\nand once more.\n"


def cached_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.npy"))


def test_a_cached_tokenization_is_the_tokenizers_own_and_is_read_back(tmp_path: Path) -> None:
    ids = tokenize_corpus(TEXT, byte_tokenizer(), tmp_path)
    assert ids.tolist() == byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    (path,) = cached_files(tmp_path)
    assert path == cache_file(tmp_path, corpus_sha256(TEXT), byte_tokenizer())
    assert np.load(path).tolist() == ids.tolist()
    # What a later call gets comes from the file: plant other ids there and they come back.
    np.save(path, np.arange(7, dtype=np.int32))
    again = tokenize_corpus(TEXT, byte_tokenizer(), tmp_path)
    assert again.dtype == torch.int64 and again.tolist() == list(range(7))


def test_another_text_or_tokenizer_gets_its_own_file(tmp_path: Path) -> None:
    tokenize_corpus(TEXT, byte_tokenizer(), tmp_path)
    tokenize_corpus(TEXT + "!", byte_tokenizer(), tmp_path)
    assert len(cached_files(tmp_path)) == 2
    merged = byte_tokenizer()
    merged.backend_tokenizer.add_tokens(["café"])  # changes the ids of TEXT
    assert tokenizer_fingerprint(merged) != tokenizer_fingerprint(byte_tokenizer())
    ids = tokenize_corpus(TEXT, merged, tmp_path)
    assert ids.tolist() == merged(TEXT, add_special_tokens=False)["input_ids"]
    assert len(cached_files(tmp_path)) == 3
    option = byte_tokenizer()
    option.init_kwargs["clean_up_tokenization_spaces"] = not option.init_kwargs.get(
        "clean_up_tokenization_spaces", False
    )
    assert tokenizer_fingerprint(option) != tokenizer_fingerprint(byte_tokenizer())


def test_the_fingerprint_is_the_same_for_two_loads_of_one_tokenizer(tmp_path: Path) -> None:
    assert tokenizer_fingerprint(byte_tokenizer()) == tokenizer_fingerprint(byte_tokenizer())
    vocab = {"a": 0, "b": 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(byte_tokenizer())


@pytest.mark.parametrize("damage", [b"", b"not an npy file", b"\x93NUMPY garbage"])
def test_a_damaged_file_is_tokenized_again_and_rewritten(tmp_path: Path, damage: bytes) -> None:
    path = cache_file(tmp_path, corpus_sha256(TEXT), byte_tokenizer())
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(damage)
    ids = tokenize_corpus(TEXT, byte_tokenizer(), tmp_path)
    assert ids.tolist() == byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert np.load(path).tolist() == ids.tolist()


def test_a_float_or_2d_file_is_not_taken_for_ids(tmp_path: Path) -> None:
    path = cache_file(tmp_path, corpus_sha256(TEXT), byte_tokenizer())
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    for bad in (np.zeros(3, dtype=np.float32), np.zeros((2, 2), dtype=np.int32)):
        np.save(path, bad)
        ids = tokenize_corpus(TEXT, byte_tokenizer(), tmp_path)
        assert ids.tolist() == byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]


class PythonOnly:
    """A tokenizer with no serialized form (no `backend_tokenizer`): it cannot be keyed, so not cached."""

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def test_a_tokenizer_without_a_serialized_form_is_not_cached(tmp_path: Path) -> None:
    assert tokenizer_fingerprint(PythonOnly()) is None
    assert tokenize_corpus(TEXT, PythonOnly(), tmp_path).tolist() == list(TEXT.encode("utf-8"))
    assert not tmp_path.exists() or not cached_files(tmp_path)


def test_an_unwritable_cache_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    ids = tokenize_corpus(TEXT, byte_tokenizer(), blocker / "tokens")
    assert ids.tolist() == byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert "warning: paths.token_cache" in capsys.readouterr().err


def test_jobs_fill_then_read_the_cache_and_null_turns_it_off(tmp_path: Path) -> None:
    common = ["model=tiny-llama", "dataset.seq_len=32", "dataset.n_windows=2", "progress=false"]
    cache = tmp_path / "tokens"
    first = run(make_cfg(*common, f"paths.token_cache={cache}"), job_dir=tmp_path / "a")
    (path,) = cached_files(cache)
    stamp = path.stat().st_mtime_ns
    second = run(make_cfg(*common, f"paths.token_cache={cache}", "seed=1"), job_dir=tmp_path / "b")
    assert path.stat().st_mtime_ns == stamp
    off = run(make_cfg(*common, "paths.token_cache=null"), job_dir=tmp_path / "c")
    windows = [json.loads((job / "windows.json").read_text()) for job in (first, second, off)]
    assert windows[0] == windows[1] == windows[2]
    assert cached_files(cache) == [path]


@pytest.mark.real
def test_smollm2_wikitext_ids_from_the_cache_equal_a_fresh_tokenization(
    tmp_path: Path, model_cache: Path, wikitext: Path
) -> None:
    cfg = make_cfg("model=smollm2-135m")
    text = wikitext.read_text(encoding="utf-8")
    first, second, third = (load_tokenizer(cfg.model, model_cache) for _ in range(3))
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second) == tokenizer_fingerprint(third)
    fresh = tokenize_corpus(text, first, None)
    assert torch.equal(tokenize_corpus(text, second, tmp_path), fresh)  # tokenized, then written
    assert len(cached_files(tmp_path)) == 1
    assert torch.equal(tokenize_corpus(text, third, tmp_path), fresh)  # read from the file
