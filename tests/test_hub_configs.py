"""The hub configs of current checkpoints: each names a real repo, and its loading code runs on a local folder
saved from a tiny model of the same family (no network): the family is read from the checkpoint's config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from outlier_study.models.loader import load_model
from outlier_study.models.tiny import byte_tokenizer, tiny_config
from tests.helpers import make_cfg

HUB_CONFIGS = {
    "qwen3-8b": ("Qwen/Qwen3-8B", "qwen3"),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "qwen3_moe"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "mixtral"),
    "olmo-2-7b": ("allenai/OLMo-2-1124-7B", "olmo2"),
    "gemma-2-9b": ("google/gemma-2-9b", "gemma2"),
    "phi-3-mini": ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2"),
    "gpt-oss-20b": ("openai/gpt-oss-20b", "gpt_oss"),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_loads_a_saved_copy_of_its_family(tmp_path: Path, name: str) -> None:
    hub_id, family = HUB_CONFIGS[name]
    cfg = make_cfg(f"model={name}")
    assert cfg.model.source == "hub" and cfg.model.hub_id == hub_id
    torch.manual_seed(0)
    impl = str(cfg.model.attn_implementation)
    saved = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=impl).eval()
    saved.save_pretrained(tmp_path / "ckpt")
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    local = make_cfg(f"model={name}", "model.source=local", f"model.path={tmp_path / 'ckpt'}")
    lm = load_model(local.model, "float32", "cpu", tmp_path / "cache")
    assert lm.adapter.family == family
    assert lm.info["attn_implementation"] == impl
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, lm.model(ids).logits)
