"""Locate GGUF files that PyPI packages ship, without importing packages that must not be imported."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from outlier_study.errors import ConfigError


def package_dir(package: str) -> Path:
    """Installed directory of `package` (a distribution or module name), found without importing it."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.package", f"package '{package}' is not installed (run `make install`)", allowed=None
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(package: str, cache_root: Path) -> Path:
    """The GGUF file of an embedded-model package: a file inside it, or one assembled from its chunks."""
    directory = package_dir(package)
    files = sorted(directory.rglob("*.gguf"))
    if files:
        return files[0]
    module = importlib.import_module(package.replace("-", "_"))  # chunked packages expose assemble()
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise ConfigError("model.package", f"package '{package}' holds no .gguf file and no assemble()")
    target = cache_root / "gguf" / module.MODEL_NAME
    return Path(assemble(output_path=target))
