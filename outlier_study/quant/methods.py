"""Outlier-handling methods compared under quantization, by name: one registry entry per method.

Each method is a `Treatment` (the shape interventions have too): it changes the model for its block,
restores it bit-exactly on exit and yields a `Change` record; its options schema and its architecture
check run before anything is loaded. Adding a method is one entry in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outlier_study.config.options import opt
from outlier_study.config.vocab import GammaValue, MAValue
from outlier_study.detect.select import norm_output_cos
from outlier_study.detect.superweight import check_dense_down, detect_super_weights
from outlier_study.errors import ConfigError
from outlier_study.interventions.massive import replace_massive
from outlier_study.interventions.parameters import edit_gamma
from outlier_study.interventions.record import Change, Transformed
from outlier_study.interventions.treatment import NONE, Inputs, Treatment
from outlier_study.quant.rotation import rotate
from outlier_study.quant.smoothquant import calibrate, smooth
from outlier_study.quant.superweight_keep import keep_super_weights
from outlier_study.registry import Registry

if TYPE_CHECKING:
    from outlier_study.adapters.base import Arch

CALIB_DOC = "calibration windows (dataset.seq_len tokens each), disjoint from the evaluation windows"


@dataclass
class MassiveY6Options:
    name: str = opt("massive_y6", "MAs at y6 (mlp.hidden, every layer) replaced before quantizing")
    value: MAValue = opt(MAValue.mean, "zero | mean: the window's mean of the whole tensor at y6")


@dataclass
class GammaSmoothOptions:
    name: str = opt(
        "gamma_smooth", "γ at the COs of each norm's output (calibration windows) set to the γ mean"
    )
    norm: str = opt("both", "attn | mlp | both (Gemma3 also attn_post | mlp_post)")
    value: GammaValue = opt(GammaValue.mean, "mean (of that γ over all channels) | zero")
    calib_windows: int = opt(32, CALIB_DOC, ge=1)


@dataclass
class SmoothQuantOptions:
    name: str = opt("smoothquant", "SmoothQuant scales folded into norms and the linears reading them")
    alpha: float = opt(
        0.5, "migration strength α (0: all on the activations, 1: all on the weights)", ge=0, le=1
    )
    calib_windows: int = opt(32, CALIB_DOC, ge=1)


@dataclass
class RotationOptions:
    name: str = opt("rotation", "QuaRot's rotations: residual, per head, queries/keys, before down_proj")
    seed: int = opt(0, "seed of the random signs and small orthogonal factors (R1; R4, R2, R3: +1, +2, +3)")


@dataclass
class SuperweightKeepOptions:
    name: str = opt("superweight_keep", "super weights (found on calibration windows) kept in full precision")
    keep_activations: bool = opt(
        False,
        "also keep the MAs each super weight reads (y6, its input channel j) out of activation quantization",
    )
    calib_windows: int = opt(8, CALIB_DOC, ge=1)


def _check_gamma(options: Any, cfg: Any, arch: Arch) -> None:
    arch.adapter.norm_names(str(options.norm), "method.norm")


def _check_rotation(options: Any, cfg: Any, arch: Arch) -> None:
    blocker = arch.adapter.rotation_blocker
    if blocker is not None:
        raise ConfigError(
            "method.name",
            f"rotation does not apply to {arch.adapter.family} models: {blocker}",
            allowed=[m for m in METHODS.names() if m != "rotation"],
        )


@contextmanager
def _massive_y6(inputs: Inputs) -> Iterator[Change]:
    th = inputs.threshold
    with replace_massive(
        inputs.lm, "mlp.hidden", None, str(inputs.options.value), float(th.ma_abs), float(th.ma_ratio)
    ) as log:
        yield log


@contextmanager
def _gamma_smooth(inputs: Inputs) -> Iterator[Change]:
    """γ at the COs of each norm's output (found on the calibration windows) set to the γ mean (or zero)."""
    assert inputs.windows is not None, "gamma_smooth is calibrated"
    lm = inputs.lm
    norms = lm.adapter.norm_names(str(inputs.options.norm), "method.norm")
    layers = list(range(lm.n_layers))
    selection = norm_output_cos(lm, inputs.windows, norms, layers, inputs.threshold, inputs.progress)
    with edit_gamma(lm, selection, str(inputs.options.value)) as log:
        yield log


@contextmanager
def _smoothquant(inputs: Inputs) -> Iterator[Change]:
    assert inputs.windows is not None, "smoothquant is calibrated"
    act_max = calibrate(inputs.lm, inputs.windows, inputs.batch_size, inputs.progress)
    with smooth(inputs.lm, act_max, float(inputs.options.alpha)) as record:
        yield Transformed(record)


@contextmanager
def _rotation(inputs: Inputs) -> Iterator[Change]:
    with rotate(inputs.lm, int(inputs.options.seed)) as record:
        yield Transformed(record)


@contextmanager
def _superweight_keep(inputs: Inputs) -> Iterator[Change]:
    """Super weights detected on the calibration windows, kept out of (and added back after) quantization."""
    assert inputs.windows is not None, "superweight_keep is calibrated"
    lm, th = inputs.lm, inputs.threshold
    layers = list(range(lm.n_layers))
    found, _ = detect_super_weights(lm, inputs.windows, layers, th, inputs.batch_size, inputs.progress)
    ma_rule = (float(th.ma_abs), float(th.ma_ratio))
    with keep_super_weights(lm, found, bool(inputs.options.keep_activations), ma_rule) as record:
        yield record


METHODS: Registry[Treatment] = Registry("method", "method.name")
METHODS.add("none", NONE)
METHODS.add(
    "massive_y6",
    Treatment(
        _massive_y6,
        MassiveY6Options,
        "massive activations at y6 (mlp.hidden, every layer) replaced by method.value, before quantizing",
    ),
)
METHODS.add(
    "gamma_smooth",
    Treatment(
        _gamma_smooth,
        GammaSmoothOptions,
        "γ of the norms at the channel-wise outliers of their output (calibration windows) set to the γ mean",
        _check_gamma,
        calibrated=True,
    ),
)
METHODS.add(
    "smoothquant",
    Treatment(
        _smoothquant,
        SmoothQuantOptions,
        "SmoothQuant scales max|X|^α / max|W|^(1−α) folded into norms and the linears reading them",
        calibrated=True,
    ),
)
METHODS.add(
    "rotation",
    Treatment(
        _rotation,
        RotationOptions,
        "QuaRot's randomized Hadamard rotations: residual stream and v/o per head folded, post-RoPE q/k "
        "and the down_proj input online",
        _check_rotation,
    ),
)
METHODS.add(
    "superweight_keep",
    Treatment(
        _superweight_keep,
        SuperweightKeepOptions,
        "super weights of down_proj (found on calibration windows) kept in full precision while the rest is "
        "quantized; optionally the MAs they read too",
        lambda options, cfg, arch: check_dense_down(arch, "method.name"),
        calibrated=True,
    ),
)
