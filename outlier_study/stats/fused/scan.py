"""The MA rule's window medians and MA count from one kernel pass, for the hooks that edit or locate MAs.

An intervention hook (Table 2's y6/y7 replacement, the residual attribution, super-weight keeping) asks of
every tensor that might hold an MA whether it does. The reference answer is an |a| copy, a numpy partition
per window and a mask; on SmolLM2's mlp.out (512 × 576) that is ~2.4 ms a tensor, and half of them pass the
cheap max check in a Table 2 run. The fused kernel gives the same exact medians and the MA count in one
read (no moments, no channel statistics, no top-k), so a tensor without an MA costs no copy at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from outlier_study.stats.fused.build import load_kernel
from outlier_study.stats.fused.reducer import INF, MA, NAN, NATIVE_DTYPES, fresh_state, kernel_input

_NO_TOP = torch.zeros(1, 5, dtype=torch.float64)  # the scan asks for no top-k ...
_NO_CHANNELS = torch.zeros(0, dtype=torch.float64)  # ... and no channel statistics


@dataclass(frozen=True)
class MAScan:
    medians: torch.Tensor  # (B,) float64: each window's lower median |a|, exact
    ma_count: int  # elements meeting the MA rule, all windows together


def fused_ma_scan(x: torch.Tensor, ma_abs: float, ma_ratio: float) -> MAScan | None:
    """The MA rule's medians and count for x (B, ...), or None where the reference must answer: no kernel,
    not a CPU tensor, a dtype the kernel does not read, an empty window, or a non-finite element (whose
    window median the reference defines: nan for nan, inf ranked as a value)."""
    if x.device.type != "cpu" or x.dtype not in NATIVE_DTYPES or x.dim() == 0 or x[:1].numel() == 0:
        return None
    kernel = load_kernel()
    if kernel is None:
        return None
    B = x.shape[0]
    state = fresh_state(kernel, ma_abs, ma_ratio, top_k=0, moments=False, channel_stats=False)
    rows, _ = kernel_input(x.reshape(B, -1, x.shape[-1] if x.dim() > 2 else 1), None, state)
    medians = kernel.update(rows, None, 0, state, _NO_TOP, _NO_CHANNELS)
    if state[NAN] or state[INF]:
        return None
    return MAScan(torch.tensor(medians, dtype=torch.float64), int(state[MA]))
