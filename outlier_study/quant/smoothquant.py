"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with per-channel scales.

For every norm that feeds linears (attention norm → q/k/v, MLP norm → gate/up; GPT-2: ln_1 → c_attn,
ln_2 → c_fc), channel j gets s_j = max|X_j|^α / max|W_j|^(1−α), where max|X_j| is streamed over calibration
windows at the norm output and max|W_j| is taken over input column j of every reading linear. The norm is
divided by s (γ ← γ/s, Gemma3's 1 + w ← (1 + w)/s, GPT-2's β ← β/s too) and the reading linears' input
columns are multiplied by s: X W = (X/s)(s W), an exact equivalence before quantization.

o_proj and down_proj have no foldable operation in front of them and are not smoothed (as in the paper's
Llama recipe).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.linears import to_storage, weight_out_in
from outlier_study.interventions.edits import reversible
from outlier_study.measure.forward import forward_windows

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

ActMax = dict[tuple[int, str], torch.Tensor]  # (layer, "attn" | "mlp") -> per-channel max |X|, float32
_FLOOR = 1e-5  # floor of max|X|, max|W| and s (the reference implementation's clamp): no 0 or inf scale


def _amax_hook(store: ActMax, key: tuple[int, str]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        y = output if isinstance(output, torch.Tensor) else output[0]
        m = y.detach().abs().reshape(-1, y.shape[-1]).amax(dim=0).float()
        prev = store.get(key)
        store[key] = m if prev is None else torch.maximum(prev, m)

    return hook


def calibrate(
    lm: LoadedModel, input_ids: torch.Tensor, batch_size: int = 1, progress: bool = False
) -> ActMax:
    """Per-channel max |X| at every smoothed norm's output over the calibration windows.

    Only a running (channels,) maximum per norm is kept: no activation outlives its hook."""
    store: ActMax = {}
    adapter = lm.adapter
    with ExitStack() as stack:
        for layer, block in enumerate(adapter.blocks(lm.model)):
            for key in adapter.readers():
                norm = adapter.module(block, adapter.norms[key].module)
                stack.callback(norm.register_forward_hook(_amax_hook(store, (layer, key))).remove)
        forward_windows(lm, input_ids, batch_size, progress, "smoothquant calibration")
    return store


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α) per channel (float64), with both maxima and s floored at 1e-5."""
    x = act_max.double().clamp_min(_FLOOR)
    w = weight_max.double().clamp_min(_FLOOR)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(_FLOOR)


@contextmanager
def smooth(lm: LoadedModel, act_max: ActMax, alpha: float) -> Iterator[dict[str, Any]]:
    """Fold SmoothQuant scales into norms and reading linears for the block; bit-exact restore on exit."""
    adapter = lm.adapter
    readers_of = adapter.readers()
    blocks = adapter.blocks(lm.model)
    offset = float(adapter.gamma_offset)
    ratios: list[float] = []
    with reversible() as edits:
        with torch.no_grad():  # not around the yield: the body keeps the caller's grad mode
            for (layer, key), x_max in sorted(act_max.items()):
                block = blocks[layer]
                norm = adapter.module(block, adapter.norms[key].module)
                readers = [adapter.module(block, p) for p in readers_of[key]]
                w_max = torch.stack([weight_out_in(m).detach().abs().amax(dim=0) for m in readers]).amax(0)
                s = smoothing_scales(x_max.to(w_max.device), w_max, alpha)
                ratios.append(float(s.max() / s.min()))
                gamma = norm.weight.detach().double() + offset
                edits.set_data(norm.weight, gamma / s - offset)
                if getattr(norm, "bias", None) is not None:
                    edits.set_data(norm.bias, norm.bias.detach().double() / s)
                for lin in readers:
                    edits.set_data(lin.weight, to_storage(lin, weight_out_in(lin).detach().double() * s))
        yield {
            "method.alpha": float(alpha),
            "smoothquant.n_norms": len(act_max),
            "smoothquant.max_scale_spread": max(ratios, default=float("nan")),
        }
