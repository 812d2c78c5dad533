"""Outlier-handling methods compared under quantization, by name: one registry entry per method.

Each method is a context manager factory over a prepared `MethodInputs`; it leaves the model bit-exactly
as it found it on exit and yields a record with `summary()` (flat scalars for metrics.json). `check` runs
before anything expensive (calibration, evaluation) so bad input fails fast. Adding a method is one entry
in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from outlier_study.errors import ConfigError, require
from outlier_study.interventions.channel_edits import norm_output_cos
from outlier_study.interventions.massive import VALUES, InterventionLog, replace_massive
from outlier_study.interventions.parameters import GAMMA_VALUES, edit_gamma
from outlier_study.quant.rotation import check_rotation_support, rotate
from outlier_study.quant.smoothquant import calibrate, check_alpha, smooth

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel


class MethodRecord(Protocol):
    def summary(self) -> dict[str, Any]: ...


@dataclass
class Record:
    """A fixed summary (methods whose record does not change while the model runs)."""

    values: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass
class _MassiveRecord:
    """The MA replacement's counts under the method's names (they grow with every forward pass)."""

    log: InterventionLog

    def summary(self) -> dict[str, Any]:
        return {"method.value": self.log.value, "method.changed_total": self.log.total}


@dataclass(frozen=True)
class MethodInputs:
    """Everything a method may need, prepared by the experiment."""

    lm: LoadedModel
    cfg: Any  # the `method` config group (MethodConfig)
    threshold: Any  # the `threshold` config group (MA and CO rules)
    calibration: torch.Tensor | None  # (n, seq_len) windows disjoint from the evaluation windows
    batch_size: int = 1
    progress: bool = False


@dataclass(frozen=True)
class Method:
    apply: Callable[[MethodInputs], AbstractContextManager[MethodRecord]]
    description: str
    calibrated: bool = False  # needs `MethodInputs.calibration`
    check: Callable[[LoadedModel, Any], None] | None = None  # (lm, method cfg): fail fast on bad input


def _check_alpha(lm: LoadedModel, cfg: Any) -> None:
    check_alpha(cfg.alpha)


def _check_rotation(lm: LoadedModel, cfg: Any) -> None:
    check_rotation_support(lm)
    require(isinstance(cfg.seed, int), "method.seed", f"must be an integer, got {cfg.seed!r}")


def _check_value(lm: LoadedModel, cfg: Any) -> None:
    value = str(cfg.value)
    if value not in VALUES:
        raise ConfigError("method.value", f"unknown value '{value}'", allowed=VALUES)


@contextmanager
def _none(inputs: MethodInputs) -> Iterator[MethodRecord]:
    yield Record({})


@contextmanager
def _massive_y6(inputs: MethodInputs) -> Iterator[MethodRecord]:
    th = inputs.threshold
    with replace_massive(
        inputs.lm, "mlp.hidden", None, str(inputs.cfg.value), float(th.ma_abs), float(th.ma_ratio)
    ) as log:
        yield _MassiveRecord(log)


@contextmanager
def _smoothquant(inputs: MethodInputs) -> Iterator[MethodRecord]:
    if inputs.calibration is None:
        raise ValueError("smoothquant needs calibration windows (MethodInputs.calibration)")
    act_max = calibrate(inputs.lm, inputs.calibration, inputs.batch_size, inputs.progress)
    with smooth(inputs.lm, act_max, float(inputs.cfg.alpha)) as record:
        yield Record(record)


def _check_gamma(lm: LoadedModel, cfg: Any) -> None:
    lm.adapter.norm_names(str(cfg.norm), "method.norm")
    if str(cfg.value) not in GAMMA_VALUES:
        raise ConfigError(
            "method.value", f"unknown value '{cfg.value}' for gamma_smooth", allowed=GAMMA_VALUES
        )


@contextmanager
def _gamma_smooth(inputs: MethodInputs) -> Iterator[MethodRecord]:
    """γ at the COs of each norm's output (found on the calibration windows) set to the γ mean (or zero)."""
    if inputs.calibration is None:
        raise ValueError("gamma_smooth needs calibration windows (MethodInputs.calibration)")
    lm = inputs.lm
    norms = lm.adapter.norm_names(str(inputs.cfg.norm), "method.norm")
    layers = list(range(lm.n_layers))
    selection = norm_output_cos(lm, inputs.calibration, norms, layers, inputs.threshold, inputs.progress)
    with edit_gamma(lm, selection, str(inputs.cfg.value)) as log:
        yield Record({"method.value": log.value, "method.changed_total": log.total})


@contextmanager
def _rotation(inputs: MethodInputs) -> Iterator[MethodRecord]:
    with rotate(inputs.lm, int(inputs.cfg.seed)) as record:
        yield Record(record)


METHODS: dict[str, Method] = {
    "none": Method(_none, "the unmodified model"),
    "massive_y6": Method(
        _massive_y6,
        "massive activations at y6 (mlp.hidden, every layer) replaced by method.value, before quantizing",
        check=_check_value,
    ),
    "gamma_smooth": Method(
        _gamma_smooth,
        "γ of the norms at the channel-wise outliers of their output (calibration windows) set to the γ mean",
        calibrated=True,
        check=_check_gamma,
    ),
    "smoothquant": Method(
        _smoothquant,
        "SmoothQuant scales max|X|^α / max|W|^(1−α) folded into norms and the linears reading them",
        calibrated=True,
        check=_check_alpha,
    ),
    "rotation": Method(
        _rotation,
        "QuaRot-style randomized Hadamard rotation of the residual stream + online rotation before down_proj",
        check=_check_rotation,
    ),
}


def get_method(name: str) -> Method:
    """The registry entry, or a one-line ConfigError naming method.name."""
    if name not in METHODS:
        raise ConfigError("method.name", f"unknown method '{name}'", allowed=METHODS)
    return METHODS[name]
