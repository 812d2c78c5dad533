"""The closed vocabularies of the config: one enum per choice, so a wrong value fails at the schema and
every error lists the allowed values."""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    """Where a model's weights come from."""

    random = "random"
    hub = "hub"
    local = "local"
    gguf = "gguf"
    embedded = "embedded"


class Execution(StrEnum):
    """memory: the whole model is resident; layerwise: the embeddings and one decoder layer at a time, read
    from the checkpoint's safetensors shards (models larger than memory)."""

    memory = "memory"
    layerwise = "layerwise"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(StrEnum):
    """cpu | cuda (one GPU) | auto (device_map="auto" across the visible GPUs)."""

    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class ReducerKind(StrEnum):
    """How a profile reduces each tapped tensor: auto (on CPU fused when the kernel builds, else reference;
    on an accelerator device), fused (the compiled one-pass kernel; CPU only), reference (torch/numpy
    passes; any device) or device (torch ops that never wait for the accelerator in a hook)."""

    auto = "auto"
    fused = "fused"
    reference = "reference"
    device = "device"


class Attention(StrEnum):
    """transformers' attention implementations; attention scores/probs are captured with any of them."""

    sdpa = "sdpa"
    eager = "eager"
    flex_attention = "flex_attention"
    flash_attention_2 = "flash_attention_2"


class Sampling(StrEnum):
    contiguous = "contiguous"
    random = "random"


class BosPolicy(StrEnum):
    """none: windows are plain text tokens; prepend: each window starts with BOS (seq_len counts it)."""

    none = "none"
    prepend = "prepend"


class TrackerMode(StrEnum):
    """offline: the run stays on disk until `wandb sync`; online: streamed to the W&B server; disabled:
    wandb does nothing."""

    offline = "offline"
    online = "online"
    disabled = "disabled"


class Granularity(StrEnum):
    """Activation quantization scales: one per token, or one per tensor (per sequence of a batch)."""

    token = "token"
    tensor = "tensor"


class MAValue(StrEnum):
    """What a massive activation is replaced with: zero, or its window's mean of the whole tensor."""

    zero = "zero"
    mean = "mean"


class GammaValue(StrEnum):
    """What a γ entry is set to: the mean of that γ over all channels, or zero."""

    mean = "mean"
    zero = "zero"


class WeightValue(StrEnum):
    """What a weight channel is set to: its own mean (a row mean for output channels), or zero."""

    channel_mean = "channel_mean"
    zero = "zero"


# Channel axis of an (out, in) weight: out = rows (output channels), in = columns (input channels).
# Built by the functional API because `in` is a keyword; config values are matched by member name.
Axis = StrEnum("Axis", {"out": "out", "in": "in"})


class Statistic(StrEnum):
    """Per-channel statistic of a weight channel (γ: the entry itself) for the k-SD rule."""

    absmean = "absmean"
    mean = "mean"
    absmax = "absmax"
    l2 = "l2"


class ChannelSelect(StrEnum):
    """otc: outlier-triggering rows of W_q/W_k/W_v; sd: channels beyond k SD of a per-channel statistic."""

    otc = "otc"
    sd = "sd"


class WeightGroup(StrEnum):
    """Table 6's weight groups: q/k/v, the norms' γ, the MLP's gate/up/down."""

    qkv = "qkv"
    norm = "norm"
    mlp = "mlp"


class WeightMode(StrEnum):
    """What an edited weight becomes: zero, or itself times a factor."""

    zero = "zero"
    scale = "scale"


class Ablation(StrEnum):
    """Super-weight ablations: the weight zeroed or scaled, its whole output row or input column zeroed."""

    weight_zero = "weight_zero"
    weight_scale = "weight_scale"
    row_zero = "row_zero"
    col_zero = "col_zero"
