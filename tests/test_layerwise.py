"""execution=layerwise: one decoder layer resident at a time, every result file the in-memory run writes
written with the same bytes (timings aside), and what it cannot run refused before the load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.measure.checkpoints import WindowCheckpoint
from outlier_study.measure.forward import forward_windows, logits_forward
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.models.loader import LoadedModel, load_model
from outlier_study.models.reuse import ModelReuse
from tests.helpers import TINY_MODELS, hook_count, make_cfg

TIMING = {"profile_seconds", "tokens_per_second"}  # metrics.json fields that time the run
NOT_RESULTS = {"env.json", "status.json", "config.yaml"}  # the job's record, not its results
# 3 windows in batches of 2: a full and a partial batch, so window offsets and batch order are exercised
SMALL = ("dataset.seq_len=32", "dataset.n_windows=3", "dataset.batch_size=2", "progress=false")
# A random tiny model has no real MAs; a low rule makes many, so the MA code paths have work to do.
LOW_MA = ("threshold.ma_abs=0.00001", "threshold.ma_ratio=4")
LOW_CO = ("threshold.m=1", "threshold.beta=10")  # likewise channel-wise outliers, for the weight edits


def load(name: str, cache: Path, execution: str, dtype: str = "float32") -> LoadedModel:
    return load_model(make_cfg(f"model={name}").model, dtype, "cpu", cache, execution=execution)


def results(job: Path) -> dict[str, object]:
    """Every result file's content (metrics.json without its timings)."""
    out: dict[str, object] = {}
    for path in sorted(p for p in job.rglob("*") if p.is_file() and p.name not in NOT_RESULTS):
        key = str(path.relative_to(job))
        if key == "metrics.json":
            out[key] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}
        else:
            out[key] = path.read_bytes()
    return out


def both(tmp_path: Path, *overrides: str) -> tuple[dict[str, object], dict[str, object]]:
    jobs = {
        ex: run(make_cfg(*SMALL, *overrides, f"execution={ex}", "reuse_models=0"), job_dir=tmp_path / ex)
        for ex in ("memory", "layerwise")
    }
    return results(jobs["memory"]), results(jobs["layerwise"])


JOBS = {
    "profile": ("model=tiny-llama",),
    "profile-gpt2": ("model=tiny-gpt2", "experiment.figures=false"),
    "profile-moe": ("model=tiny-qwen3-moe", "experiment.figures=false"),
    "profile-gemma3-attention": (
        "model=tiny-gemma3",
        "model.attn_implementation=eager",
        "taps=[x1,x6,x7,x9,y6,y7,resid.post]",
        "experiment.figures=false",
    ),
    "perplexity-massive": ("model=tiny-llama", "experiment=perplexity", "intervention=massive", *LOW_MA),
    "perplexity-massive-moe": (
        "model=tiny-qwen3-moe",
        "experiment=perplexity",
        "intervention=massive",
        "intervention.tap=y7",
        *LOW_MA,
    ),
    "perplexity-residual": ("model=tiny-gemma3", "experiment=perplexity", "intervention=residual", *LOW_MA),
    "table1": ("model=tiny-llama", "experiment=table1", *LOW_MA),
    "table2": ("model=tiny-qwen2", "experiment=table2", *LOW_MA),
    "table45": ("model=tiny-llama", "experiment=table45", *LOW_MA),
    "fig4": ("model=tiny-gpt2", "experiment=fig4", *LOW_MA),
    "fig6": ("model=tiny-llama", "experiment=fig6", *LOW_MA),
    "co": ("model=tiny-llama", "experiment=co"),
    "fig8": ("model=tiny-mistral", "experiment=fig8", "threshold.m=1"),
    # weight edits, written into each layer as it is read
    "fig9": ("model=tiny-llama", "experiment=fig9", *LOW_CO),
    "table3": ("model=tiny-qwen2", "experiment=table3", "experiment.random_seeds=2", *LOW_CO),
    "perplexity-gamma-random": (
        "model=tiny-gemma3",
        "experiment=perplexity",
        "intervention=gamma",
        "intervention.random=true",
        *LOW_CO,
    ),
    "table6": ("model=tiny-llama", "experiment=table6", "experiment.random_seeds=1", "threshold.sd=[2]"),
    "perplexity-weight-channels-sd": (
        "model=tiny-gemma3",
        "experiment=perplexity",
        "intervention=weight_channels",
        "intervention.select=sd",
        "intervention.matrices=[o,down]",
        "intervention.axis=in",
        "intervention.sd_level=2",
    ),
    "perplexity-weights": (
        "model=tiny-mistral",
        "experiment=perplexity",
        "intervention=weights",
        "intervention.weights=[{layer:0,matrix:down,row:1},{layer:2,matrix:q,col:3},{layer:1,matrix:up,row:2,col:5}]",
        "intervention.mode=scale",
        "intervention.factor=100",
    ),
    "perplexity-weight-channels-gpt2": (
        "model=tiny-gpt2",
        "experiment=perplexity",
        "intervention=weight_channels",
        "intervention.value=zero",
        "threshold.m=0.5",  # some OTC rows in c_attn's thirds
        "threshold.beta=10",
    ),
}


