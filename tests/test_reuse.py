"""Model reuse across the jobs of an in-process sweep: reused only when provably unchanged, and bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from outlier_study.app import run
from outlier_study.models.reuse import ModelReuse, bit_checksum
from tests.helpers import make_cfg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _get(reuse: ModelReuse, name: str, keep: int = 1):
    cfg = make_cfg(f"model={name}")
    return reuse.get(cfg.model, "float32", "cpu", cfg.paths.model_cache, keep=keep)


def test_same_config_is_loaded_once_and_edits_that_were_undone_are_fine() -> None:
    reuse = ModelReuse()
    lm = _get(reuse, "tiny-llama")
    w = lm.model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(2.0)  # an intervention's write ...
        w.copy_(saved)  # ... and its bit-exact restore: version counters moved, values did not
    assert _get(reuse, "tiny-llama") is lm
    assert reuse.loads == 1 and reuse.last_reused


@pytest.mark.parametrize(
    ("dtype", "numel"), [(torch.float32, 64), (torch.float32, 3), (torch.bfloat16, 5), (torch.float16, 4)]
)
def test_bit_checksum_sees_every_single_bit(dtype: torch.dtype, numel: int) -> None:
    """Flipping any one bit of any element changes the checksum (sizes whose bytes are no multiple of 8
    included), and the same bits give the same checksum."""
    t = torch.randn(numel).to(dtype)
    base = bit_checksum(t)
    assert torch.equal(bit_checksum(t.clone()), base)
    words = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    for i in range(numel):
        for bit in range(8 * t.element_size()):
            flipped = words.clone()
            flipped[i] ^= (1 << bit) if bit < 8 * t.element_size() - 1 else -(1 << bit)
            assert not torch.equal(bit_checksum(flipped.view(dtype)), base), (i, bit)


def test_a_model_left_modified_or_hooked_is_loaded_again() -> None:
    reuse = ModelReuse()
    lm = _get(reuse, "tiny-qwen2")
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.q_proj.weight[0, 0] += 1.0
    fresh = _get(reuse, "tiny-qwen2")
    assert fresh is not lm and reuse.loads == 2 and not reuse.last_reused
    handle = fresh.model.model.layers[0].register_forward_hook(lambda *a: None)
    assert _get(reuse, "tiny-qwen2") is not fresh
    handle.remove()
    assert reuse.loads == 3


def test_the_store_is_bounded() -> None:
    reuse = ModelReuse()
    for name in ("tiny-llama", "tiny-gpt2", "tiny-llama"):
        _get(reuse, name, keep=1)
    assert reuse.loads == 3  # keep=1: switching models evicts
    for name in ("tiny-gpt2", "tiny-llama", "tiny-gpt2"):
        _get(reuse, name, keep=2)
    assert reuse.loads == 4  # keep=2: only the gpt2 one had been evicted
    _get(reuse, "tiny-gpt2", keep=0)
    _get(reuse, "tiny-gpt2", keep=0)
    assert reuse.loads == 6  # keep=0: never reused, nothing stored


def test_jobs_in_one_process_share_the_model_and_results_match(tmp_path: Path) -> None:
    base = ("model=tiny-mistral", "dataset.seq_len=32", "dataset.n_windows=2", "progress=false")
    first = run(make_cfg(*base, "experiment=perplexity", "intervention=massive"), tmp_path / "a")
    second = run(make_cfg(*base, "experiment=perplexity"), tmp_path / "b")
    alone = run(make_cfg(*base, "experiment=perplexity", "reuse_models=0"), tmp_path / "c")
    assert json.loads((second / "env.json").read_text())["model_reused"] is True
    assert json.loads((alone / "env.json").read_text())["model_reused"] is False
    ppl = [json.loads((d / "metrics.json").read_text())["ppl"] for d in (first, second, alone)]
    assert ppl[1] == ppl[2]  # the reused model gives bit-identical results to a fresh one


def test_cli_multirun_reuses_the_model(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["-m", "experiment=perplexity", "model=tiny-llama", "intervention=none,massive,residual"]
    args += ["dataset.seq_len=32", "dataset.n_windows=2", "progress=false", f"paths.output_root={tmp_path}"]
    out = subprocess.run(
        [sys.executable, "-m", "outlier_study.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    envs = sorted(tmp_path.glob("perplexity/*/*/env.json"))
    assert len(envs) == 3
    assert sorted(json.loads(p.read_text())["model_reused"] for p in envs) == [False, True, True]
