"""Experiment `quant`: what outlier handling buys low-bit quantization (beyond the paper).

One job = one (method, quant) cell: perplexity of the model with `method` applied and fake-quantized as
`quant` says; the per-layer relative error ‖Q(X)Q(W) − XW‖/‖XW‖ of every decoder linear (X: its input in
the un-quantized model with the method applied); and activation kurtosis per tap before and after the
method. A sweep `quant=... method=... -m` fills the table rows = method, columns = quant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from outlier_study.adapters.base import Arch
from outlier_study.config.options import opt
from outlier_study.context import Context
from outlier_study.data.windows import calibration_windows
from outlier_study.detect.select import detect_cos
from outlier_study.errors import require
from outlier_study.experiments.base import experiment
from outlier_study.experiments.common import profile, record_perplexity, zeroshot
from outlier_study.interventions.treatment import Inputs
from outlier_study.measure.forward import forward_windows
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.measure.profiler import Profile
from outlier_study.output.figures import quant_error_figure
from outlier_study.output.files import write_figure, write_json
from outlier_study.output.tables import Table, write_table
from outlier_study.quant.error import quant_error
from outlier_study.quant.fake import OFF_BITS, fake_quant, spec_from_config
from outlier_study.quant.methods import METHODS
from outlier_study.quant.weights import WEIGHT_QUANTIZERS, WeightJob, quantize_weights

LINEAR_INPUT_TAPS: tuple[str, ...] = ("attn.norm", "attn.ctx", "mlp.norm", "mlp.hidden")


@dataclass
class QuantOptions:
    name: str = opt("quant", "perplexity under fake quantization with one outlier method")
    diag_windows: int = opt(
        2, "evaluation windows used for the per-layer error and the kurtosis profile", ge=1
    )


def _check(options: Any, cfg: Any, arch: Arch) -> None:
    n = int(cfg.dataset.n_windows)
    require(
        int(options.diag_windows) <= n,
        "experiment.diag_windows",
        f"{options.diag_windows} diagnostic windows asked, the job has {n} (dataset.n_windows)",
        [f"1..{n}"],
    )


def _kurtosis_taps(ctx: Context) -> list[str]:
    """`taps` when the user set it, else the taps that are inputs of the quantized linears."""
    if ctx.cfg.taps is not None:
        return ctx.taps
    return [t for t in ctx.lm.adapter.available() if t in LINEAR_INPUT_TAPS]


def _profile(ctx: Context, ids: Any, taps: list[str], desc: str) -> Profile:
    return profile(ctx, taps, ids=ids, top_k=1, desc=desc)


def _co_layers(ctx: Context, ids: Any, taps: list[str]) -> list[int]:
    """Layers where a linear input holds a channel-wise outlier in the original model (threshold.m/beta)."""
    cfg = ctx.cfg
    cos = detect_cos(
        ctx.lm,
        ids,
        taps,
        ctx.layers,
        cfg.threshold,
        bool(cfg.progress),
        "channel-wise outliers (original)",
        int(cfg.dataset.batch_size),
    )
    return sorted({layer for (layer, _), idx in cos.items() if idx.size})


def _kurtosis_rows(before: Profile, after: Profile) -> list[list[Any]]:
    rows = []
    for layer in before.layers:
        for tap in before.taps:
            b, a = before.stats[(layer, tap)], after.stats[(layer, tap)]
            rows.append([layer, tap, b.kurtosis, a.kurtosis, b.max_abs, a.max_abs, b.ma_count, a.ma_count])
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class Calibration:
    """The calibration windows of the method and of the weight quantizer (None: that one needs none), both
    disjoint from the evaluation windows and cut by the same protocol, and what calibration.json holds."""

    method: Any = None
    weights: Any = None
    record: dict[str, Any] | None = None

    @property
    def method_starts(self) -> list[int] | None:
        return None if self.record is None else self.record.get("starts")

    @property
    def weight_starts(self) -> list[int] | None:
        gptq = None if self.record is None else self.record.get("gptq")
        return None if gptq is None else gptq["starts"]


def _calibration(ctx: Context, method_calibrated: bool, weights_calibrated: bool) -> Calibration:
    """Calibration windows disjoint from the evaluation windows (recorded in calibration.json): the
    method's (`method.calib_windows`) and GPTQ's (`quant.gptq.calib_windows`). Both come from the same
    free text with the same rule, so with contiguous sampling the smaller set is a prefix of the larger
    (with equal counts they are the same windows); how many GPTQ windows the method also saw is recorded."""
    out = Calibration()
    record: dict[str, Any] = {}
    method_starts: set[int] = set()
    if method_calibrated:
        calib = calibration_windows(ctx.windows, int(ctx.cfg.method.calib_windows))
        out.method, method_starts = calib.input_ids, set(calib.starts)
        record = {**calib.protocol, "starts": calib.starts}
    if weights_calibrated:
        n = int(ctx.cfg.quant.gptq.calib_windows)
        calib = calibration_windows(ctx.windows, n, "quant.gptq.calib_windows")
        out.weights = calib.input_ids
        if not record:
            record = {k: v for k, v in calib.protocol.items() if k != "n_windows"}
        shared = len(method_starts & set(calib.starts)) if method_calibrated else None
        record["gptq"] = {"n_windows": n, "starts": calib.starts, "shared_with_method": shared}
    if record:
        write_json(ctx.job_dir / "calibration.json", record)
        out.record = record
    return out


def _write_tables(
    ctx: Context,
    method: str,
    label: str,
    ppl: float,
    errors: dict[tuple[int, str], float],
    before: Profile,
    after: Profile,
) -> str:
    """tables/quant (the cell), quant_error (per linear) and kurtosis (per layer × tap); returns the cell."""
    data = ctx.cfg.dataset
    cell = write_table(
        ctx.tables_dir,
        Table.of(
            "quant",
            ["dataset", "seq_len", "method", label],
            [[data.name, int(data.seq_len), method, f"{ppl:.3f}"]],
        ),
    )
    error_rows = [[layer, path, f"{err:.6g}"] for (layer, path), err in errors.items()]
    write_table(ctx.tables_dir, Table.of("quant_error", ["layer", "linear", "rel_error"], error_rows))
    header = ["layer", "tap", "kurtosis_before", "kurtosis_after", "max_abs_before", "max_abs_after"]
    header += ["ma_count_before", "ma_count_after"]
    rows = [[*r[:2], *(f"{v:.6g}" for v in r[2:6]), *r[6:]] for r in _kurtosis_rows(before, after)]
    write_table(ctx.tables_dir, Table.of("kurtosis", header, rows))
    return cell


def _error_figure(
    ctx: Context,
    method: str,
    label: str,
    errors: dict[tuple[int, str], float],
    before: Profile,
    co_layers: list[int],
) -> None:
    """Per-layer error, one line per linear (short names unless they collide, as GPT-2's two c_proj do),
    with the layers holding massive activations or channel-wise outliers in the original model marked."""
    paths = {path for _, path in errors}
    short = {path: path.rsplit(".", 1)[-1] for path in paths}
    if len(set(short.values())) < len(paths):
        short = {path: path for path in paths}
    by_linear: dict[str, dict[int, float]] = defaultdict(dict)
    for (layer, path), err in errors.items():
        by_linear[short[path]][layer] = err
    ma_layers = sorted({layer for (layer, _), s in before.stats.items() if s.ma_count > 0})
    fig = quant_error_figure(
        dict(by_linear),
        {
            "massive activations (original model)": ma_layers,
            "channel-wise outliers (original model)": co_layers,
        },
        f"{ctx.cfg.model.name}: relative quantization error, {label}, method {method}",
    )
    write_figure(ctx.figures_dir / "quant_error.png", fig)


@experiment(
    "quant",
    QuantOptions,
    paper="",
    description="perplexity under fake quantization (quant group) with one outlier method (method group); "
    "per-layer relative quantization error of every linear; activation kurtosis before/after the method; "
    "zero-shot accuracy through lm-eval when eval.tasks names tasks",
    check=_check,
    uses=("quant", "method", "eval"),
)
def run(ctx: Context) -> dict[str, Any]:
    cfg, lm = ctx.cfg, ctx.lm
    spec = spec_from_config(cfg.quant)
    method_name = str(cfg.method.name)
    method = METHODS.get(method_name)
    diag_ids = ctx.windows.input_ids[: int(cfg.experiment.diag_windows)]
    batch_size, progress = int(cfg.dataset.batch_size), bool(cfg.progress)
    quantizer = WEIGHT_QUANTIZERS.get(spec.weights)
    calib = _calibration(ctx, method.calibrated, quantizer.calibrated and spec.w_bits < OFF_BITS)

    taps = _kurtosis_taps(ctx)
    before = _profile(ctx, diag_ids, taps, "kurtosis (original)")
    co_layers = _co_layers(ctx, diag_ids, taps)
    inputs = Inputs(lm, cfg.method, ctx.threshold, calib.method, batch_size, progress)
    accuracy = zeroshot(ctx)  # lm-eval's wrapper, built before the method applies
    with method.apply(inputs) as change:
        # the weight quantizer sees the weights (and runs the hooks) the method left
        job = WeightJob(lm, spec, cfg.quant.gptq, calib.weights, batch_size, progress)
        weights, weight_record = quantize_weights(job)
        with fake_quant(lm, spec, weights) as installed:
            desc = f"perplexity ({method_name}, {spec.label})"
            result = evaluate_perplexity(lm, ctx.windows.input_ids, batch_size, progress, desc)
            # the counts of the perplexity windows, before zero-shot and the diagnostics add to them
            method_summary, changed = change.summary("method", detail=False), change.total
            scores = accuracy(f"{method_name} {spec.label}")
        after = (
            before if method_name == "none" else _profile(ctx, diag_ids, taps, f"kurtosis ({method_name})")
        )
        with quant_error(lm, spec, weights) as error_log:
            forward_windows(lm, diag_ids, batch_size, progress, f"quantization error ({spec.label})")
    del weights
    errors = error_log.relative()
    if calib.weights is not None:
        weight_record["quant.gptq.method_windows_shared"] = calib.record["gptq"]["shared_with_method"]

    cell = _write_tables(ctx, method_name, spec.label, result.ppl, errors, before, after)
    _error_figure(ctx, method_name, spec.label, errors, before, co_layers)
    setting = {**spec.summary(), **weight_record, "method": method_name, **method_summary}
    record_perplexity(
        ctx,
        {f"{method_name} {spec.label}": (result, changed, setting)},
        calibration_starts=calib.method_starts,
        gptq_calibration_starts=calib.weight_starts,
        co_layers=co_layers,
    )
    print(f"\nquantization ({cfg.model.name}, {cfg.dataset.name}, token-level perplexity):")
    print(cell)

    kurt_before = {t: _mean([before.stats[(layer, t)].kurtosis for layer in before.layers]) for t in taps}
    kurt_after = {t: _mean([after.stats[(layer, t)].kurtosis for layer in after.layers]) for t in taps}
    return {
        "ppl": result.ppl,
        "mean_nll": result.mean_nll,
        "n_tokens": result.n_tokens,
        "dataset": str(cfg.dataset.name),
        "dataset.seq_len": int(cfg.dataset.seq_len),
        "dataset.n_windows": int(cfg.dataset.n_windows),
        **installed,
        **weight_record,
        "method": method_name,
        **method_summary,
        "calib_windows": 0 if calib.method is None else int(calib.method.shape[0]),
        "diag_windows": int(diag_ids.shape[0]),
        "quant_error.mean": _mean(list(errors.values())),
        "quant_error.max": max(errors.values(), default=math.nan),
        **{f"kurtosis.before.{t}": v for t, v in kurt_before.items()},
        **{f"kurtosis.after.{t}": v for t, v in kurt_after.items()},
        **scores,
    }
