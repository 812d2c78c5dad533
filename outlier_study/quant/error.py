"""Per-linear relative quantization error ‖Q(X)Q(W) − XW‖ / ‖XW‖, streamed in forward hooks (and, for routed
experts, through the experts interface: one row per fused parameter, over every expert and routed token).

X is the linear's own input in the un-quantized model (with any method applied), so the number isolates
what quantizing this one layer costs; errors of earlier layers do not accumulate into it. Biases are left
out (they are not quantized). Only two float64 sums per linear are kept across windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_study.adapters.experts import expert_params
from outlier_study.adapters.linears import weight_out_in
from outlier_study.measure.experts.routed import CAPTURES, Routed, Site, activate, shape_hook, sites_of, watch
from outlier_study.quant.experts import quantized_hidden, quantized_input
from outlier_study.quant.fake import OFF_BITS, QuantSpec, quantize, quantize_rows, rtn
from outlier_study.quant.targets import QuantWeight, quant_weights

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


@dataclass
class _ExpertError:
    """A routed-mechanism user: the error of each hit expert's (gate_)up and down slices on the tokens
    routed to it, summed over the experts of one fused parameter (one row per parameter and layer).
    Activations are quantized as `fake_quant` quantizes them (`quant/experts.py`), so the expert rows
    measure what the job evaluates."""

    spec: QuantSpec
    log: ErrorLog
    targets: dict[nn.Parameter, QuantWeight]
    weights: Mapping[nn.Parameter, torch.Tensor] | None
    sites: dict[int, Site] = field(default_factory=dict)
    _rounded: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)

    def apply(self, site: Site, routed: Routed, out: torch.Tensor) -> torch.Tensor:
        rows = partial(quantize_rows, bits=self.spec.a_bits)
        per_window = self.spec.a_granularity == "tensor"
        q_routed = routed.with_inputs(quantized_input(site, routed.like(), rows, per_window))
        up, down = (getattr(site.experts, name) for name in expert_params(site.spec))
        for e in routed.hit:
            self._add(up, e, routed.inputs(e), q_routed.inputs(e))
            hidden = routed.taps(e)["mlp.hidden"]
            self._add(down, e, hidden, quantized_hidden(site, routed, e, rows, per_window))
        return out

    def _add(self, param: nn.Parameter, e: int, x: torch.Tensor, qx: torch.Tensor) -> None:
        target = self.targets[param]
        ref = F.linear(x, target.out_in()[e])
        diff = F.linear(qx, self._quantized(target)[e]).sub_(ref)
        self.log.add((target.layer, target.path), diff.double().square().sum(), ref.double().square().sum())

    def _quantized(self, target: QuantWeight) -> torch.Tensor:
        if self.weights is not None:
            return self.weights[target.param]
        if target.param not in self._rounded:
            self._rounded[target.param] = rtn(target, self.spec)
        return self._rounded[target.param]


@contextmanager
def quant_error(
    lm: LoadedModel, spec: QuantSpec, weights: Mapping[nn.Parameter, torch.Tensor] | None = None
) -> Iterator[ErrorLog]:
    """Hook every decoder linear and routed-experts parameter for the block and stream its relative error
    under `spec` (weights and activations; KV quantization is not a linear's error). With 16/16 bits
    nothing is hooked: error 0. `weights`: the quantized (out, in) weights a weight quantizer made (e.g.
    GPTQ); without them each weight is rounded to nearest in the hook."""
    log = ErrorLog()
    model, adapter = lm.model, lm.adapter
    with ExitStack() as stack:
        if spec.w_bits < OFF_BITS or spec.a_bits < OFF_BITS:
            for layer, path, module in adapter.linears(model):
                qw = None if weights is None else weights[module.weight]
                handle = module.register_forward_hook(_hook((layer, path), spec, log, qw))
                stack.callback(handle.remove)
            targets = {t.param: t for t in quant_weights(adapter, model) if t.experts is not None}
            user = _ExpertError(spec, log, targets, weights)
            for block, site in sites_of(adapter.moe, adapter.blocks(model)):
                stack.callback(block.register_forward_pre_hook(shape_hook(site), with_kwargs=True).remove)
                watch(stack, block, site, user)
            activate(stack, model, user, CAPTURES)
        else:
            zero = torch.zeros((), dtype=torch.float64)
            for target in quant_weights(adapter, model):
                log.add((target.layer, target.path), zero, torch.ones((), dtype=torch.float64))
        yield log
