"""Fake (simulated) quantization: symmetric round-to-nearest, quantize-dequantize in floating point.

Weights: one scale per output channel (or per group of `w_group_size` input columns), computed once when
the context is entered. Activations: dynamic, one scale per token or per tensor, at the input of every
linear inside the decoder layers (GPT-2's `Conv1D` included; the lm_head stays in full precision, as is
usual). Keys and values optionally, as the attention function receives them (keys after RoPE: what a KV
cache holds), one scale per token and head.

The scale is max|x| / (2^(b-1) - 1) of its group, so x / scale already lies in [-qmax, qmax] and no clamp
is needed: the whole quantizer is one max, one divide, an in-place round and an in-place multiply. The
error of every element is at most scale / 2. 16 bits means "not quantized" for that operand.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_study.interventions.edits import reversible
from outlier_study.quant.attention_inputs import QKV, AttentionTransform, attention_inputs
from outlier_study.quant.experts import expert_activations
from outlier_study.quant.targets import QuantWeight, quant_weights

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

OFF_BITS = 16  # 16 bits = this operand is left in full precision
_MIN_AMAX = 1e-30  # an all-zero group gets a tiny scale and quantizes to exact zeros instead of 0/0


def qmax(bits: int) -> int:
    """Largest quantized magnitude of a signed symmetric b-bit grid."""
    return 2 ** (bits - 1) - 1


def grid_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The step of the symmetric b-bit grid whose largest level is amax (float32; an all-zero group gets a
    tiny step). RTN and GPTQ both take their steps from here, so they share one grid."""
    return amax.float().clamp_min(_MIN_AMAX).div_(qmax(bits))


