"""Corpus loading and window cutting: the inputs every measurement and perplexity number rests on."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from outlier_study.config.schema import DatasetConfig
from outlier_study.config.vocab import BosPolicy, Sampling
from outlier_study.data import Windows, build_windows, load_corpus
from outlier_study.data.corpus import DATASET_NAMES
from outlier_study.data.windows import make_windows, tokenize_corpus
from outlier_study.errors import ConfigError
from outlier_study.models.loader import describe_model
from outlier_study.models.tiny import byte_tokenizer
from outlier_study.validate import check_for_model
from tests.helpers import config_error, typed_cfg

WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
BOS = 256


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A few KB of varied text, so windows differ from one another."""
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the value is {i * i % 97}.\n" for i in range(200)), encoding="utf-8")
    return path


def local_cfg(path: Path, **kw: Any) -> DatasetConfig:
    base = {"name": "local_text", "path": str(path), "seq_len": 16, "n_windows": 4}
    return DatasetConfig(**{**base, **kw})


def raises_field(field: str, fn: Any, *args: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.field == field
    assert field in str(info.value)
    return info.value


# --- corpora -------------------------------------------------------------------------------------------


def test_embedded_corpus_nonempty_and_deterministic() -> None:
    cfg = DatasetConfig(name="embedded")
    text = load_corpus(cfg)
    assert len(text) > 100_000
    assert "assert" in text
    assert load_corpus(cfg) == text


def test_unknown_dataset_names_allowed_values() -> None:
    err = raises_field("dataset.name", load_corpus, DatasetConfig(name="wikitext3"))
    for name in DATASET_NAMES:
        assert name in str(err)


def test_local_text_file(text_file: Path) -> None:
    assert load_corpus(local_cfg(text_file)) == text_file.read_text(encoding="utf-8")


def test_local_text_folder_sorted_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert load_corpus(local_cfg(tmp_path)) == "first\n\nsecond\n\nthird"


def test_local_text_bad_paths(tmp_path: Path) -> None:
    raises_field("dataset.path", load_corpus, DatasetConfig(name="local_text"))
    missing = tmp_path / "nowhere.txt"
    err = raises_field("dataset.path", load_corpus, local_cfg(missing))
    assert str(missing) in str(err)
    (tmp_path / "empty").mkdir()
    raises_field("dataset.path", load_corpus, local_cfg(tmp_path / "empty"))


def test_max_chars_truncates_and_rejects_nonpositive(text_file: Path) -> None:
    assert load_corpus(local_cfg(text_file, max_chars=10)) == text_file.read_text(encoding="utf-8")[:10]
    raises_field(
        "dataset.max_chars",
        typed_cfg,
        "dataset=local_text",
        f"dataset.path={text_file}",
        "dataset.max_chars=0",
    )


def test_c4_local_json_gz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    docs = ["First document.", "Second one,\nwith two lines.", "Third."]
    path = tmp_path / "c4-mini.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "url": f"u{i}"}) + "\n")
    assert load_corpus(DatasetConfig(name="c4", path=str(path))) == "\n\n".join(docs)
    wrong = tmp_path / "c4.csv"
    wrong.write_text("text\nx\n", encoding="utf-8")
    raises_field("dataset.path", load_corpus, DatasetConfig(name="c4", path=str(wrong)))


def test_wikitext2_local_raw_file() -> None:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"WikiText-2 raw test file not present at {WIKITEXT_TEST}")
    text = load_corpus(DatasetConfig(name="wikitext2", path=str(WIKITEXT_TEST)))
    assert " = Robert Boulter = " in text
    assert "\r" not in text
    # a folder resolves wiki.<split>.raw itself
    assert load_corpus(DatasetConfig(name="wikitext2", path=str(WIKITEXT_TEST.parent), split="test")) == text


# --- windows -------------------------------------------------------------------------------------------


def test_tokenize_corpus_matches_tokenizer_and_stays_quiet() -> None:
    tok = byte_tokenizer()
    tok.model_max_length = 8
    text = "naïve café, déjà vu — twice over"
    ids = tokenize_corpus(text, tok)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.numel() == len(text.encode("utf-8"))  # one id per byte, no specials added
    assert tok.decode(ids.tolist()) == text
    fresh = byte_tokenizer()
    fresh.model_max_length = 8
    tokenize_corpus(text, fresh)
    assert not fresh.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_contiguous_windows_are_slices_of_the_tokenized_text(tok: Any, text_file: Path) -> None:
    cfg = local_cfg(text_file, seq_len=16, n_windows=5)
    win = build_windows(cfg, tok)
    assert isinstance(win, Windows)
    full = tok(load_corpus(cfg), add_special_tokens=False)["input_ids"]
    assert win.input_ids.shape == (5, 16) and win.input_ids.dtype == torch.int64
    assert win.starts == [0, 16, 32, 48, 64]
    for row, start in zip(win.input_ids.tolist(), win.starts, strict=True):
        assert row == full[start : start + 16]


