"""`run(cfg)`: one job from a composed config to a complete results directory (DESIGN §5)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from outlier_study.adapters import resolve_layers, resolve_taps
from outlier_study.detect.rules import check_co_threshold, check_sd_levels
from outlier_study.context import Context
from outlier_study.data import build_windows
from outlier_study.errors import require
from outlier_study.experiments import EXPERIMENTS
from outlier_study.models.reuse import MODELS
from outlier_study.output.files import environment, write_json, write_status, write_text
from outlier_study.sweep.resume import config_fingerprint, finished_before, read_status, remove_checkpoints
from outlier_study.sweep.tracker import check_config as check_logger
from outlier_study.sweep.tracker import track


def default_job_dir(cfg: DictConfig) -> Path:
    """Hydra's run dir when launched by Hydra, else a timestamped folder under paths.output_root."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(cfg.paths.output_root) / cfg.experiment.name / cfg.model.name / stamp


def validate(cfg: DictConfig) -> None:
    """Checks that need no model; model-dependent ones (taps, layers, seq_len) follow the load."""
    require(cfg.experiment.name in EXPERIMENTS, "experiment.name", f"'{cfg.experiment.name}'", EXPERIMENTS)
    th = cfg.threshold
    require(th.ma_abs > 0, "threshold.ma_abs", f"must be > 0, got {th.ma_abs}")
    require(th.ma_ratio > 0, "threshold.ma_ratio", f"must be > 0, got {th.ma_ratio}")
    require(th.top_k >= 1, "threshold.top_k", f"must be >= 1, got {th.top_k}")
    check_co_threshold(th.m, th.beta)
    check_sd_levels(th.sd)
    check_logger(cfg)


def run(cfg: DictConfig, job_dir: Path | None = None) -> Path:
    """Run the configured experiment; status.json says ok only if every result file was written."""
    job_dir = Path(job_dir) if job_dir is not None else default_job_dir(cfg)
    fingerprint = config_fingerprint(cfg)
    if finished_before(job_dir, fingerprint):  # a rerun sweep skips its finished jobs
        print(f"skipped, already ok: {job_dir}")
        return job_dir
    if read_status(job_dir).get("status") == "ok":
        print(f"rerunning, the config changed since it finished: {job_dir}")
    stamp = {"config": fingerprint}  # lets a rerun tell "done" from "done with another config"
    write_status(job_dir, "running", fields=stamp)
    try:
        if not (job_dir / ".hydra" / "config.yaml").exists():
            write_text(job_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        validate(cfg)
        torch.manual_seed(cfg.seed)
        lm = MODELS.get(cfg.model, cfg.dtype, cfg.device, cfg.paths.model_cache, keep=cfg.reuse_models)
        taps = resolve_taps(lm.adapter, None if cfg.taps is None else list(cfg.taps))
        layers = resolve_layers(lm.n_layers, None if cfg.layers is None else list(cfg.layers))
        windows = build_windows(cfg.dataset, lm.tokenizer, lm.max_context)
        write_json(job_dir / "env.json", environment({"model": lm.info, "model_reused": MODELS.last_reused}))
        write_json(job_dir / "windows.json", {**windows.protocol, "starts": windows.starts})
        ctx = Context(cfg=cfg, lm=lm, windows=windows, taps=taps, layers=layers, job_dir=job_dir)
        metrics = EXPERIMENTS[cfg.experiment.name](ctx)
        write_json(job_dir / "metrics.json", metrics)
        track(cfg, job_dir)  # W&B mirrors the files just written; its failures never fail the job
    except BaseException as err:
        write_status(job_dir, "failed", err, fields=stamp)
        raise
    remove_checkpoints(job_dir)
    write_status(job_dir, "ok", fields=stamp)
    print(f"results: {job_dir}")
    return job_dir
