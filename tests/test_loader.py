"""Model loading from every source kind, with local files only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from outlier_study.errors import ConfigError
from outlier_study.models.loader import load_model
from tests.helpers import make_cfg


def test_local_directory_round_trip(tmp_path: Path) -> None:
    """The hub code path (from_pretrained) on a directory saved from a tiny model: same logits."""
    cfg = make_cfg("model=tiny-qwen2")
    original = load_model(cfg.model, "float32", "cpu", tmp_path)
    original.model.save_pretrained(tmp_path / "saved")
    original.tokenizer.save_pretrained(tmp_path / "saved")
    local = make_cfg("model=local", f"model.path={tmp_path / 'saved'}")
    loaded = load_model(local.model, "float32", "cpu", tmp_path)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original.model(ids).logits, loaded.model(ids).logits)
    assert loaded.info["source"] == "local" and loaded.adapter.family == "qwen2"
    assert loaded.tokenizer("abc")["input_ids"] == original.tokenizer("abc")["input_ids"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_is_applied(tmp_path: Path, dtype: str) -> None:
    lm = load_model(make_cfg("model=tiny-llama").model, dtype, "cpu", tmp_path)
    assert {p.dtype for p in lm.model.parameters()} == {getattr(torch, dtype)}


def test_random_init_is_seeded(tmp_path: Path) -> None:
    a = load_model(make_cfg("model=tiny-gpt2").model, "float32", "cpu", tmp_path)
    b = load_model(make_cfg("model=tiny-gpt2").model, "float32", "cpu", tmp_path)
    c = load_model(make_cfg("model=tiny-gpt2", "model.init_seed=1").model, "float32", "cpu", tmp_path)
    wa, wb, wc = (m.model.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("overrides", "device", "message"),
    [
        (("model=local", "model.path=/nonexistent"), "cpu", "model.path: no such directory"),
        (("model=gguf", "model.path=/nonexistent.gguf"), "cpu", "model.path: no such GGUF file"),
        (("model=gguf",), "cpu", "model.path: a .gguf file is required"),
        (
            ("model=tiny-llama", "model.package=nope", "model.source=embedded"),
            "cpu",
            "model.package: package 'nope'",
        ),
        (("model=tiny-llama",), "tpu", "device: unknown device 'tpu'"),
    ],
)
def test_bad_model_input(tmp_path: Path, overrides: tuple[str, ...], device: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model(make_cfg(*overrides).model, "float32", device, tmp_path)
