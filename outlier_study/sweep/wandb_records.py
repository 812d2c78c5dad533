"""Read an offline W&B run back from its `run-*.wandb` file, without syncing it.

wandb 0.31 keeps config, summary and history only in that file, and ships no reader for it: it is a
LevelDB-style log of `wandb_internal_pb2.Record` messages cut into 32 KiB blocks. Tests use this to
check what was logged; users can inspect a run with `python -m outlier_study.sweep.wandb_records PATH`.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # crc32 of (type byte + data), data length, chunk type
FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path) -> Iterator[pb.Record]:
    """Every record in order; a truncated tail (a run killed mid-write) ends the iteration."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"{path}: not a W&B transaction log (bad file header)")
    pos, parts = FILE_HEADER.size, bytearray()
    while pos + HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER.size:  # the writer pads a block tail too short for a chunk header
            pos += room
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        chunk = data[pos + HEADER.size : pos + HEADER.size + length]
        if kind == 0 and length == 0:  # zero padding: the rest of this block is empty
            pos += room
            continue
        if len(chunk) < length:
            return
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += HEADER.size + length
        if kind in (FULL, FIRST):
            parts = bytearray(chunk)
        else:
            parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(bytes(parts))
            yield record


def _set(target: dict[str, Any], item: Any) -> None:
    """Apply one key/nested_key + value_json item to a nested dict."""
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def _remove(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.get(key, {})
    target.pop(keys[-1], None)


@dataclass
class OfflineRun:
    """What a run recorded: its identity, config, summary, history rows and the files it saved."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    step_metrics: dict[str, str] = field(default_factory=dict)  # metric (or glob) -> its x-axis
    exit_code: int | None = None  # None: the run was never finished

    @property
    def files_dir(self) -> Path:
        """Where the run's saved files (tables, images) lie, relative paths as in `files`."""
        return self.path.parent / "files"

    def media(self, key: str) -> Path:
        """The file behind a logged table or image, looked up by its history key."""
        for row in self.history:
            value = row.get(key)
            if isinstance(value, dict) and "path" in value:
                return self.files_dir / value["path"]
        raise KeyError(f"{key}: no table or image logged under this key")


def _apply(run: OfflineRun, record: pb.Record) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        run.run_id, run.name, run.group = r.run_id, r.display_name, r.run_group
        run.project, run.job_type, run.tags = r.project, r.job_type, list(r.tags)
        for item in r.config.update:
            _set(run.config, item)
    elif kind == "config":
        for item in record.config.update:
            _set(run.config, item)
        for item in record.config.remove:
            _remove(run.config, item)
    elif kind == "summary":
        for item in record.summary.update:
            _set(run.summary, item)
        for item in record.summary.remove:
            _remove(run.summary, item)
    elif kind == "history":
        row: dict[str, Any] = {}
        for item in record.history.item:
            _set(row, item)
        run.history.append(row)
    elif kind == "files":
        run.files += [f.path for f in record.files.files if f.path not in run.files]
    elif kind == "metric" and record.metric.step_metric:
        run.step_metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    elif kind == "exit":
        run.exit_code = record.exit.exit_code


def read_run(path: Path) -> OfflineRun:
    """Replay one `run-*.wandb` file (or the single one under a folder) into an OfflineRun."""
    path = Path(path)
    if path.is_dir():
        found = find_runs(path)
        if len(found) != 1:
            raise ValueError(f"{path}: expected one run-*.wandb below it, found {len(found)}")
        path = found[0]
    run = OfflineRun(path=path)
    for record in iter_records(path):
        _apply(run, record)
    run.config.pop("_wandb", None)
    return run


def find_runs(root: Path) -> list[Path]:
    """Every `run-*.wandb` below root (a job directory, a sweep directory or a wandb/ folder)."""
    return sorted(Path(root).rglob("run-*.wandb"))


def main(argv: Sequence[str] | None = None) -> None:
    """Print each run below PATH as JSON: identity, config, summary, history length and files."""
    parser = argparse.ArgumentParser(
        prog="python -m outlier_study.sweep.wandb_records", description=main.__doc__
    )
    parser.add_argument("path", type=Path, help="a run-*.wandb file, or a folder searched for them")
    parser.add_argument("--history", action="store_true", help="print every history row too")
    args = parser.parse_args(argv)
    paths = [args.path] if args.path.is_file() else find_runs(args.path)
    if not paths:
        sys.exit(f"error: no run-*.wandb under {args.path}")
    for path in paths:
        run = read_run(path)
        out = {k: v for k, v in vars(run).items() if k != "history"}
        out["history_rows"] = len(run.history)
        if args.history:
            out["history"] = run.history
        print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
