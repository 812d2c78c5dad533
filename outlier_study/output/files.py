"""The on-disk results layout of a job (DESIGN §5); every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
import traceback
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "datasets", "wandb", "submitit", "gguf")


def _file_mode() -> int:
    """The mode open() would give a new file (0666 minus the umask); mkstemp's own 0600 hides results."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    text = json.dumps(
        payload, indent=2, default=lambda o: _jsonable(o) if not isinstance(o, Path) else str(o)
    )
    _atomic_bytes(path, (text + "\n").encode())


def write_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode())


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _atomic_bytes(path, buf.getvalue().encode())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic_bytes(path, buf.getvalue())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_status(
    job_dir: Path, state: str, error: BaseException | None = None, fields: Mapping[str, Any] | None = None
) -> None:
    """running | ok | failed (with the error and its traceback), plus `fields` (e.g. the config hash)."""
    payload: dict[str, Any] = {"status": state, "time": datetime.now(UTC).isoformat(), **(fields or {})}
    if error is not None:
        payload["error"] = f"{type(error).__name__}: {error}"
        payload["traceback"] = "".join(traceback.format_exception(error))
    write_json(job_dir / "status.json", payload)


def git_sha() -> str | None:
    """Commit of the checkout the package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(extra: Mapping[str, Any]) -> dict[str, Any]:
    """What is needed to reproduce a job: code version, package versions, hardware, model provenance."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }


def write_figure(path: Path, fig: Any) -> None:
    """Render a matplotlib Figure to PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_bytes(path, buf.getvalue())


def write_table(tables_dir: Path, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A paper-layout table as tables/<name>.md and .csv; returns the Markdown for printing."""
    text = markdown_table(header, rows)
    write_text(tables_dir / f"{name}.md", text)
    write_csv(tables_dir / f"{name}.csv", header, rows)
    return text
