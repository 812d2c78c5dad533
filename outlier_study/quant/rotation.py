"""QuaRot's rotations: exact equivalences of the full-precision model that spread outliers over channels
before the weights, the linear inputs and the KV cache are quantized.

- R1, the residual stream (folded). Every pre-norm becomes an RMSNorm without γ, which commutes with any
  orthogonal Q (rms(xQ) = rms(x)): its γ (Gemma: 1 + w) is folded into the linears that read it, its β
  into their biases. Then embeddings E ← E Q, readers W ← W Q, writers W ← Qᵀ W and b ← b Q, lm_head
  W ← W Q (a tied lm_head is untied for the block: it needs the final norm's γ, the embedding does not).
- LayerNorm families (GPT-2): a LayerNorm only turns into an RMSNorm when its input has mean zero, so
  first every writer into the residual stream (token and position embeddings, both c_proj and their
  biases) is centered, W ← (I − 11ᵀ/n) W: the stream then has mean zero everywhere and LayerNorm's mean
  subtraction is a no-op. Each LayerNorm is swapped for an RMSNorm with γ = 1 and its eps for the block.
- Post-norm families (Gemma3's sandwich norms): the norm on a branch output has a γ that no linear
  follows before the residual add, so it cannot be folded. That branch's writer is left unrotated and the
  post-norm's output is rotated online, y ← y Q (a forward hook).
- R2, per head (folded): v_proj's rows of every kv head W ← R2ᵀ W (b ← b R2), o_proj's input columns of
  every query head W ← W R2. The attention output of a head is a weighted sum of its values, so it
  arrives rotated and o_proj undoes it; with GQA every head uses the same R2.
- R3, queries and keys (online): q ← q H3 and k ← k H3 after RoPE (and the q/k norms), where the attention
  function receives them; q kᵀ is unchanged. The KV quantizer runs after it, on the rotated keys.
- R4, before down_proj (online): a pre-hook turns down_proj's input x into x H4 and its weight absorbs
  H4ᵀ (W ← W H4), so the tensor quantized at y6 is the rotated one.

Every matrix is a seeded `randomized_rotation` (see `orthogonal`). Weights are transformed in float64 and
cast back; every edit, module swap, hook and the attention implementation come back bit-exactly on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_study.adapters.derived_taps import layer_standardize, standardizer
from outlier_study.adapters.linears import LinearLike, to_storage, weight_out_in
from outlier_study.interventions.edits import Edits, reversible
from outlier_study.quant.attention_inputs import QKV, attention_inputs
from outlier_study.quant.orthogonal import KroneckerRotation, randomized_rotation

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

_ROW_CHUNK = 8192  # rows per float64 product, so a large vocabulary never needs a float64 copy at once
# The writer of each residual branch and the post-norm its output may pass before the residual add.
BRANCH_ENDS = {"o": "attn_post", "down": "mlp_post"}


def head_dim(config: object) -> int:
    """Per-head width of queries, keys and values."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return int(config.hidden_size) // int(config.num_attention_heads)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Rotations:
    """The four seeded rotations of one model."""

    residual: KroneckerRotation  # R1
    head: KroneckerRotation  # R2
    qk: KroneckerRotation  # R3
    mlp: KroneckerRotation  # R4

    @classmethod
    def seeded(cls, lm: LoadedModel, seed: int) -> Rotations:
        """Sizes from the modules (configs name them differently); R1 and R4 keep the seeds they had before
        R2 and R3 were added (seed, seed + 1)."""
        hd = head_dim(lm.model.config)
        down = lm.adapter.module(lm.adapter.blocks(lm.model)[0], lm.adapter.down)
        return cls(
            residual=randomized_rotation(lm.model.get_input_embeddings().embedding_dim, seed),
            mlp=randomized_rotation(weight_out_in(down).shape[1], seed + 1),  # type: ignore[arg-type]
            head=randomized_rotation(hd, seed + 2),
            qk=randomized_rotation(hd, seed + 3),
        )

    def per_head(self, width: int) -> torch.Tensor:
        """R2 on every head of a width-wide concatenation of heads: I ⊗ R2 (float64)."""
        r2 = self.head.matrix()
        return torch.kron(torch.eye(width // r2.shape[0], dtype=torch.float64), r2)


# ---------------------------------------------------------------- weight folds (float64, cast back)


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


def _fold_input(
    edits: Edits, lin: LinearLike, right: torch.Tensor, scale: torch.Tensor | None = None
) -> None:
    """A linear whose input now arrives multiplied by the orthogonal `right` (and no longer scaled by a
    γ): its (out, in) weight W ← W · diag(scale) · right."""
    w = weight_out_in(lin).detach()
    edits.set_data(lin.weight, to_storage(lin, _rows_times(w, right, scale)))


def _fold_output(edits: Edits, lin: LinearLike, right: torch.Tensor, rows: slice = slice(None)) -> None:
    """The linear's output rows `rows` come out multiplied by `right`: W ← rightᵀ W, b ← b right."""
    w = weight_out_in(lin).detach().clone()
    w[rows] = _rows_times(w[rows].t(), right).t()
    edits.set_data(lin.weight, to_storage(lin, w))
    if lin.bias is not None:
        b = lin.bias.detach().clone()
        b[rows] = _rows_times(b[rows][None], right)[0]
        edits.set_data(lin.bias, b)


def _add_bias(edits: Edits, lin: nn.Module, delta: torch.Tensor) -> None:
    """b ← b + delta; a linear without a bias gets one for the block."""
    bias = getattr(lin, "bias", None)
    if bias is None:
        edits.set_attr(lin, "bias", nn.Parameter(delta.to(lin.weight.dtype), requires_grad=False))
    else:
        edits.set_data(bias, bias.detach().double() + delta)


# ---------------------------------------------------------------- norm forms


def _unit_gamma(edits: Edits, owner: nn.Module, name: str, offset: float) -> None:
    """An RMSNorm whose γ went into its readers scales by 1 (Gemma's weight 0)."""
    norm = getattr(owner, name)
    edits.set_data(norm.weight, torch.full_like(norm.weight, 1.0 - offset))


def _rms_for_layernorm(edits: Edits, owner: nn.Module, name: str, offset: float) -> None:
    """A LayerNorm reading a mean-zero stream is an RMSNorm with its eps: swapped in, γ = 1, no β."""
    ln = getattr(owner, name)
    rms = nn.RMSNorm(ln.normalized_shape, eps=ln.eps, device=ln.weight.device, dtype=ln.weight.dtype)
    edits.set_attr(owner, name, rms.requires_grad_(ln.weight.requires_grad))


@dataclass(frozen=True)
class NormForm:
    """What a kind of pre-norm needs to become an RMSNorm without γ."""

    centered: bool  # the residual writers must produce mean-zero outputs first
    neutralize: Callable[[Edits, nn.Module, str, float], None]  # the norm after its γ (β) is folded


_RMS = NormForm(centered=False, neutralize=_unit_gamma)
NORM_FORMS = {layer_standardize: NormForm(centered=True, neutralize=_rms_for_layernorm)}  # else _RMS


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path`'s last component as an attribute, and that name."""
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _fold_norm(
    edits: Edits, owner: nn.Module, name: str, readers: list[nn.Module], q64: torch.Tensor, lm: LoadedModel
) -> NormForm:
    """γ (and β) of a pre-norm into its readers, which then read the rotated stream (W ← W diag(γ) Q,
    b ← b + W β); the norm is neutralized for the block."""
    norm = getattr(owner, name)
    offset = float(lm.adapter.gamma_offset)
    gamma = norm.weight.detach().double() + offset
    beta = getattr(norm, "bias", None)
    for lin in readers:
        if beta is not None:
            _add_bias(edits, lin, weight_out_in(lin).detach().double() @ beta.detach().double())
        _fold_input(edits, lin, q64, gamma)  # type: ignore[arg-type]
    form = NORM_FORMS.get(standardizer(norm), _RMS)
    form.neutralize(edits, owner, name, offset)
    return form


# ---------------------------------------------------------------- online pieces


def _input_hook(rotation: KroneckerRotation) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (rotation.apply(args[0]), *args[1:])

    return hook


def _output_hook(rotation: KroneckerRotation) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return rotation.apply(output)

    return hook


def _qk_transform(rotation: KroneckerRotation) -> Any:
    def transform(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        return rotation.apply(q), rotation.apply(k), v

    return transform


# ---------------------------------------------------------------- the model


def _writer_basis(q64: torch.Tensor, form: NormForm) -> torch.Tensor:
    """What the residual writers' outputs are multiplied by: Q, or (I − 11ᵀ/n) Q to center them first."""
    if not form.centered:
        return q64
    n = q64.shape[0]
    return (torch.eye(n, dtype=torch.float64) - 1.0 / n) @ q64


def _rotate_layer(
    block: nn.Module,
    lm: LoadedModel,
    edits: Edits,
    stack: ExitStack,
    rot: Rotations,
    folds: tuple[torch.Tensor, torch.Tensor],
) -> list[str]:
    """R1's readers and writers, R2 and R4 of one layer; returns the post-norms rotated online.
    `folds`: Q (the readers') and the writer basis (float64)."""
    adapter = lm.adapter
    q64, basis = folds
    for key, paths in adapter.readers().items():
        owner, name = _owner(block, adapter.norms[key].module)
        _fold_norm(edits, owner, name, [adapter.module(block, p) for p in paths], q64, lm)
    v_spec, o = adapter.weights["v"], adapter.module(block, adapter.weights["o"].module)
    v_rows = slice(v_spec.start, v_spec.stop)
    v = adapter.module(block, v_spec.module)
    _fold_output(edits, v, rot.per_head(weight_out_in(v)[v_rows].shape[0]), v_rows)  # type: ignore[arg-type]
    _fold_input(edits, o, rot.per_head(weight_out_in(o).shape[1]))  # type: ignore[arg-type]
    down = adapter.module(block, adapter.down)
    _fold_input(edits, down, rot.mlp.matrix())  # type: ignore[arg-type]
    stack.callback(down.register_forward_pre_hook(_input_hook(rot.mlp), prepend=True).remove)
    online = []
    for writer, post in BRANCH_ENDS.items():
        if post in adapter.norms:
            norm = adapter.module(block, adapter.norms[post].module)
            stack.callback(norm.register_forward_hook(_output_hook(rot.residual)).remove)
            online.append(post)
        else:
            _fold_output(edits, adapter.module(block, adapter.weights[writer].module), basis)  # type: ignore[arg-type]
    return online


def _stream_embeddings(lm: LoadedModel) -> list[nn.Embedding]:
    """The embeddings added into the residual stream before layer 0 (token, and learned positions)."""
    inside = lm.adapter.layers_path + "."
    width = lm.model.get_input_embeddings().embedding_dim
    return [
        m
        for path, m in lm.model.named_modules()
        if isinstance(m, nn.Embedding) and not path.startswith(inside) and m.embedding_dim == width
    ]


def _rotate_ends(lm: LoadedModel, edits: Edits, q64: torch.Tensor) -> tuple[bool, NormForm, torch.Tensor]:
    """The final norm folded into lm_head, then lm_head W ← W Q (untied if it was tied); the embeddings
    E ← E · basis. Returns whether the lm_head was tied, the model's norm form and the writer basis."""
    model = lm.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    if tied:  # before the embedding edit below, which would otherwise reach the head too
        shared = head.weight
        edits.set_attr(head, "weight", nn.Parameter(shared.detach(), requires_grad=shared.requires_grad))
    owner, name = _owner(model, lm.adapter.final_norm)
    form = _fold_norm(edits, owner, name, [head], q64, lm)
    basis = _writer_basis(q64, form)
    for embedding in _stream_embeddings(lm):
        edits.set_data(embedding.weight, _rows_times(embedding.weight.detach(), basis))
    return tied, form, basis


@contextmanager
def rotate(lm: LoadedModel, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Rotate the model for the block (see the module docstring); bit-exact restore on exit or error."""
    rot = Rotations.seeded(lm, seed)
    q64 = rot.residual.matrix()
    with reversible() as edits, ExitStack() as stack:
        with torch.no_grad():  # not around the yield: the body keeps the caller's grad mode
            tied, form, basis = _rotate_ends(lm, edits, q64)
            online: list[str] = []
            for block in lm.adapter.blocks(lm.model):
                online = _rotate_layer(block, lm, edits, stack, rot, (q64, basis))
        stack.enter_context(attention_inputs(lm.model, _qk_transform(rot.qk)))
        yield {
            "method.seed": int(seed),
            "rotation.residual": rot.residual.describe(),
            "rotation.head": rot.head.describe(),
            "rotation.qk_online": rot.qk.describe(),
            "rotation.mlp": rot.mlp.describe(),
            "rotation.layernorm_to_rms": form.centered,
            "rotation.post_norms_online": ", ".join(online) or "none",
            "rotation.untied_lm_head": tied,
        }
