"""Console entry `outlier-study`: a thin Hydra wrapper around `app.run`, with one-line errors.

Exit codes: 0 ok; 2 bad input (one line on stderr naming the field and the allowed values); 1 a job
failed otherwise (its traceback, then one line naming its folder) or SLURM refused or lost a job.
A sweep job that fails inside a submitit allocation exits with the same code, so `sacct` shows FAILED.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from outlier_study.config import CONF_DIR
from outlier_study.config.schema import register_configs
from outlier_study.errors import ConfigError
from outlier_study.validate import OPTION_GROUPS, option_keys

register_configs()

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_jobs_started: list[str] = []  # job folders the task function was entered for, in this process


def _chosen(group: str) -> str | None:
    """The option of `group` chosen on the command line (for error messages before composition ends)."""
    picks = [a.split("=", 1)[1] for a in sys.argv[1:] if re.match(rf"^\+?{group}=", a)]
    return picks[-1] if picks else None


def _unknown_key(cause: OmegaConfBaseException) -> str:
    key = str(cause.full_key or cause.key)
    group = key.split(".")[0]
    if group in OPTION_GROUPS and "." in key:
        chosen = _chosen(group)
        if chosen is not None and "," in chosen:  # a sweep: Hydra first composes with the group's default
            return str(
                ConfigError(
                    key,
                    f"a key of some {group} options only: in a sweep over {group} write ++{key}=... so each "
                    "job gets it where its option has it",
                )
            )
        name = chosen or {"experiment": "profile"}.get(group, "none")
        try:
            keys = option_keys(group, name)  # imports the registries (torch): only on this error
        except ConfigError as err:
            return str(err)
        return str(ConfigError(key, f"not a key of {group} '{name}'", allowed=keys))
    fields = getattr(getattr(cause, "object_type", None), "__dataclass_fields__", None)
    return str(ConfigError(key, f"unknown key '{cause.key}'", allowed=list(fields) if fields else None))


def one_line(err: BaseException) -> str:
    """Hydra/OmegaConf composition errors as one line naming the field and the allowed values."""
    text = str(err)
    missing = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.MULTILINE)
        return str(ConfigError(missing.group(1), f"unknown option '{missing.group(2)}'", options))
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return _unknown_key(cause)
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "config"
        return f"{key}: {str(cause).splitlines()[0]}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def launcher_line(err: Exception) -> str | None:
    """submitit's errors (a refused submission, a job cancelled or killed) as one line; None if not one."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    text = str(err)
    if isinstance(err, FailedJobError) and isinstance(err.__cause__, subprocess.CalledProcessError):
        reason = (text.strip().splitlines() or ["no message"])[-1]
        return f"hydra.launcher: the cluster refused the jobs: {reason}"
    if isinstance(err, UncompletedJobError):
        found = re.search(r"Job (\S+) .*?with path (\S+).*?state: ([^)\n]*\)?)", text, flags=re.DOTALL)
        if found:
            job, result, state = found.groups()
            return (
                f"job {job} did not finish (state: {state.rstrip(')')}); its log is in "
                f"{Path(result).parent}; rerunning the same command resumes the sweep"
            )
        return " ".join(text.split())
    return None


class JobFailed(Exception):
    """A sweep job's failure as plain strings: submitit pickles it back from the node, and not every
    exception survives that (ConfigError, or library errors with extra constructor arguments)."""

    def __init__(self, job_dir: str, error: str, config_error: bool) -> None:
        super().__init__(job_dir, error, config_error)
        self.job_dir, self.error, self.config_error = job_dir, error, config_error

    def __str__(self) -> str:
        return f"{self.job_dir}: {self.error}"

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_INPUT if self.config_error else EXIT_FAILED

    def report(self) -> int:
        """Bad input: its one line (exit 2). Else the job's traceback from its status.json (written where
        it ran) and one line naming its folder (exit 1)."""
        if self.config_error:
            print(f"error: {self.error}", file=sys.stderr)
            return self.exit_code
        try:
            status = json.loads((Path(self.job_dir) / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("traceback"):
            print(status["traceback"].rstrip(), file=sys.stderr)
        first = (self.error.strip().splitlines() or [""])[0]
        print(f"error: job failed: {self.job_dir} ({first})", file=sys.stderr)
        return self.exit_code


def _exit_with_at_end(code: int) -> None:
    """Inside a submitit job: let submitit pickle the job's result first, then leave the process with
    `code`, so SLURM records the job as FAILED instead of COMPLETED 0:0."""

    def leave() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(leave)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from outlier_study.app import run  # heavy (torch, transformers): not needed to report a config typo
    from outlier_study.output.job import error_line

    hydra_cfg = HydraConfig.get()
    _jobs_started.append(hydra_cfg.runtime.output_dir)
    try:
        run(cfg)
    except Exception as err:
        bad_input = isinstance(err, ConfigError)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # Hydra records the job as failed and runs the others
            failed = JobFailed(hydra_cfg.runtime.output_dir, error_line(err), bad_input)
            if os.environ.get("SUBMITIT_FOLDER"):
                _exit_with_at_end(failed.exit_code)
            raise failed from None
        if bad_input:
            print(f"error: {err}", file=sys.stderr)  # exit here: past this point Hydra adds a line of its own
            sys.exit(EXIT_BAD_INPUT)
        raise


def main() -> None:
    """Errors in the user's input: one line on stderr, exit code 2; a failed sweep job: its traceback and
    one line naming its folder, exit code 1; a job SLURM cancelled or refused: one line, exit code 1;
    other failures keep their traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us, not Hydra's printer
    _jobs_started.clear()
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except JobFailed as err:  # the first failed job of a multirun; the others ran to their end
        sys.exit(err.report())
    except OSError as err:
        if _jobs_started:  # raised by a job: a failure of its own, with its traceback
            raise
        # raised by Hydra creating the job folder before the job starts: an unusable output path
        where = str(err.filename or "the output folder")
        print(f"error: paths.output_root: cannot write {where!r}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as err:
        line = launcher_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