@pytest.mark.parametrize("overrides", list(JOBS.values()), ids=list(JOBS))
def test_every_result_file_is_the_in_memory_one(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    memory, layerwise = both(tmp_path, *overrides)
    assert memory.keys() == layerwise.keys()
    for key, value in memory.items():
        assert layerwise[key] == value, key
    # an intervention compared here changes something: hooks (massive, residual: a layer's input against
    # its output, both inside the one resident layer) and weight edits written into each layer as it is read
    metrics = memory["metrics.json"]
    assert metrics.get("intervention.changed_total", 1) > 0  # type: ignore[union-attr]


@pytest.mark.parametrize("name", [*TINY_MODELS, "tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_are_bit_identical(name: str, dtype: str, model_cache: Path, token_ids: torch.Tensor) -> None:
    memory, layerwise = load(name, model_cache, "memory", dtype), load(name, model_cache, "layerwise", dtype)
    assert torch.equal(logits_forward(memory, token_ids), logits_forward(layerwise, token_ids))


def test_one_layer_is_resident_at_a_time_and_the_model_is_left_as_found(model_cache: Path) -> None:
    lm = load("tiny-llama", model_cache, "layerwise")
    blocks = lm.adapter.blocks(lm.model)
    originals = list(blocks)
    resident: list[int] = []

    def count(*_: object) -> None:
        resident.append(sum(not next(b.parameters()).is_meta for b in originals))

    handles = [b.register_forward_pre_hook(count) for b in originals]
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    forward_windows(lm, ids, 2, False, "test")
    for h in handles:
        h.remove()
    assert resident == [1] * (2 * lm.n_layers)  # every layer ran once per batch, alone
    assert lm.store is not None and lm.store.reads == lm.n_layers
    assert list(blocks) == originals and hook_count(lm) == 0
    assert all(p.is_meta for b in originals for p in b.parameters())
    assert not lm.model.get_input_embeddings().weight.is_meta


def test_a_resumed_layerwise_evaluation_reads_no_layer(tmp_path: Path, model_cache: Path) -> None:
    lm = load("tiny-llama", model_cache, "layerwise")
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    checkpoint = WindowCheckpoint(tmp_path / "ppl.json", key="test")
    first = evaluate_perplexity(lm, ids, 2, progress=False, checkpoint=checkpoint)
    assert lm.store is not None
    reads = lm.store.reads
    again = evaluate_perplexity(lm, ids, 2, progress=False, checkpoint=checkpoint)
    assert lm.store.reads == reads and again == first
    assert first == evaluate_perplexity(load("tiny-llama", model_cache, "memory"), ids, 2, progress=False)


def test_a_layerwise_model_is_reused_and_kept_apart_from_the_in_memory_one(model_cache: Path) -> None:
    models = ModelReuse()
    cfg = make_cfg("model=tiny-llama").model
    first = models.get(cfg, "float32", "cpu", model_cache, 2, execution="layerwise")
    forward_windows(first, torch.zeros(1, 8, dtype=torch.long), 1, False, "test")
    assert models.get(cfg, "float32", "cpu", model_cache, 2, execution="layerwise") is first
    assert models.last_reused
    assert models.get(cfg, "float32", "cpu", model_cache, 2, execution="memory").store is None


def saved(name: str, folder: Path, **kwargs: object) -> Path:
    """A tiny model saved as a user's checkpoint folder (save_pretrained, transformers' own layout)."""
    load(name, folder / "unused-cache", "memory").model.save_pretrained(folder / name, **kwargs)
    return folder / name


def local(folder: Path, execution: str) -> LoadedModel:
    cfg = make_cfg("model=local", f"model.path={folder}", "model.tokenizer=bytes").model
    return load_model(cfg, "float32", "cpu", folder.parent / "cache", execution=execution)


def test_a_sharded_checkpoint_folder_is_read_through_its_index(
    tmp_path: Path, token_ids: torch.Tensor
) -> None:
    folder = saved("tiny-gpt2", tmp_path, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    memory, layerwise = local(folder, "memory"), local(folder, "layerwise")
    assert torch.equal(logits_forward(memory, token_ids), logits_forward(layerwise, token_ids))


def test_a_checkpoint_that_transformers_converts_at_load_is_refused(tmp_path: Path) -> None:
    """A Mixtral checkpoint stores its experts one by one; transformers fuses them while loading, which a
    read of one layer's tensors by name cannot do: one line, before any layer is read."""
    folder = saved("tiny-mixtral", tmp_path)
    with pytest.raises(ConfigError, match=r"^execution: .*experts.*\(allowed: memory\)$"):
        local(folder, "layerwise")


@pytest.mark.real
def test_smollm2_layerwise_reads_its_shards_and_gives_the_in_memory_metrics(
    tmp_path: Path, model_cache: Path
) -> None:
    for overrides in (("experiment.figures=false",), ("experiment=perplexity",)):
        common = ("model=smollm2-135m", "dataset.seq_len=64", "dataset.n_windows=2", *overrides)
        memory, layerwise = both(tmp_path / overrides[0], *common)
        assert layerwise == memory
    env = json.loads((tmp_path / "experiment=perplexity" / "layerwise" / "env.json").read_text())
    assert env["model"]["execution"] == "layerwise"
    assert Path(env["model"]["layers_read_from"], "model.safetensors").is_file()
