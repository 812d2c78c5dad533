"""Zero-shot accuracy through lm-evaluation-harness, on the model as it sits in memory.

lm-eval does the work: its `HFLM` wraps the loaded model and tokenizer, its `TaskManager` finds the
tasks (the standard ones and those of `eval.include_path`), `simple_evaluate` scores them. This module
only checks the options before anything loads, prepares the tasks' data before the weights, and
flattens lm-eval's results into `eval.<task>.<metric>` keys. Whatever hooks or edits a treatment put on
the model are active while lm-eval runs it, because lm-eval calls the very same module.
"""

from __future__ import annotations

import copy
import difflib
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from outlier_study.errors import ConfigError, require

if TYPE_CHECKING:
    from outlier_study.models.loader import LoadedModel

PACKAGE = "lm-eval"
_STDERR = "_stderr"


def lm_eval_version() -> str:
    """The installed lm-eval version; a one-line refusal naming eval.tasks when it is missing."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            "eval.tasks", f"needs lm-evaluation-harness: pip install '{PACKAGE}' (make install does)"
        ) from None


@contextmanager
def _quiet(level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval logs every step at INFO and warns that it got a model object, not a name (which is the
    point here); bad input must stay one line, so its loggers are raised to `level` for the block."""
    log = logging.getLogger("lm_eval")
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """simple_evaluate seeds python, numpy and torch globally; the job's own random streams go on as if
    it had not run."""
    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


def include_folder(options: Any) -> Path | None:
    """eval.include_path as an absolute folder (None when unset); anything else is refused in one line."""
    if options.include_path is None:
        return None
    folder = Path(str(options.include_path)).expanduser().resolve()
    require(folder.exists(), "eval.include_path", f"no such folder: {str(options.include_path)!r}")
    require(folder.is_dir(), "eval.include_path", f"not a folder: {str(options.include_path)!r}")
    return folder


def _stamp(folder: Path | None) -> tuple[tuple[str, int, int], ...]:
    """What a cached index of `folder` must match: its task files' names, sizes and times."""
    if folder is None:
        return ()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml", ".py") and p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=4)
def _manager(folder: str | None, defaults: bool, stamp: tuple[tuple[str, int, int], ...]) -> Any:
    """lm-eval's task index; indexing its ~15k standard tasks takes seconds, so one per process."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=folder, include_defaults=defaults)


def task_manager(options: Any) -> Any:
    """The TaskManager for eval.tasks: the include path alone when it defines every name asked (lm-eval
    gives the include path precedence, so the names resolve to the same tasks), else with the standard
    tasks too."""
    lm_eval_version()
    folder = include_folder(options)
    where = None if folder is None else str(folder)
    if folder is not None:
        local = _manager(where, False, _stamp(folder))
        if all(name in local.all_tasks for name in options.tasks):
            return local
    return _manager(where, True, _stamp(folder))


def check_tasks(options: Any) -> None:
    """Every name in eval.tasks is a task, group or tag lm-eval knows, before anything loads."""
    names = [str(n) for n in options.tasks]
    require(len(set(names)) == len(names), "eval.tasks", f"a task is named twice: {names}")
    known = task_manager(options).all_tasks
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=5)
            where = " nor in eval.include_path" if options.include_path is not None else ""
            hint = f"; the closest names: {', '.join(near)}" if near else ""
            raise ConfigError("eval.tasks", f"'{name}' is not an lm-eval task{where}{hint}")


def prepare_tasks(options: Any) -> list[Any]:
    """lm-eval's task objects with their data read (from a local file, or from the hub), so a task whose
    data cannot be read fails in one line before the model's weights load."""
    manager = task_manager(options)
    prepared: list[Any] = []
    for name in options.tasks:
        try:
            with _quiet():
                loaded = manager.load([str(name)])
        except Exception as err:  # lm-eval and datasets raise many kinds; any is bad input here
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise ConfigError("eval.tasks", f"task '{name}' fails to load with its data ({reason})") from None
        group = loaded.get("groups", {}).get(str(name))
        prepared += [group] if group is not None else list(loaded["tasks"].values())
    return prepared


@dataclass
class ZeroShotResult:
    """lm-eval's scores per task (and group), with how they were obtained."""

    scores: dict[str, dict[str, float]]  # task -> metric ("acc", "acc_stderr", ...) -> value
    n_samples: dict[str, int]  # task -> examples scored (after eval.limit)
    protocol: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Flat `eval.<task>.<metric>` keys (plus `eval.<task>.n_samples`) for metrics.json."""
        out: dict[str, Any] = {}
        for task, values in self.scores.items():
            out.update({f"eval.{task}.{metric}": v for metric, v in values.items()})
            if task in self.n_samples:
                out[f"eval.{task}.n_samples"] = self.n_samples[task]
        return out

    def rows(self) -> list[list[Any]]:
        """task, metric, value, stderr, n_samples: one row per metric lm-eval reported."""
        rows = []
        for task, values in self.scores.items():
            for metric, value in values.items():
                if not metric.endswith(_STDERR):
                    stderr = values.get(_stderr_name(metric))
                    rows.append([task, metric, value, stderr, self.n_samples.get(task)])
        return rows


def _stderr_name(metric: str) -> str:
    base, _, where = metric.partition(",")
    return f"{base}{_STDERR}" + (f",{where}" if where else "")


def _flatten(results: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} as {"acc": v, "acc_stderr": s}:
    numbers only ("N/A" stderrs are dropped), the filter kept after a comma when it is not "none"."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        clean: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, where = key.partition(",")
            clean[metric if where == "none" else key] = float(value)
        scores[task] = clean
    n = {task: int(c["effective"]) for task, c in results.get("n-samples", {}).items()}
    return scores, n


class ZeroShot:
    """lm-eval's HFLM over a loaded model, built before a treatment applies: building it ties the word
    embeddings again (`tie_weights`), which would undo what rotation unties while it is active."""

    def __init__(self, lm: LoadedModel, options: Any, tasks: list[Any], seed: int) -> None:
        from lm_eval.models.huggingface import HFLM

        self.options, self.tasks, self.seed = options, tasks, int(seed)
        # lm-eval gives a tokenizer without a pad token one; the job's own tokenizer stays as it is.
        tokenizer = copy.deepcopy(lm.tokenizer)
        with _quiet():
            self.hflm = HFLM(pretrained=lm.model, tokenizer=tokenizer, batch_size=int(options.batch_size))

    def evaluate(self) -> ZeroShotResult:
        """Score every task on the model as it is now (hooks and edits included)."""
        from lm_eval import simple_evaluate

        opts, started = self.options, time.perf_counter()
        with _quiet(logging.WARNING), _rng_kept():
            results = simple_evaluate(
                model=self.hflm,
                tasks=list(self.tasks),
                num_fewshot=int(opts.num_fewshot),
                limit=None if opts.limit is None else int(opts.limit),
                log_samples=False,
                task_manager=task_manager(opts),
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        scores, n_samples = _flatten(results)
        folder = include_folder(opts)
        protocol = {
            "name": str(opts.name),
            "lm_eval": lm_eval_version(),
            "tasks": [str(t) for t in opts.tasks],
            "limit": opts.limit,
            "num_fewshot": int(opts.num_fewshot),
            "batch_size": int(opts.batch_size),
            "include_path": None if folder is None else str(folder),
            "seed": self.seed,
            "task_versions": {k: v for k, v in results.get("versions", {}).items()},
            "seconds": round(time.perf_counter() - started, 3),
        }
        return ZeroShotResult(scores=scores, n_samples=n_samples, protocol=protocol)
