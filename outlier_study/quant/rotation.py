"""QuaRot-style rotation of Llama-like models: an exact equivalence that spreads outliers before quantizing.

1. Every RMSNorm γ is folded into the linears that read the norm (q/k/v, gate/up, lm_head); the norms
   become γ = 1. An RMSNorm without γ commutes with any orthogonal Q: rms(xQ) = rms(x).
2. The residual stream is rotated by a seeded randomized orthogonal Q (see `orthogonal`): embeddings
   E ← E Q, readers W ← W Q, writers (o_proj, down_proj) W ← Qᵀ W and b ← b Q, lm_head W ← W Q.
   A tied lm_head is untied for the block (it needs γ_final folded in, the embedding does not).
3. An online rotation H of the MLP's intermediate size: a pre-hook turns down_proj's input x into x H and
   down_proj's weight absorbs Hᵀ (W ← W H), so the quantized tensor at y6 is the rotated one.

Weights are transformed in float64 and cast back; attention internals (per-head rotations of v/o and of
the KV cache, which QuaRot adds) are not rotated. Only Llama, Qwen2 and Mistral are supported: GPT-2's
LayerNorm subtracts the mean and Gemma3's sandwich norms sit on the residual branches, which needs more
than this fold (their adapters say why in `rotation_blocker`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.linears import weight_out_in
from outlier_study.interventions.edits import Edits, reversible
from outlier_study.quant.orthogonal import KroneckerRotation, randomized_rotation

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

_ROW_CHUNK = 8192  # rows per float64 product, so a large vocabulary never needs a float64 copy at once


def _rows_times(w: torch.Tensor, right: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(w · diag(scale)) @ right in float64, row chunk by row chunk, returned in w's dtype."""
    out = torch.empty(w.shape[0], right.shape[1], dtype=w.dtype, device=w.device)
    right = right.to(w.device)
    for s in range(0, w.shape[0], _ROW_CHUNK):
        block = w[s : s + _ROW_CHUNK].double()
        if scale is not None:
            block = block * scale.to(w.device)
        out[s : s + _ROW_CHUNK] = (block @ right).to(w.dtype)
    return out


def _online_hook(rotation: KroneckerRotation) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (rotation.apply(args[0]), *args[1:])

    return hook


def _rotate_layer(
    block: nn.Module, lm: LoadedModel, edits: Edits, q64: torch.Tensor, h64: torch.Tensor
) -> None:
    """Fold this layer's norm γ into its readers, rotate readers (W Q) and writers (Qᵀ W, b Q), and give
    down_proj the online rotation's transpose (W H)."""
    adapter = lm.adapter
    for key, readers in adapter.readers().items():
        norm = adapter.module(block, adapter.norms[key].module)
        gamma = norm.weight.detach().double()
        for path in readers:
            lin = adapter.module(block, path)
            edits.set_data(lin.weight, _rows_times(lin.weight.detach(), q64, gamma))
        edits.set_data(norm.weight, torch.ones_like(norm.weight))
    for path in adapter.writers:
        lin = adapter.module(block, path)
        w = lin.weight.detach()
        if path == adapter.down:
            w = _rows_times(w, h64)
        edits.set_data(lin.weight, _rows_times(w.t(), q64).t())  # Qᵀ W = (Wᵀ Q)ᵀ
        if lin.bias is not None:
            edits.set_data(lin.bias, _rows_times(lin.bias.detach()[None], q64)[0])


def _rotate_ends(lm: LoadedModel, edits: Edits, q64: torch.Tensor) -> bool:
    """Embeddings E Q; the final norm's γ folded into lm_head, then lm_head W Q (untied if it was tied).
    Returns whether the lm_head was tied."""
    model = lm.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    final = lm.adapter.final_norm_of(model)
    new_head = _rows_times(weight_out_in(head).detach(), q64, final.weight.detach().double())
    if tied:  # before the embedding edit below, which would otherwise reach the head too
        edits.set_attr(head, "weight", nn.Parameter(new_head, requires_grad=head.weight.requires_grad))
    else:
        edits.set_data(head.weight, new_head)
    edits.set_data(final.weight, torch.ones_like(final.weight))
    edits.set_data(emb.weight, _rows_times(emb.weight.detach(), q64))
    return tied


@contextmanager
def rotate(lm: LoadedModel, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Rotate the model for the block (see the module docstring); bit-exact restore on exit or error."""
    config = lm.model.config
    q_res = randomized_rotation(int(config.hidden_size), seed)
    h_mlp = randomized_rotation(int(config.intermediate_size), seed + 1)
    q64, h64 = q_res.matrix(), h_mlp.matrix()
    adapter = lm.adapter
    with reversible() as edits, ExitStack() as stack:
        with torch.no_grad():  # not around the yield: the body keeps the caller's grad mode
            for block in adapter.blocks(lm.model):
                _rotate_layer(block, lm, edits, q64, h64)
                down = adapter.module(block, adapter.down)
                hook = down.register_forward_pre_hook(_online_hook(h_mlp), prepend=True)
                stack.callback(hook.remove)
            tied = _rotate_ends(lm, edits, q64)
        yield {
            "method.seed": int(seed),
            "rotation.residual": q_res.describe(),
            "rotation.mlp": h_mlp.describe(),
            "rotation.untied_lm_head": tied,
        }
