"""Configuration: the Hydra config tree shipped inside the package, its schemas and their validation."""

from pathlib import Path

CONF_DIR = (
    Path(__file__).resolve().parent.parent / "conf"
)  # the YAML config groups (installed with the package)
