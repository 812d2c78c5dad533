"""Per-linear relative quantization error ‖Q(X)Q(W) − XW‖ / ‖XW‖, streamed in forward hooks.

X is the linear's own input in the un-quantized model (with any method applied), so the number isolates
what quantizing this one layer costs; errors of earlier layers do not accumulate into it. Biases are left
out (they are not quantized). Only two float64 sums per linear are kept across windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_study.adapters.linears import weight_out_in
from outlier_study.quant.fake import OFF_BITS, QuantSpec, quantize

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel


@dataclass
class ErrorLog:
    """Summed squared error and squared reference norm per (layer, linear path)."""

    sq_err: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    sq_ref: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def add(self, key: tuple[int, str], err: torch.Tensor, ref: torch.Tensor) -> None:
        self.sq_err[key] = self.sq_err.get(key, 0.0) + err  # type: ignore[operator]
        self.sq_ref[key] = self.sq_ref.get(key, 0.0) + ref  # type: ignore[operator]

    def relative(self) -> dict[tuple[int, str], float]:
        """‖ΔY‖ / ‖Y‖ per linear over every token seen (nan when the output was all zero)."""
        out: dict[tuple[int, str], float] = {}
        for key, err in self.sq_err.items():  # forward order
            ref = float(self.sq_ref[key])
            out[key] = float(err) ** 0.5 / ref**0.5 if ref > 0 else float("nan")
        return out


def _hook(key: tuple[int, str], spec: QuantSpec, log: ErrorLog, qw: torch.Tensor | None) -> Any:
    per_sample = spec.a_granularity == "tensor"

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0]
        w = weight_out_in(module)  # type: ignore[arg-type]
        ref = F.linear(x, w)
        qx = quantize(x, spec.a_bits, per_sample=per_sample)
        qw_now = quantize(w, spec.w_bits, group_size=spec.w_group_size) if qw is None else qw
        diff = F.linear(qx, qw_now).sub_(ref)
        log.add(key, diff.double().square().sum(), ref.double().square().sum())

    return hook


@contextmanager
def quant_error(
    lm: LoadedModel, spec: QuantSpec, weights: Mapping[nn.Parameter, torch.Tensor] | None = None
) -> Iterator[ErrorLog]:
    """Hook every decoder linear for the block and stream its relative error under `spec` (weights and
    activations; KV quantization is not a linear's error). With 16/16 bits nothing is hooked: error 0.
    `weights`: the quantized (out, in) weights a weight quantizer made (e.g. GPTQ); without them each
    weight is rounded to nearest in the hook."""
    log = ErrorLog()
    linears = lm.adapter.linears(lm.model)
    with ExitStack() as stack:
        if spec.w_bits < OFF_BITS or spec.a_bits < OFF_BITS:
            for layer, path, module in linears:
                qw = None if weights is None else weights[module.weight]
                handle = module.register_forward_hook(_hook((layer, path), spec, log, qw))
                stack.callback(handle.remove)
        else:
            zero = torch.zeros((), dtype=torch.float64)
            for layer, path, _ in linears:
                log.add((layer, path), zero, torch.ones((), dtype=torch.float64))
        yield log
