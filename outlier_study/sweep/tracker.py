"""`logger=wandb`: mirror a finished job directory into one W&B run.

The run is built from the files the job wrote, so W&B is never the only copy and can be rebuilt from disk.
A W&B failure is reported (a warning line and `tracker.json`) but never fails the job or touches its results.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from outlier_study.config.vocab import TrackerMode
from outlier_study.errors import require
from outlier_study.output.files import read_csv, write_json

TRACKERS = ("none", "wandb")
DEFAULT_PROJECT = "outlier-study"  # offline runs only: online mode requires logger.project


def run_group(cfg: DictConfig) -> str:
    """A multirun's jobs share their sweep folder below paths.output_root (e.g. 'table2/multirun')."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.group:
        return str(cfg.logger.group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep, root = Path(HydraConfig.get().sweep.dir).resolve(), Path(cfg.paths.output_root).resolve()
        return str(sweep.relative_to(root)) if sweep.is_relative_to(root) else sweep.name
    return str(cfg.experiment.name)


def run_name(cfg: DictConfig, job_dir: Path) -> str:
    """The job's overrides name it, as they name its folder in a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.logger.run_name:
        return str(cfg.logger.run_name)
    if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
        return str(HydraConfig.get().job.override_dirname)
    return job_dir.name


@contextmanager
def wandb_environment(mode: str) -> Iterator[None]:
    """The environment switches wandb reads only from os.environ when its process-wide setup starts, set
    for one mirroring and restored after it (the next job of an in-process sweep reads the user's own).

    `mode=` alone is not enough: telemetry and the service's error reporting are configured from the
    environment, so offline runs set both here."""
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_ERROR_REPORTING")}
    os.environ["WANDB_MODE"] = mode
    if mode == "offline":
        os.environ["WANDB_ERROR_REPORTING"] = "false"
    else:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def table_cell(text: str) -> int | float | str:
    """CSV cells as numbers where they are finite numbers, so W&B can sort and plot them."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text
    return text


def wandb_key(*parts: str) -> str:
    """W&B reads '.' in a key as nesting, and a define_metric glob then misses it: dots become '-'."""
    return "/".join(part.replace(".", "-") for part in parts)


def layer_rows(path: Path) -> list[dict[str, Any]]:
    """The tidy layer × tap × statistic table as one history row per layer, keyed '<tap>/<statistic>'."""
    rows: dict[int, dict[str, Any]] = {}
    for r in read_csv(path):
        layer = int(r["layer"])
        rows.setdefault(layer, {"layer": layer})[wandb_key(r["tap"], r["statistic"])] = float(r["value"])
    return [rows[layer] for layer in sorted(rows)]


def effective_mode(cfg: DictConfig) -> str:
    """logger.mode when set, else WANDB_MODE from the environment (as W&B reads it), else offline."""
    if cfg.logger.mode is not None:
        return str(cfg.logger.mode)
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return {"dryrun": "offline", "run": "online"}.get(env, env) or "offline"


def mirror(cfg: DictConfig, job_dir: Path, mode: str) -> dict[str, Any]:
    """One W&B run from the job's files; returns where it went. Raises on any W&B error."""
    with wandb_environment(mode):
        return _mirror(cfg, job_dir, mode)


def _mirror(cfg: DictConfig, job_dir: Path, mode: str) -> dict[str, Any]:
    lg = cfg.logger
    root = Path(lg.dir) if lg.dir else job_dir
    (root / "wandb").mkdir(parents=True, exist_ok=True)  # else wandb silently falls back to /tmp
    import wandb

    settings = wandb.Settings(
        mode=mode,
        init_timeout=float(lg.init_timeout),  # an unreachable server costs this long, not wandb's 90 s
        console="off",  # the job's own output is already on screen and in Hydra's log
        silent=True,
        save_code=False,
        x_disable_stats=True,  # system metrics of a short mirroring run mean nothing (env.json has the host)
        x_disable_machine_info=True,
    )
    run = wandb.init(
        project=lg.project or (DEFAULT_PROJECT if mode == "offline" else None),
        entity=lg.entity,
        group=run_group(cfg),
        name=run_name(cfg, job_dir),
        job_type=str(cfg.experiment.name),
        tags=list(lg.tags),
        notes=lg.notes,
        dir=str(root),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        settings=settings,
    )
    exit_code = 1
    try:
        if (job_dir / "layer_stats.csv").exists():
            log_layer_stats(run, job_dir / "layer_stats.csv")
        log_tables_and_figures(run, job_dir)
        if (job_dir / "metrics.json").exists():
            run.summary.update(json.loads((job_dir / "metrics.json").read_text()))
        exit_code = 0
        return {"mode": mode, "run_id": run.id, "run_dir": str(Path(run.dir).parent), "name": run.name}
    finally:
        try:
            run.finish(exit_code=exit_code)
        finally:
            # Stops wandb's service for this process, which waits until run-*.wandb is closed (finish
            # returns before that); the next job's run starts a fresh one that reads the environment again.
            wandb.teardown()


def log_layer_stats(run: Any, path: Path) -> None:
    """One history row per layer; every '<tap>/*' chart uses the layer as its x-axis, with no summary."""
    rows = layer_rows(path)
    run.define_metric("layer", summary="none")
    for tap in sorted({key.split("/")[0] for row in rows for key in row if key != "layer"}):
        run.define_metric(f"{tap}/*", step_metric="layer", summary="none")
    for row in rows:
        run.log(row)


def log_tables_and_figures(run: Any, job_dir: Path) -> None:
    """tables/*.csv as W&B tables and figures/*.png as images (the same bytes), in one history row."""
    import wandb

    media: dict[str, Any] = {}
    for path in sorted((job_dir / "tables").glob("*.csv")):
        with path.open(newline="") as fh:
            header, *records = list(csv.reader(fh))
        data = [[table_cell(cell) for cell in r] for r in records]
        media[wandb_key("tables", path.stem)] = wandb.Table(columns=header, data=data, allow_mixed_types=True)
    for path in sorted((job_dir / "figures").glob("*.png")):
        media[wandb_key("figures", path.stem)] = wandb.Image(str(path))
    if media:
        run.log(media)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _failed(job_dir: Path, error: str) -> None:
    write_json(job_dir / "tracker.json", {"tracker": "wandb", "status": "failed", "error": error})
    print(f"warning: logger=wandb failed ({error}); the results on disk are complete", file=sys.stderr)


def track(cfg: DictConfig, job_dir: Path) -> None:
    """Called once a job's results are on disk; does nothing unless logger.name is wandb.

    Never raises for a W&B error: the results are complete without W&B, so the job stays ok. An online
    run whose server does not answer within logger.init_timeout is written offline instead, with one
    warning line and the `wandb sync` command in tracker.json; any other failure goes to tracker.json
    and one warning line on stderr."""
    if cfg.logger.name != "wandb":
        return
    job_dir, mode = Path(job_dir), effective_mode(cfg)
    if mode == "disabled":  # W&B's own off switch: nothing is written anywhere
        write_json(job_dir / "tracker.json", {"tracker": "wandb", "status": "disabled", "mode": mode})
        return
    record: dict[str, Any] = {"tracker": "wandb", "status": "ok"}
    try:
        record |= mirror(cfg, job_dir, mode)
    except (Exception, SystemExit) as err:  # wandb's teardown calls sys.exit when its service fails
        error = _one_line(err)
        if mode != "online":
            return _failed(job_dir, error)
        try:
            record |= mirror(cfg, job_dir, "offline")
        except (Exception, SystemExit) as again:
            return _failed(job_dir, f"{error}; offline too: {_one_line(again)}")
        record |= {"status": "offline_fallback", "online_error": error}
        print(
            f"warning: logger=wandb: no answer from the W&B server within {cfg.logger.init_timeout:g} s "
            f"({error}); the run was written offline, upload it with: wandb sync {record['run_dir']}",
            file=sys.stderr,
        )
    if record["mode"] == "offline":
        record["sync"] = f"wandb sync {record['run_dir']}"
        if record["status"] == "ok":
            print(f"wandb: offline run written; upload it with: {record['sync']}")
    write_json(job_dir / "tracker.json", record)


def check_config(cfg: DictConfig) -> None:
    """Bad logger settings fail before the job loads anything, not after its results are written."""
    lg = cfg.logger
    require(lg.name in TRACKERS, "logger.name", f"unknown tracker '{lg.name}'", TRACKERS)
    if lg.name == "wandb":
        mode = effective_mode(cfg)
        allowed = tuple(TrackerMode)
        require(
            mode in allowed,
            "logger.mode",
            f"WANDB_MODE={mode!r} in the environment is not a W&B mode",
            allowed,
        )
        require(
            mode != "online" or bool(lg.project),
            "logger.project",
            "required with logger.mode=online (the W&B project the runs go to), e.g. logger.project=my-study",
        )
