"""Experiment `quant`: what outlier handling buys low-bit quantization (beyond the paper).

One job = one (method, quant) cell: perplexity of the model with `method` applied and fake-quantized as
`quant` says; the per-layer relative error ‖Q(X)Q(W) − XW‖/‖XW‖ of every decoder linear (X: its input in
the un-quantized model with the method applied); and activation kurtosis per tap before and after the
method. A sweep `quant=... method=... -m` fills the table rows = method, columns = quant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from outlier_study.context import Context
from outlier_study.data.windows import build_calibration_windows
from outlier_study.errors import require
from outlier_study.experiments.perplexity_tables import protocol
from outlier_study.interventions.channel_edits import detect_cos
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.measure.profiler import Profile, forward_windows, profile_windows
from outlier_study.quant.error import quant_error
from outlier_study.quant.fake import fake_quant, spec_from_config
from outlier_study.quant.methods import MethodInputs, get_method
from outlier_study.quant.plots import quant_error_figure
from outlier_study.output.files import write_figure, write_json, write_table

LINEAR_INPUT_TAPS: tuple[str, ...] = ("attn.norm", "attn.ctx", "mlp.norm", "mlp.hidden")


def _kurtosis_taps(ctx: Context) -> list[str]:
    """`taps` when the user set it, else the taps that are inputs of the quantized linears."""
    if ctx.cfg.taps is not None:
        return ctx.taps
    return [t for t in ctx.lm.adapter.available() if t in LINEAR_INPUT_TAPS]


def _profile(ctx: Context, ids: Any, taps: list[str], desc: str) -> Profile:
    th = ctx.cfg.threshold
    return profile_windows(
        ctx.lm,
        ids,
        taps,
        ctx.layers,
        top_k=1,
        ma_abs=float(th.ma_abs),
        ma_ratio=float(th.ma_ratio),
        batch_size=int(ctx.cfg.dataset.batch_size),
        progress=bool(ctx.cfg.progress),
        desc=desc,
    )


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


def _calibration(ctx: Context) -> tuple[Any, dict[str, Any] | None]:
    """Calibration windows disjoint from the evaluation windows (recorded in calibration.json)."""
    n_calib = int(ctx.cfg.method.calib_windows)
    require(n_calib >= 1, "method.calib_windows", f"must be >= 1, got {n_calib}")
    calib = build_calibration_windows(ctx.cfg.dataset, ctx.lm.tokenizer, ctx.windows, n_calib)
    record = {**calib.protocol, "starts": calib.starts}
    write_json(ctx.job_dir / "calibration.json", record)
    return calib.input_ids, record


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
    cell = write_table(
        ctx.tables_dir, "quant", ["dataset", "method", label], [[ctx.cfg.dataset.name, method, f"{ppl:.3f}"]]
    )
    write_table(
        ctx.tables_dir,
        "quant_error",
        ["layer", "linear", "rel_error"],
        [[layer, path, f"{err:.6g}"] for (layer, path), err in errors.items()],
    )
    header = ["layer", "tap", "kurtosis_before", "kurtosis_after", "max_abs_before", "max_abs_after"]
    header += ["ma_count_before", "ma_count_after"]
    rows = [[*r[:2], *(f"{v:.6g}" for v in r[2:6]), *r[6:]] for r in _kurtosis_rows(before, after)]
    write_table(ctx.tables_dir, "kurtosis", header, rows)
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
    by_linear: dict[str, list[float]] = defaultdict(list)
    for (_, path), err in errors.items():
        by_linear[short[path]].append(err)
    ma_layers = sorted({layer for (layer, _), s in before.stats.items() if s.ma_count > 0})
    fig = quant_error_figure(
        sorted({layer for layer, _ in errors}),
        dict(by_linear),
        {
            "massive activations (original model)": ma_layers,
            "channel-wise outliers (original model)": co_layers,
        },
        f"{ctx.cfg.model.name}: relative quantization error, {label}, method {method}",
    )
    write_figure(ctx.figures_dir / "quant_error.png", fig)


def run(ctx: Context) -> dict[str, Any]:
    cfg, lm = ctx.cfg, ctx.lm
    spec = spec_from_config(cfg.quant)
    method_name = str(cfg.method.name)
    method = get_method(method_name)
    if method.check is not None:
        method.check(lm, cfg.method)
    n_diag = int(cfg.experiment.diag_windows)
    require(n_diag >= 1, "experiment.diag_windows", f"must be >= 1, got {n_diag}")
    diag_ids = ctx.windows.input_ids[:n_diag]
    batch_size, progress = int(cfg.dataset.batch_size), bool(cfg.progress)
    calibration, calib_record = _calibration(ctx) if method.calibrated else (None, None)

    taps = _kurtosis_taps(ctx)
    before = _profile(ctx, diag_ids, taps, "kurtosis (original)")
    co_layers = _co_layers(ctx, diag_ids, taps)
    inputs = MethodInputs(lm, cfg.method, cfg.threshold, calibration, batch_size, progress)
    with method.apply(inputs) as record:
        with fake_quant(lm, spec):
            desc = f"perplexity ({method_name}, {spec.label})"
            result = evaluate_perplexity(lm, ctx.windows.input_ids, batch_size, progress, desc)
        method_summary = record.summary()  # before the diagnostics add to any per-pass counts
        after = (
            before if method_name == "none" else _profile(ctx, diag_ids, taps, f"kurtosis ({method_name})")
        )
        with quant_error(lm, spec) as error_log:
            forward_windows(lm, diag_ids, batch_size, progress, f"quantization error ({spec.label})")
    errors = error_log.relative()

    cell = _write_tables(ctx, method_name, spec.label, result.ppl, errors, before, after)
    _error_figure(ctx, method_name, spec.label, errors, before, co_layers)
    write_json(
        ctx.job_dir / "perplexity.json",
        {
            **protocol(ctx),
            **spec.summary(),
            "method": method_name,
            **method_summary,
            "ppl": result.ppl,
            "n_tokens": result.n_tokens,
            "calibration_starts": None if calib_record is None else calib_record["starts"],
            "co_layers": co_layers,
        },
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
        **spec.summary(),
        "method": method_name,
        **method_summary,
        "calib_windows": 0 if calibration is None else int(calibration.shape[0]),
        "diag_windows": int(diag_ids.shape[0]),
        "quant_error.mean": _mean(list(errors.values())),
        "quant_error.max": max(errors.values(), default=math.nan),
        **{f"kurtosis.before.{t}": v for t, v in kurt_before.items()},
        **{f"kurtosis.after.{t}": v for t, v in kurt_after.items()},
    }
