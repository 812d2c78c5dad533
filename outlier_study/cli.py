"""Console entry `outlier-study`: a thin Hydra wrapper around `app.run`, with one-line errors."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from outlier_study.config.schema import register_configs
from outlier_study.errors import ConfigError

register_configs()

# conf/ lives at the repository root (the package is installed editable by `make install`).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def one_line(err: BaseException) -> str:
    """Hydra/OmegaConf composition errors as one line naming the field and the allowed values."""
    text = str(err)
    missing = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.MULTILINE)
        return str(ConfigError(missing.group(1), f"unknown option '{missing.group(2)}'", options))
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "config"
        return f"{key}: {str(cause).splitlines()[0]}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from outlier_study.app import run  # heavy (torch, transformers): not needed to report a config typo

    try:
        run(cfg)
    except ConfigError as err:  # exit here: past this point Hydra adds its own line about the job
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Errors in the user's input: one line on stderr, exit code 2; other failures keep their traceback."""
    os.environ.setdefault(
        "HYDRA_FULL_ERROR", "1"
    )  # let composition errors reach us instead of Hydra's printer
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
