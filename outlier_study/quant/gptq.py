"""GPTQ (Frantar et al., 2023) for one weight matrix, on the symmetric grid of `fake.py`.

Round-to-nearest minimizes each weight's own error; GPTQ minimizes the layer's output error on calibration
inputs, ‖W X − Ŵ X‖², whose curvature is H = 2 XᵀX / n (one input column per token). It quantizes the
columns one at a time and moves each column's rounding error onto the columns not yet quantized, in the
proportions the inverse Hessian gives, so later columns absorb what earlier ones lost. Written from the
paper's description:

- dampening: λ · mean(diag H) is added to H's diagonal, so the inverse exists and stays well conditioned;
- the needed rows of H⁻¹ are those of its upper Cholesky factor U (H⁻¹ = Uᵀ U), computed once;
- lazy batches: inside a block of `block_size` columns the updates are applied column by column, the
  block's whole error reaches the columns after it in one product at the end of the block;
- act-order: columns are visited by decreasing diag H (the inputs with the most energy first), and the
  result is put back in the original column order.

The grid: every weight keeps the step RTN gives it (`fake.weight_scale`: one per output row, or per group
of consecutive input columns, from the weights as the method left them), computed before any update, and
the level is clamped to ±qmax. So GPTQ's weights lie on RTN's grid, act-order needs no group bookkeeping,
and with H = I (no correlation between inputs) GPTQ is RTN bit for bit. An input channel that was zero on
every calibration token (diag H = 0) gets diag 1: it is rounded to nearest and exchanges no error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from outlier_study.quant.fake import snap, weight_scale

_MAX_DAMP_RAISES = 4  # a Hessian that is not positive definite gets 10x the dampening, this many times


@dataclass(frozen=True)
class GPTQSettings:
    """The knobs of the algorithm (bounds: `GPTQConfig` in the quant schema)."""

    damp: float = 0.01  # λ: λ·mean(diag H) is added to the diagonal of H
    block_size: int = 128  # columns per lazy batch (changes the speed, not the result beyond rounding)
    act_order: bool = False  # visit columns by decreasing diag H


@dataclass(frozen=True)
class GPTQResult:
    weight: torch.Tensor  # (out, in), on the grid, in the input's dtype
    damp: float  # the λ finally used (> settings.damp when H needed more to factor)
    dead_columns: int  # input channels that were zero on every calibration token


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with Uᵀ U = (H + λ·mean(diag H)·I)⁻¹ (float64); λ grows 10x while H + λI does not factor."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(_MAX_DAMP_RAISES + 1):
        lower, info = torch.linalg.cholesky_ex(h + (damp * mean_diag) * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True), damp
        damp *= 10
    raise ValueError(f"the Hessian does not factor even with dampening {damp / 10:g}")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    settings: GPTQSettings = GPTQSettings(),
) -> GPTQResult:
    """GPTQ of an (out, in) weight against the Hessian h (in, in) of its inputs; w and h are not written.

    Rows are independent given H, so linears that read the same input (q/k/v, gate/up) can be stacked
    into one call."""
    rows, cols = w.shape
    h = h.to(torch.float64, copy=True)
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    work = w.detach().to(torch.float32, copy=True)
    scale = weight_scale(work, bits, group_size).contiguous()
    perm = None
    if settings.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        work, scale, h = work[:, perm], scale[:, perm], h[perm][:, perm]
    upper64, damp = _upper_inverse_factor(h, settings.damp)
    upper = upper64.to(torch.float32)
    quantized = torch.empty_like(work)
    for start in range(0, cols, settings.block_size):
        end = min(start + settings.block_size, cols)
        block = work[:, start:end].clone()
        errors = torch.empty_like(block)
        u_block = upper[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            q = snap(column, scale[:, start + i], bits)
            quantized[:, start + i] = q
            err = (column - q).div_(u_block[i, i])
            errors[:, i] = err
            block[:, i + 1 :].addr_(err, u_block[i, i + 1 :], alpha=-1.0)
        work[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1.0)
    if perm is not None:
        quantized = quantized[:, torch.argsort(perm)]
    return GPTQResult(quantized.to(w.dtype), damp, int(dead.sum()))
