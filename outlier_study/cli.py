"""Console entry `outlier-study`: a thin Hydra wrapper around `app.run`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from outlier_study.app import run
from outlier_study.config.schema import register_configs
from outlier_study.errors import ConfigError

register_configs()

# conf/ lives at the repository root (the package is installed editable by `make install`).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