def snap(x: torch.Tensor, scale: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """x rounded to the nearest multiple of scale (float32, a new tensor). With `bits`, the level is clamped
    to ±qmax: GPTQ's error feedback can move a weight past the largest level, RTN's x never is."""
    out = torch.div(x, scale).round_()
    if bits is not None:
        out.clamp_(-qmax(bits), qmax(bits))
    return out.mul_(scale)


def _round_to_grid(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """x quantized with scale amax / qmax (amax broadcasts against x); a new tensor, x is not written."""
    out = snap(x, grid_scale(amax, bits))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize(
    x: torch.Tensor, bits: int, *, group_size: int | None = None, per_sample: bool = False
) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization of x (never modified in place).

    Scales: one per row of the last dimension (default: per token for activations, per output channel for
    an (out, in) weight); one per group of `group_size` consecutive elements of the last dimension (the
    last group is zero-padded when the size does not divide); or, with `per_sample`, one per x[i] (per
    tensor for each sequence of a batch, so results do not depend on the batch size).
    """
    if bits >= OFF_BITS:
        return x
    if per_sample:
        amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
        return _round_to_grid(x, amax, bits)
    width = x.shape[-1]
    if group_size is None or group_size >= width:
        return _round_to_grid(x, x.abs().amax(dim=-1, keepdim=True), bits)
    pad = (-width) % group_size
    padded = F.pad(x, (0, pad)) if pad else x
    groups = padded.reshape(*padded.shape[:-1], -1, group_size)
    out = _round_to_grid(groups, groups.abs().amax(dim=-1, keepdim=True), bits).reshape(padded.shape)
    return out[..., :width] if pad else out


def quantize_rows(x: torch.Tensor, bits: int, window: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (n, C) fake-quantized: one scale per row (per token), or with `window` (n,) one per window
    (the rows of one sequence, as `per_sample` gives a (B, T, C) tensor): the rule for activations that
    arrive as flat token rows, e.g. the tokens routed to one expert."""
    if bits >= OFF_BITS or window is None:
        return quantize(x, bits)
    row_max = x.abs().amax(dim=-1)
    amax = row_max.new_zeros(int(window.max()) + 1 if window.numel() else 0)
    amax = amax.scatter_reduce(0, window, row_max, "amax")
    return _round_to_grid(x, amax[window, None], bits)


def weight_scale(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The step RTN gives every element of an (out, in) weight: one per row, or one per group of
    `group_size` consecutive columns, expanded to w's shape (float32)."""
    width = w.shape[-1]
    if group_size is None or group_size >= width:
        return grid_scale(w.abs().amax(dim=-1, keepdim=True), bits).expand(w.shape)
    pad = (-width) % group_size
    groups = (F.pad(w, (0, pad)) if pad else w).reshape(*w.shape[:-1], -1, group_size)
    scale = grid_scale(groups.abs().amax(dim=-1, keepdim=True), bits).expand(groups.shape)
    return scale.reshape(*w.shape[:-1], width + pad)[..., :width]


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths and granularities of one fake-quantization setting (bounds: the `quant` schema)."""

    w_bits: int = OFF_BITS
    a_bits: int = OFF_BITS
    kv_bits: int = OFF_BITS
    w_group_size: int | None = None  # None: one scale per output channel
    a_granularity: str = "token"  # token | tensor
    name: str = "custom"
    weights: str = "rtn"  # the weight quantizer (quant/weights.py): rtn | gptq

    @property
    def label(self) -> str:
        """The usual column name, e.g. W8A8, W4A16, W16A16, W4A4KV4; grouped weight scales add the group
        size (W4A16g128), a weight quantizer other than RTN its name (W4A16-GPTQ)."""
        kv = f"KV{self.kv_bits}" if self.kv_bits < OFF_BITS else ""
        group = f"g{self.w_group_size}" if self.w_group_size is not None and self.w_bits < OFF_BITS else ""
        how = f"-{self.weights.upper()}" if self.weights != "rtn" and self.w_bits < OFF_BITS else ""
        return f"W{self.w_bits}A{self.a_bits}{group}{kv}{how}"

    @property
    def active(self) -> bool:
        return min(self.w_bits, self.a_bits, self.kv_bits) < OFF_BITS

    def summary(self) -> dict[str, Any]:
        return {
            "quant": self.name,
            "quant.label": self.label,
            "quant.w_bits": self.w_bits,
            "quant.a_bits": self.a_bits,
            "quant.kv_bits": self.kv_bits,
            "quant.w_group_size": self.w_group_size,
            "quant.a_granularity": self.a_granularity,
            "quant.weights": self.weights,
        }


def spec_from_config(cfg: Any) -> QuantSpec:
    """A QuantSpec from the `quant` config group (a QuantConfig)."""
    return QuantSpec(
        w_bits=cfg.w_bits,
        a_bits=cfg.a_bits,
        kv_bits=cfg.kv_bits,
        w_group_size=cfg.w_group_size,
        a_granularity=str(cfg.a_granularity),
        name=str(cfg.name),
        weights=str(cfg.weights),
    )


class ActivationQuantizer:
    """The pre-hook of every linear. q/k/v (and gate/up) read the very same tensor object, so the last
    input's quantization is reused when that object arrives again: one quantization per distinct input.
    (Holding a reference to the last input keeps its memory from being reused by another tensor.)"""

    def __init__(self, bits: int, granularity: str) -> None:
        self.bits, self.per_sample = bits, granularity == "tensor"
        self._last_in: torch.Tensor | None = None
        self._last_out: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if x is not self._last_in:
            self._last_out = quantize(x, self.bits, per_sample=self.per_sample)
            self._last_in = x
        return (self._last_out, *args[1:])

    def clear(self) -> None:
        self._last_in = self._last_out = None


def kv_quantizer(bits: int) -> AttentionTransform:
    """Keys and values as the attention function receives them (keys after RoPE), one scale per token and
    head (their last dimension)."""

    def transform(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        return q, quantize(k, bits), quantize(v, bits)

    return transform


def rtn(target: QuantWeight, spec: QuantSpec) -> torch.Tensor:
    """A weight rounded to nearest, (out, in) or (E, out, in): one step per output channel (of every
    expert) or per group of `w_group_size` input columns."""
    return quantize(target.out_in().detach(), spec.w_bits, group_size=spec.w_group_size)


@contextmanager
def fake_quant(
    lm: LoadedModel, spec: QuantSpec, weights: Mapping[nn.Parameter, torch.Tensor] | None = None
) -> Iterator[dict[str, Any]]:
    """Quantize the decoder's weights (linears and routed experts), their inputs and the attention's keys
    and values for the block; MoE routers stay in full precision.

    `weights` holds, by parameter, the quantized `out_in` weight of every target (`targets.py`) when a
    weight quantizer made them (quant/weights.py, e.g. GPTQ); without it the weights are rounded to nearest
    here. The weights get new (quantized) tensors and the original tensor objects come back on exit, so the
    restore is bit-exact, also when the body raises. Hooks are appended, so a method's pre-hooks registered
    with prepend=True (MA removal, the online Hadamard) run before the activation quantizer, and a method's
    attention transform (the rotation's online q/k Hadamard), entered first, runs before the KV quantizer;
    the experts' activations are quantized through the experts interface (`experts.py`)."""
    model, adapter = lm.model, lm.adapter
    linears = adapter.linears(model)
    record: dict[str, Any] = {
        **spec.summary(),
        "quant.n_linears": len(linears),
        "quant.n_routed_experts": sum(s.num_experts for *_, s in adapter.experts(model)),
    }
    with reversible() as edits, ExitStack() as stack:
        if spec.w_bits < OFF_BITS:
            with torch.no_grad():
                for target in quant_weights(adapter, model):
                    w = rtn(target, spec) if weights is None else weights[target.param]
                    edits.set_data(target.param, target.storage(w))
        if spec.a_bits < OFF_BITS:
            quantizer = ActivationQuantizer(spec.a_bits, spec.a_granularity)
            stack.callback(quantizer.clear)
            for _, _, module in linears:
                stack.callback(module.register_forward_pre_hook(quantizer).remove)
            rows = partial(quantize_rows, bits=spec.a_bits)  # called as rows(x, window=...)
            stack.enter_context(expert_activations(lm, rows, per_window=spec.a_granularity == "tensor"))
        if spec.kv_bits < OFF_BITS:
            stack.enter_context(attention_inputs(model, kv_quantizer(spec.kv_bits)))
        yield record
