"""The `weights` intervention: named weights, whole output rows or whole input columns zeroed or scaled, so
coordinates published for another model (a super weight, say) are tested in one command and swept with -m.

Coordinates are in the (out, in) orientation of every weight reader here: `row` is an output channel,
`col` an input channel. Every entry is checked against the model's shapes before its weights load (the
shapes come from the model built on the meta device: no memory, no weights); the edit saves only the
entries it overwrites and restores them bit-exactly on exit, also when the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM

from outlier_study.config.options import opt
from outlier_study.config.vocab import WeightMode
from outlier_study.errors import ConfigError, require
from outlier_study.interventions.parameters import Entry, edited
from outlier_study.interventions.record import Edited
from outlier_study.interventions.treatment import Inputs, Treatment

if TYPE_CHECKING:
    from outlier_study.adapters.base import Adapter, Arch
    from outlier_study.models.loader import LoadedModel

FIELD = "intervention.weights"


@dataclass
class WeightEntry:
    layer: int = opt(MISSING, "layer (from 0, negative from the end)")
    matrix: str = opt(MISSING, "the adapter's weight name: q k v o gate up down")
    row: int | None = opt(None, "output channel (row of the (out, in) weight); null: every row", ge=0)
    col: int | None = opt(None, "input channel (column); null: every column", ge=0)
    expert: int | None = opt(None, "the expert whose matrix it is (MoE models); null: the dense matrix", ge=0)


@dataclass
class WeightsOptions:
    name: str = opt("weights", "zero or scale named weights, output rows or input columns")
    weights: list[WeightEntry] = opt(
        [], "what to edit, each {layer, matrix, row, col, expert}: row and col name one weight", min_items=1
    )
    mode: WeightMode = opt(WeightMode.zero, "zero | scale (multiply by factor)")
    factor: float = opt(2.0, "mode=scale: the factor each edited weight is multiplied by")


@dataclass(frozen=True)
class Target:
    """One weight (row and col), a whole output row (col None) or a whole input column (row None)."""

    layer: int
    matrix: str
    row: int | None = None
    col: int | None = None
    expert: int | None = None

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.matrix if self.expert is None else f"{self.matrix}.expert{self.expert}"


def target_of(entry: Any, arch: Arch, field: str) -> Target:
    """A config entry with its layer and matrix names resolved against the architecture."""
    for key in ("layer", "matrix"):
        require(not _missing(entry, key), f"{field}.{key}", "required, not given")
    require(
        entry.row is not None or entry.col is not None,
        field,
        "give row, col or both (row alone: the whole output row; col alone: the whole input column)",
    )
    return Target(
        arch.layer(int(entry.layer), f"{field}.layer"),
        arch.adapter.weight_name(str(entry.matrix), f"{field}.matrix"),
        None if entry.row is None else int(entry.row),
        None if entry.col is None else int(entry.col),
        None if entry.expert is None else int(entry.expert),
    )


def _missing(entry: Any, key: str) -> bool:
    return OmegaConf.is_missing(entry, key) if OmegaConf.is_config(entry) else getattr(entry, key) is MISSING


MLP_MATRICES = ("gate", "up", "down")  # the matrices a mixture-of-experts layer holds once per expert


def matrix_view(adapter: Adapter, block: nn.Module, target: Target, field: str) -> torch.Tensor:
    """The (out, in) view of the target's matrix, sharing storage with the parameter."""
    if target.expert is None:
        moe = target.layer in adapter.moe and target.matrix in MLP_MATRICES
        require(
            not moe, f"{field}.expert", f"layer {target.layer}'s MLP is a mixture of experts: name the expert"
        )
        return adapter.weight_view(block, target.matrix)
    by_expert = getattr(adapter, "weight_view_expert", None)
    if by_expert is None:
        raise ConfigError(f"{field}.expert", "the model has no experts")
    try:
        return by_expert(block, target.matrix, target.expert)
    except (IndexError, KeyError, ValueError) as err:  # no experts in this layer, or no such expert
        why = err.args[0] if err.args else f"no expert {target.expert}"
        raise ConfigError(f"{field}.expert", f"layer {target.layer}: {why}") from None


def _check_range(target: Target, shape: torch.Size, field: str) -> None:
    for key, index, size in (("row", target.row, shape[0]), ("col", target.col, shape[1])):
        require(
            index is None or index < size,
            f"{field}.{key}",
            f"{key} {index} out of range for {target.matrix} of layer {target.layer}",
            [f"0..{size - 1}"],
        )


def _slot(view: torch.Tensor, target: Target) -> tuple[torch.Tensor, int, torch.Tensor, list[int]]:
    """(the tensor written, its dim, the index along it, the flat (out, in) indices it covers)."""
    rows, cols = view.shape
    if target.row is not None and target.col is not None:
        return view[target.row], 0, torch.tensor([target.col]), [target.row * cols + target.col]
    if target.row is not None:
        return view, 0, torch.tensor([target.row]), list(range(target.row * cols, (target.row + 1) * cols))
    assert target.col is not None
    return view, 1, torch.tensor([target.col]), [r * cols + target.col for r in range(rows)]


def mode_text(mode: str, factor: float) -> str:
    return "zero" if mode == "zero" else f"scale ×{factor:g}"


@contextmanager
def edit_weights(
    lm: LoadedModel, targets: Sequence[Target], mode: str, factor: float = 0.0, field: str = FIELD
) -> Iterator[Edited]:
    """Zero the targets, or multiply them by `factor`; every new value is computed before the first write
    (`parameters.edited`: a layerwise model is edited in each layer as it is read)."""
    changed: dict[tuple[int, str], set[int]] = {}

    def plan(block: nn.Module, item: tuple[str, Target]) -> Entry:
        where, target = item
        view = matrix_view(lm.adapter, block, target, where)
        _check_range(target, view.shape, where)
        line, dim, index, flat = _slot(view, target)
        changed.setdefault(target.key, set()).update(flat)
        part = line.detach().index_select(dim, index)
        new = torch.zeros_like(part) if str(mode) == "zero" else part.float().mul(factor).to(part.dtype)
        return line, dim, index, new

    items = [(target.layer, (f"{field}[{k}]", target)) for k, target in enumerate(targets)]
    with edited(lm, items, plan):
        record = {k: sorted(v) for k, v in changed.items()}
        yield Edited("weights", mode_text(str(mode), factor), record)


def _meta_blocks(arch: Arch) -> nn.ModuleList:
    """The decoder layers of the model built on the meta device: its shapes, without memory or weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.config)
    return arch.adapter.blocks(model)


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    targets = [target_of(entry, arch, f"{FIELD}[{i}]") for i, entry in enumerate(options.weights)]
    blocks = _meta_blocks(arch) if targets else None
    for i, target in enumerate(targets):
        assert blocks is not None
        where = f"{FIELD}[{i}]"
        _check_range(target, matrix_view(arch.adapter, blocks[target.layer], target, where).shape, where)


@contextmanager
def _apply(inputs: Inputs) -> Iterator[Edited]:
    o = inputs.options
    targets = [target_of(entry, inputs.lm.arch, f"{FIELD}[{i}]") for i, entry in enumerate(o.weights)]
    with edit_weights(inputs.lm, targets, str(o.mode), float(o.factor)) as log:
        yield log


TREATMENT = Treatment(
    _apply,
    WeightsOptions,
    "named weights, output rows or input columns zeroed or scaled",
    _check,
    layerwise=True,  # each named weight is edited in its layer as the layer is read
)
