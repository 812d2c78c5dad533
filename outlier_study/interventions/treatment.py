"""The shape every intervention and quantization method shares: a context manager over prepared inputs
that changes the model for its block, restores it bit-exactly, and yields a `Change` record.

Each option (a registry entry) brings its own config schema, an optional check against the model's
architecture that runs before anything is loaded, and a description for the docs and `--help`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from outlier_study.config.options import name_only
from outlier_study.interventions.record import Change, Unchanged

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch
    from outlier_study.models.loader import LoadedModel

# (the option's config node, the whole job config, the model's architecture) -> raises ConfigError
Check = Callable[[Any, Any, "Arch"], None]


@dataclass(frozen=True)
class Inputs:
    """Everything a treatment may need, prepared by the experiment."""

    lm: LoadedModel
    options: Any  # the option's config node: intervention.* or method.*
    threshold: Any  # the MA and CO rules
    windows: torch.Tensor | None = None  # where channels are detected (the job's or calibration windows)
    batch_size: int = 1
    progress: bool = False
    seed: int = 0  # random controls


@dataclass(frozen=True)
class Treatment:
    apply: Callable[[Inputs], AbstractContextManager[Change]]
    options: type  # the dataclass schema of the option's config keys
    description: str
    check: Check | None = None
    calibrated: bool = False  # needs calibration windows disjoint from the evaluation windows (methods)
    # runs with execution=layerwise: it acts through hooks, or edits each layer as it is read, never
    # needing every layer's weights at once
    layerwise: bool = False


@contextmanager
def _unchanged(inputs: Inputs) -> Iterator[Change]:
    yield Unchanged()


# `none` in both registries: the unmodified model.
NONE = Treatment(
    _unchanged, name_only("none", "the unmodified model"), "the unmodified model", layerwise=True
)
