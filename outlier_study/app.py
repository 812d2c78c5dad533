"""`run(cfg)`: one job from a composed config to a complete results directory.

The order is the point: every option is checked (schemas, then names and indices against the model's
config), and the corpus is read and cut into windows with the model's tokenizer, before the weights are
loaded, so bad input fails in seconds; status.json says ok only once every result file is written.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from outlier_study.context import Context
from outlier_study.data import build_windows, load_corpus
from outlier_study.errors import ConfigError
from outlier_study.experiments import EXPERIMENTS
from outlier_study.measure.checkpoints import remove_checkpoints
from outlier_study.measure.zeroshot import prepare_tasks
from outlier_study.models.loader import describe_model
from outlier_study.models.reuse import MODELS
from outlier_study.output.files import write_json, write_text
from outlier_study.output.job import environment, read_status, write_status
from outlier_study.sweep.resume import config_fingerprint, finished_before
from outlier_study.sweep.tracker import track
from outlier_study.validate import check_for_model, typed_config


def default_job_dir(cfg: DictConfig) -> Path:
    """Hydra's run dir when launched by Hydra, else a timestamped folder under paths.output_root."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(cfg.paths.output_root) / cfg.experiment.name / cfg.model.name / stamp


def _start(job_dir: Path, stamp: dict[str, str]) -> None:
    """The first write of a job: an unusable output folder is bad input, said in one line."""
    try:
        write_status(job_dir, "running", fields=stamp)
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ConfigError(
            "paths.output_root", f"cannot write the job folder {str(job_dir)!r}: {why}"
        ) from None


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
    _start(job_dir, stamp)
    try:
        if not (job_dir / ".hydra" / "config.yaml").exists():
            write_text(job_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        cfg = typed_config(cfg)
        arch = describe_model(cfg.model, cfg.paths.model_cache)  # the config only: no weights yet
        plan = check_for_model(cfg, arch)
        text = load_corpus(cfg.dataset)
        tokenizer = MODELS.tokenizer(cfg.model, cfg.dtype, cfg.device, cfg.paths.model_cache, cfg.execution)
        # a corpus too short fails here, before the weights are read
        windows = build_windows(cfg.dataset, tokenizer, text, cfg.paths.token_cache)
        tasks = prepare_tasks(cfg.eval) if cfg.eval.tasks else None  # lm-eval's task data, before them too
        torch.manual_seed(cfg.seed)
        where = (cfg.model, cfg.dtype, cfg.device, cfg.paths.model_cache)
        lm = MODELS.get(*where, cfg.reuse_models, tokenizer, cfg.execution)
        entry = EXPERIMENTS.get(cfg.experiment.name)
        item = {"name": str(cfg.experiment.name), "paper": entry.paper, "description": entry.description}
        write_json(
            job_dir / "env.json",
            environment({"model": lm.info, "model_reused": MODELS.last_reused, "experiment": item}),
        )
        write_json(job_dir / "windows.json", {**windows.protocol, "starts": windows.starts})
        ctx = Context(cfg, lm, windows, plan.taps, plan.layers, job_dir, zeroshot_tasks=tasks)
        metrics = entry.run(ctx)
        write_json(job_dir / "metrics.json", metrics)
        track(cfg, job_dir)  # W&B mirrors the files just written; its failures never fail the job
    except BaseException as err:
        write_status(job_dir, "failed", err, fields=stamp)
        raise
    remove_checkpoints(job_dir)
    write_status(job_dir, "ok", fields=stamp)
    print(f"results: {job_dir}")
    return job_dir
