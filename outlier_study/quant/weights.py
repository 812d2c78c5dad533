"""Weight quantizers by name (`quant.weights`): what turns the decoder's weights into grid values.

Each entry maps a `WeightJob` (the model as the method left it, the setting, its options, calibration
windows) to the quantized `out_in` weight of every target (`targets.py`: every `nn.Linear`/`Conv1D` inside
the decoder layers, the shared experts' included, and every routed expert's slices of the fused experts
parameters; MoE routers, the lm_head and embeddings stay in full precision), plus what to record.
`fake_quant` installs them and `quant_error` measures them, so every quantizer covers exactly what RTN
covers. Adding one is one entry in `WEIGHT_QUANTIZERS`.

- `rtn`: round-to-nearest, one step per output row (of every expert) or group (`fake.rtn`).
- `gptq`: GPTQ (`gptq.py`), layer by layer (`layerwise.py`): layer l's Hessians are taken on the outputs
  of layers 0..l-1 already quantized, with the method's hooks active (the online rotation before
  down_proj included) and activations in full precision (no activation or KV quantization while
  calibrating: GPTQ fits the weights to the inputs the full-precision-activation model gives, as GPTQ,
  QuaRot and SmoothQuant do). A routed expert's slices get Hessians of the tokens routed to it
  (`experts.py`); an expert no calibration token reached is rounded to nearest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from outlier_study.interventions.edits import reversible
from outlier_study.quant.experts import ExpertHessians, expert_hessians
from outlier_study.quant.fake import OFF_BITS, QuantSpec, quantize, rtn
from outlier_study.quant.gptq import GPTQSettings, gptq_quantize
from outlier_study.quant.layerwise import HessianLog, capture_layer_calls, hessians, run_layer
from outlier_study.quant.targets import QuantWeight, quant_weights
from outlier_study.registry import Registry

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

QuantizedWeights = dict[nn.Parameter, torch.Tensor]  # parameter -> its quantized `out_in` weight


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
    with torch.no_grad():
        weights = {t.param: rtn(t, job.spec) for t in quant_weights(job.lm.adapter, job.lm.model)}
    return weights, {}


def gptq_settings(options: Any) -> GPTQSettings:
    """The algorithm's settings from the quant.gptq config node (or defaults for None)."""
    if options is None:
        return GPTQSettings()
    return GPTQSettings(float(options.damp), int(options.block_size), bool(options.act_order))


@dataclass
class _GPTQRun:
    """GPTQ of one matrix after another, and what they need recorded."""

    spec: QuantSpec
    settings: GPTQSettings
    raised: list[str] = field(default_factory=list)  # matrices whose Hessian needed more dampening
    uncalibrated: list[str] = field(default_factory=list)  # matrices that read no calibration token
    dead: int = 0  # input channels that were zero on every calibration token

    def solve(self, w: torch.Tensor, h: torch.Tensor | None, names: list[str]) -> torch.Tensor:
        """GPTQ of an (out, in) weight (linears that share an input, stacked) on Hessian h; RTN without."""
        spec = self.spec
        if h is None:
            self.uncalibrated += names
            return quantize(w, spec.w_bits, group_size=spec.w_group_size)
        result = gptq_quantize(w, h, spec.w_bits, spec.w_group_size, self.settings)
        if result.damp != self.settings.damp:
            self.raised += names
        self.dead += result.dead_columns
        return result.weight


def _gptq_layer(
    run: _GPTQRun, layer: int, targets: list[QuantWeight], log: HessianLog, experts: ExpertHessians
) -> QuantizedWeights:
    """One layer's quantized weights: its linears, stacked by shared input, then each routed expert's
    slices on their own Hessians; a matrix that read no calibration token is rounded to nearest."""
    by_param = {t.param: t for t in targets}
    weights: QuantizedWeights = {}
    for group in log.groups():
        members = [by_param[m.weight] for m in group]
        stacked = torch.cat([t.out_in().detach() for t in members])
        quantized = run.solve(stacked, log.hessian(group[0]), [f"{layer}:{t.path}" for t in members])
        pieces = quantized.split([t.out_in().shape[0] for t in members])
        weights.update(zip((t.param for t in members), pieces, strict=True))
    for t in targets:
        w = t.out_in().detach()
        if t.experts is not None:
            slices = [
                run.solve(w[e], experts.hessian(t.param, e), [f"{layer}:{t.path}[{e}]"])
                for e in range(w.shape[0])
            ]
            weights[t.param] = torch.stack(slices)
        elif t.param not in weights:  # never ran on the calibration windows
            weights[t.param] = run.solve(w, None, [f"{layer}:{t.path}"])
    return weights


def _gptq(job: WeightJob) -> tuple[QuantizedWeights, dict[str, Any]]:
    """GPTQ of every decoder linear and routed expert, layer by layer; the model is left as it was."""
    assert job.calibration is not None, "gptq is calibrated"
    lm, spec, settings = job.lm, job.spec, gptq_settings(job.options)
    started = time.perf_counter()
    targets: dict[int, list[QuantWeight]] = {}
    for target in quant_weights(lm.adapter, lm.model):
        targets.setdefault(target.layer, []).append(target)
    linears: dict[int, list[nn.Module]] = {}
    for layer, _, module in lm.adapter.linears(lm.model):
        linears.setdefault(layer, []).append(module)
    calls = capture_layer_calls(lm, job.calibration, job.batch_size)
    hidden = calls.hidden
    weights: QuantizedWeights = {}
    run = _GPTQRun(spec, settings)
    blocks = list(lm.adapter.blocks(lm.model))
    bar = tqdm(total=len(blocks), desc=f"GPTQ ({spec.label})", unit="layer", disable=not job.progress)
    with reversible() as edits:  # quantized layers stay in place only while the later ones calibrate
        for layer, block in enumerate(blocks):
            with hessians(linears.get(layer, [])) as log, expert_hessians(lm, layer) as experts:
                for h, call in zip(hidden, calls.calls[layer], strict=True):
                    run_layer(block, h, call)
            with torch.no_grad():
                quantized = _gptq_layer(run, layer, targets.get(layer, []), log, experts)
                for target in targets.get(layer, []):
                    edits.set_data(target.param, target.storage(quantized[target.param]))
            weights.update(quantized)
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
        "quant.gptq.damp_raised": run.raised,
        "quant.gptq.dead_inputs": run.dead,
        "quant.gptq.rtn_fallback": run.uncalibrated,
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
