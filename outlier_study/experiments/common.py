"""Helpers every experiment shares: perplexity with resumable checkpoints and its protocol record,
streamed profiles with the job's thresholds, token labels. Experiments never import each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from outlier_study.adapters.base import Arch
from outlier_study.config.options import opt
from outlier_study.context import Context
from outlier_study.detect.attribution import MAEvent, attribute
from outlier_study.errors import require
from outlier_study.interventions.record import Change
from outlier_study.measure.checkpoints import WindowCheckpoint, checkpoint_path
from outlier_study.measure.forward import forward_windows
from outlier_study.measure.perplexity import Perplexity, evaluate_perplexity
from outlier_study.measure.profiler import ChannelsByTap, Profile, profile_channels, profile_windows
from outlier_study.measure.zeroshot import ZeroShot
from outlier_study.output.files import write_json
from outlier_study.output.perplexity_file import evaluation, write_perplexity
from outlier_study.output.tables import Table, write_table
from outlier_study.sweep.resume import config_fingerprint


def evaluate(ctx: Context, desc: str, change: Change | None = None) -> Perplexity:
    """One perplexity evaluation of the job, checkpointed under the job dir by `desc` (unique per job), so
    a preempted or requeued job resumes it; the live counters of `change` are saved with it."""
    checkpoint = WindowCheckpoint(
        checkpoint_path(ctx.job_dir, desc), key=f"{config_fingerprint(ctx.cfg)}|{desc}"
    )
    return evaluate_perplexity(
        ctx.lm,
        ctx.windows.input_ids,
        batch_size=int(ctx.cfg.dataset.batch_size),
        progress=bool(ctx.cfg.progress),
        desc=desc,
        checkpoint=checkpoint,
        counters=None if change is None else change.counters,
    )


def protocol(ctx: Context) -> dict[str, Any]:
    """Everything that defines a perplexity number: data protocol, dtype, what is averaged."""
    return {
        **ctx.windows.protocol,
        "dtype": str(ctx.cfg.dtype),
        "model": ctx.cfg.model.name,
        "metric": "token-level perplexity: exp(mean NLL over predicted tokens), not word perplexity",
    }


def record_perplexity(
    ctx: Context, evaluations: dict[str, tuple[Perplexity, int | None, dict[str, Any]]], **extra: Any
) -> None:
    """perplexity.json in the shared schema: label -> (result, changed count, setting)."""
    rows = [
        evaluation(label, r.ppl, r.mean_nll, r.n_tokens, changed, **setting)
        for label, (r, changed, setting) in evaluations.items()
    ]
    write_perplexity(ctx.job_dir, str(ctx.cfg.experiment.name), protocol(ctx), rows, extra)


def zeroshot(ctx: Context) -> Callable[[str], dict[str, Any]]:
    """The job's zero-shot evaluation (eval.tasks) as a function of its setting's label, to be called under
    the treatment; lm-eval's wrapper is built here, before the treatment applies (see `ZeroShot`). It
    writes zeroshot.json and tables/zeroshot and returns the `eval.*` metrics ({} when eval.tasks is [])."""
    if not ctx.zeroshot_tasks:
        return lambda setting: {}
    evaluator = ZeroShot(ctx.lm, ctx.cfg.eval, ctx.zeroshot_tasks, int(ctx.cfg.seed))

    def run(setting: str) -> dict[str, Any]:
        result = evaluator.evaluate()
        rows = [[setting, *row] for row in result.rows()]
        header = ["setting", "task", "metric", "value", "stderr", "n_samples"]
        markdown = write_table(ctx.tables_dir, Table.of("zeroshot", header, rows))
        protocol = {**result.protocol, "model": ctx.cfg.model.name, "dtype": str(ctx.cfg.dtype)}
        record = {"setting": setting, "protocol": protocol, "scores": result.scores}
        write_json(ctx.job_dir / "zeroshot.json", {**record, "n_samples": result.n_samples})
        print(f"\nzero-shot accuracy ({setting}, lm-eval {protocol['lm_eval']}):\n{markdown}")
        keys = ("name", "lm_eval", "tasks", "limit", "num_fewshot", "batch_size", "include_path")
        return {**{f"eval.{k}": result.protocol[k] for k in keys}, **result.metrics()}

    return run


def profile(
    ctx: Context,
    taps: list[str],
    layers: list[int] | None = None,
    *,
    ids: torch.Tensor | None = None,
    top_k: int | None = None,
    desc: str = "profile",
    progress: bool | None = None,
    moments: bool = True,
) -> Profile:
    """Full statistics with the job's MA rule, batch size and progress setting; `moments=False` for an
    experiment that reads only max, top-k, medians and MA counts (it skips a tap's costliest passes)."""
    th = ctx.threshold
    return profile_windows(
        ctx.lm,
        ctx.windows.input_ids if ids is None else ids,
        taps,
        ctx.layers if layers is None else layers,
        top_k=int(th.top_k) if top_k is None else top_k,
        ma_abs=float(th.ma_abs),
        ma_ratio=float(th.ma_ratio),
        batch_size=int(ctx.cfg.dataset.batch_size),
        progress=bool(ctx.cfg.progress) if progress is None else progress,
        desc=desc,
        moments=moments,
        reducer=str(ctx.cfg.reducer),
    )


def channel_profile(
    ctx: Context, taps: list[str], layers: list[int], without_ma: tuple[str, ...] = ()
) -> ChannelsByTap:
    """Per-channel moments with the job's CO statistics (signed or |A|) and MA rule."""
    th = ctx.threshold
    return profile_channels(
        ctx.lm,
        ctx.windows.input_ids,
        taps,
        layers,
        absolute=bool(th.abs_mean),
        without_ma=without_ma,
        ma_rule=(float(th.ma_abs), float(th.ma_ratio)),
        batch_size=int(ctx.cfg.dataset.batch_size),
        progress=bool(ctx.cfg.progress),
        desc=f"{ctx.cfg.experiment.name} channels",
        reducer=str(ctx.cfg.reducer),
    )


def ma_events(ctx: Context, layers: list[int]) -> list[MAEvent]:
    """Every residual-stream MA event (TMA, FMA, cancelled, faded) over the job's windows at `layers`."""
    th = ctx.threshold
    with attribute(ctx.lm, layers, th.ma_abs, th.ma_ratio) as att:
        bs = ctx.cfg.dataset.batch_size
        forward_windows(ctx.lm, ctx.windows.input_ids, bs, ctx.cfg.progress, "attribution", att)
    return att.events


def co_rule(ctx: Context) -> dict[str, Any]:
    """The CO rule of the job, recorded with every CO result."""
    th = ctx.threshold
    return {"co.m": float(th.m), "co.beta": float(th.beta), "co.abs_mean": bool(th.abs_mean)}


@dataclass
class Plot3DOptions:
    tap: str = opt("resid.post", "tap of the 3-D |a| plot (canonical name or paper alias)")
    layer: int | None = opt(None, "layer (from 0); null: the layer with the largest |a| at that tap")
    window: int = opt(0, "which window to draw", ge=0)
    max_tokens: int = opt(32, "first tokens drawn (labels stay readable)", ge=1)


def check_plot3d(p3: Any, cfg: Any, arch: Arch) -> None:
    """The plot's tap, layer and window exist, so a typo fails before the profile runs, not after."""
    arch.adapter.canonical(str(p3.tap), "experiment.plot3d.tap")
    if p3.layer is not None:
        arch.layer(int(p3.layer), "experiment.plot3d.layer")
    n = int(cfg.dataset.n_windows)
    require(
        int(p3.window) < n, "experiment.plot3d.window", f"window {p3.window} out of range", [f"0..{n - 1}"]
    )


def check_experiment_layer(options: Any, cfg: Any, arch: Arch) -> None:
    """`experiment.layer` exists in the model (negative indices count from the end)."""
    arch.layer(int(options.layer), "experiment.layer")


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text with whitespace made visible, for tables and plot labels."""
    return tokenizer.decode([token_id]).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