def test_embedded_windows_and_protocol(tok: Any) -> None:
    cfg = DatasetConfig(name="embedded", seq_len=32, n_windows=3)
    win = build_windows(cfg, tok)
    text = load_corpus(cfg)
    p = win.protocol
    assert p["dataset"] == "embedded" and p["sampling"] == "contiguous" and p["bos"] == "none"
    assert (p["seq_len"], p["n_windows"], p["seed"], p["split"]) == (32, 3, 0, "test")
    assert p["n_corpus_chars"] == len(text)
    assert p["n_corpus_tokens"] == len(text.encode("utf-8"))  # byte tokenizer: one id per byte
    assert p["corpus_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert tok.decode(win.input_ids[0].tolist()) == text.encode("utf-8")[:32].decode("utf-8", "replace")


def test_random_windows_reproducible_and_in_bounds(tok: Any, text_file: Path) -> None:
    cfg = local_cfg(text_file, seq_len=16, n_windows=20, sampling=Sampling.random, seed=7)
    a = build_windows(cfg, tok)
    b = build_windows(cfg, tok)
    c = build_windows(dataclasses.replace(cfg, seed=8), tok)
    assert a.starts == b.starts and torch.equal(a.input_ids, b.input_ids)
    assert a.starts != c.starts
    ids = tokenize_corpus(load_corpus(cfg), tok)
    n = ids.numel()
    assert a.protocol["sampling"] == "random" and a.protocol["seed"] == 7
    for row, start in zip(a.input_ids, a.starts, strict=True):
        assert 0 <= start <= n - 16
        assert torch.equal(row, ids[start : start + 16])
    assert len(set(a.starts)) > 1


def test_random_windows_can_reach_the_last_token() -> None:
    ids = torch.arange(10)
    rows, starts = make_windows(ids, seq_len=9, n_windows=200, sampling="random", seed=0, bos_id=None)
    assert set(starts) == {0, 1}
    assert rows[starts.index(1)].tolist() == list(range(1, 10))


def test_bos_prepend_puts_bos_first_and_keeps_length(tok: Any, text_file: Path) -> None:
    cfg = local_cfg(text_file, seq_len=16, n_windows=3, bos=BosPolicy.prepend)
    win = build_windows(cfg, tok)
    ids = tokenize_corpus(load_corpus(cfg), tok)
    assert win.input_ids.shape == (3, 16)
    assert (win.input_ids[:, 0] == BOS).all()
    assert win.starts == [0, 15, 30]
    for row, start in zip(win.input_ids, win.starts, strict=True):
        assert torch.equal(row[1:], ids[start : start + 15])
    assert win.protocol["bos"] == "prepend" and win.protocol["bos_id"] == BOS


def test_bos_prepend_without_bos_token(text_file: Path) -> None:
    tok = byte_tokenizer()
    tok.bos_token = None
    assert tok.bos_token_id is None
    cfg = local_cfg(text_file, bos=BosPolicy.prepend)
    raises_field("dataset.bos", build_windows, cfg, tok, None)


def test_plain_string_config_matches_structured(tok: Any, text_file: Path) -> None:
    structured = local_cfg(text_file, sampling=Sampling.random, bos=BosPolicy.prepend, seed=3)
    plain = OmegaConf.create(
        {**dataclasses.asdict(local_cfg(text_file)), "sampling": "random", "bos": "prepend", "seed": 3}
    )
    a = build_windows(structured, tok)
    b = build_windows(plain, tok)
    assert torch.equal(a.input_ids, b.input_ids) and a.protocol == b.protocol


@pytest.mark.parametrize(
    ("field", "override"),
    [
        ("dataset.seq_len", "dataset.seq_len=0"),
        ("dataset.n_windows", "dataset.n_windows=0"),
        ("dataset.batch_size", "dataset.batch_size=0"),
        ("dataset.sampling", "dataset.sampling=shuffled"),
        ("dataset.bos", "dataset.bos=append"),
    ],
)
def test_config_validation(text_file: Path, field: str, override: str) -> None:
    line = config_error("dataset=local_text", f"dataset.path={text_file}", override)
    assert line.startswith(f"{field}: ") and "\n" not in line


def test_windows_longer_than_the_context_are_refused_before_the_load() -> None:
    cfg = typed_cfg("model=tiny-llama", "+model.arch.max_position_embeddings=64", "dataset.seq_len=65")
    err = raises_field("dataset.seq_len", check_for_model, cfg, describe_model(cfg.model, "/nonexistent"))
    assert "context" in str(err) and "64" in str(err)


def test_corpus_too_short(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 50, encoding="utf-8")
    cfg = local_cfg(path, seq_len=16, n_windows=4)
    err = raises_field("dataset.n_windows", build_windows, cfg, tok, None)
    assert "50" in str(err) and "64" in str(err)
    build_windows(local_cfg(path, seq_len=16, n_windows=3), tok)  # 48 tokens fit
    cfg = local_cfg(path, seq_len=51, n_windows=4, sampling="random")
    err = raises_field("dataset.seq_len", build_windows, cfg, tok, None)
    assert "50" in str(err) and "51" in str(err)
    build_windows(local_cfg(path, seq_len=50, n_windows=4, sampling="random"), tok)


def test_hub_branches_ask_for_the_documented_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """No download: a stand-in load_dataset records what the hub branches would fetch."""
    import datasets

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load(*args: Any, **kwargs: Any) -> datasets.Dataset:
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["a", "", "b"], "url": ["x", "y", "z"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_corpus(DatasetConfig(name="wikitext2", split="validation")) == "a\n\n\n\nb"
    assert calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "validation"})
    assert load_corpus(DatasetConfig(name="c4")) == "a\n\n\n\nb"
    args, kwargs = calls[-1]
    assert args == ("allenai/c4",) and kwargs["split"] == "validation"
    assert kwargs["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
