"""Weight quantizers by name (`quant.weights`): what turns the decoder's linear weights into grid values.

Each entry maps a `WeightJob` (the model as the method left it, the setting, its options, calibration
windows) to the quantized (out, in) weight of every decoder linear, plus what to record. `fake_quant`
installs them and `quant_error` measures them, so every quantizer covers exactly the linears RTN covers
(`adapter.linears`: every `nn.Linear`/`Conv1D` inside the decoder layers, the shared experts' included;
the lm_head and embeddings stay in full precision). Adding one is one entry in `WEIGHT_QUANTIZERS`.

- `rtn`: round-to-nearest, one step per output row or group (`fake.quantize`).
- `gptq`: GPTQ (`gptq.py`), layer by layer (`layerwise.py`): layer l's Hessians are taken on the outputs
  of layers 0..l-1 already quantized, with the method's hooks active (the online rotation before
  down_proj included) and activations in full precision (no activation or KV quantization while
  calibrating: GPTQ fits the weights to the inputs the full-precision-activation model gives, as GPTQ,
  QuaRot and SmoothQuant do).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from outlier_study.adapters.linears import to_storage, weight_out_in
from outlier_study.interventions.edits import reversible
from outlier_study.quant.fake import OFF_BITS, QuantSpec, quantize
from outlier_study.quant.gptq import GPTQSettings, gptq_quantize
from outlier_study.quant.layerwise import capture_layer_calls, hessians, run_layer
from outlier_study.registry import Registry

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

QuantizedWeights = dict[nn.Module, torch.Tensor]  # linear -> its quantized weight, (out, in)


@dataclass(frozen=True)
class WeightJob:
    lm: LoadedModel
    spec: QuantSpec
    options: Any = None  # the quantizer's own options (quant.gptq for gptq)
    calibration: torch.Tensor | None = None  # calibration windows, disjoint from the evaluation windows
    batch_size: int = 1
    progress: bool = False


@dataclass(frozen=True)
class WeightQuantizer:
    quantize: Callable[[WeightJob], tuple[QuantizedWeights, dict[str, Any]]]
    calibrated: bool  # needs calibration windows
    description: str


def _rtn(job: WeightJob) -> tuple[QuantizedWeights, dict[str, Any]]:
    spec = job.spec
    with torch.no_grad():
        weights = {
            module: quantize(weight_out_in(module).detach(), spec.w_bits, group_size=spec.w_group_size)
            for _, _, module in job.lm.adapter.linears(job.lm.model)
        }
    return weights, {}


def gptq_settings(options: Any) -> GPTQSettings:
    """The algorithm's settings from the quant.gptq config node (or defaults for None)."""
    if options is None:
        return GPTQSettings()
    return GPTQSettings(float(options.damp), int(options.block_size), bool(options.act_order))


def _gptq(job: WeightJob) -> tuple[QuantizedWeights, dict[str, Any]]:
    """GPTQ of every decoder linear, layer by layer; the model is left as it was."""
    assert job.calibration is not None, "gptq is calibrated"
    lm, spec, settings = job.lm, job.spec, gptq_settings(job.options)
    started = time.perf_counter()
    by_layer: dict[int, list[tuple[str, nn.Module]]] = {}
    for layer, path, module in lm.adapter.linears(lm.model):
        by_layer.setdefault(layer, []).append((path, module))
    calls = capture_layer_calls(lm, job.calibration, job.batch_size)
    hidden = calls.hidden
    weights: QuantizedWeights = {}
    raised: list[str] = []
    uncalibrated: list[str] = []
    dead = 0
    blocks = list(lm.adapter.blocks(lm.model))
    bar = tqdm(total=len(blocks), desc=f"GPTQ ({spec.label})", unit="layer", disable=not job.progress)
    with reversible() as edits:  # quantized layers stay in place only while the later ones calibrate
        for layer, block in enumerate(blocks):
            linears = by_layer.get(layer, [])
            with hessians([m for _, m in linears]) as log:
                for h, call in zip(hidden, calls.calls[layer], strict=True):
                    run_layer(block, h, call)
            names = {m: f"{layer}:{path}" for path, m in linears}
            with torch.no_grad():
                for group in log.groups():
                    stacked = torch.cat([weight_out_in(m).detach() for m in group])
                    result = gptq_quantize(
                        stacked, log.hessian(group[0]), spec.w_bits, spec.w_group_size, settings
                    )
                    if result.damp != settings.damp:
                        raised += [names[m] for m in group]
                    dead += result.dead_columns
                    rows = [weight_out_in(m).shape[0] for m in group]
                    for module, piece in zip(group, result.weight.split(rows), strict=True):
                        weights[module] = piece
                for _, module in linears:
                    if module not in weights:  # never ran on the calibration windows
                        w = weight_out_in(module).detach()
                        weights[module] = quantize(w, spec.w_bits, group_size=spec.w_group_size)
                        uncalibrated.append(names[module])
                    edits.set_data(module.weight, to_storage(module, weights[module]))
            hidden = [run_layer(block, h, call) for h, call in zip(hidden, calls.calls[layer], strict=True)]
            bar.update(1)
    bar.close()
    record = {
        "quant.gptq.damp": settings.damp,
        "quant.gptq.block_size": settings.block_size,
        "quant.gptq.act_order": settings.act_order,
        "quant.gptq.group_size": spec.w_group_size,
        "quant.gptq.calib_windows": int(job.calibration.shape[0]),
        "quant.gptq.calib_activations": "full precision",
        "quant.gptq.damp_raised": raised,
        "quant.gptq.dead_inputs": dead,
        "quant.gptq.rtn_fallback": uncalibrated,
        "quant.gptq.seconds": round(time.perf_counter() - started, 2),
    }
    return weights, record


WEIGHT_QUANTIZERS: Registry[WeightQuantizer] = Registry("weight quantizer", "quant.weights")
WEIGHT_QUANTIZERS.add(
    "rtn", WeightQuantizer(_rtn, False, "round-to-nearest, one step per output channel or group")
)
WEIGHT_QUANTIZERS.add(
    "gptq",
    WeightQuantizer(
        _gptq,
        True,
        "GPTQ, layer by layer on calibration windows (damp, block size, act-order: quant.gptq)",
    ),
)


def quantize_weights(job: WeightJob) -> tuple[QuantizedWeights | None, dict[str, Any]]:
    """The quantized weights the setting asks for (None when weights stay in full precision) and the
    quantizer's record."""
    if job.spec.w_bits >= OFF_BITS:
        return None, {}
    return WEIGHT_QUANTIZERS.get(job.spec.weights).quantize(job)
